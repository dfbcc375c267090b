#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Logging
import WalshipCurl
import WalshipFormat
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// Posts Slack-compatible JSON ({"text": ...}) to a webhook when a condition starts, again at
/// most every `repeatUs` while it lasts, and once more when it clears. Conditions: uploads
/// failing for longer than a threshold, lag above a threshold, a failed restore drill, and a
/// new generation because continuity was lost (a one-off event).
final class Alerter {
    struct Settings {
        var url: String
        var lagUs: Int64
        var syncFailureUs: Int64
        var repeatUs: Int64 = 3_600_000_000
        /// At most this many posts a minute, whatever happens.
        var perMinute = 10
    }

    private let settings: Settings
    private let logger: Logger
    private let database: String
    private let queue = DispatchQueue(label: "walship.alerts")
    private var firing: [String: Int64] = [:]        // condition → when last posted
    private var sentTimes: [Int64] = []
    private var client: HTTPClient?

    init(settings: Settings, database: String, logger: Logger) {
        self.settings = settings; self.database = database; self.logger = logger
    }

    /// The webhook's host only: its path usually holds a secret token.
    var safeTarget: String { Redact.origin(settings.url) }

    /// Called about once a second with the agent's current figures.
    func evaluate(_ report: StatusReport, nowUs: Int64 = nowMicroseconds()) {
        var active: [String: String] = [:]
        for r in report.replicas {
            if let since = r.failingSinceUnix, nowUs - Int64(since * 1e6) >= settings.syncFailureUs {
                active["sync:\(r.url)"] = "uploads to \(r.url) have failed for \(DurationText.format(microseconds: nowUs - Int64(since * 1e6))): \(r.lastError ?? "unknown error")"
            }
            if r.lagSeconds * 1e6 >= Double(settings.lagUs) {
                active["lag:\(r.url)"] = "replication lag to \(r.url) is \(String(format1(r.lagSeconds)))s (threshold \(DurationText.format(microseconds: settings.lagUs)))"
            }
            if r.verifyOK == false {
                active["verify:\(r.url)"] = "restore drill of \(r.url) failed: \(r.verifyMessage ?? "")"
            }
        }
        for (key, text) in active.sorted(by: { $0.key < $1.key }) {
            if let last = firing[key], nowUs - last < settings.repeatUs { continue }
            if post("FIRING", key: key, text: text, nowUs: nowUs) { firing[key] = nowUs }
        }
        for key in firing.keys.sorted() where active[key] == nil {
            let what = key.split(separator: ":", maxSplits: 1).map(String.init)
            let text: String
            switch what[0] {
            case "sync": text = "uploads to \(what[1]) succeed again"
            case "lag": text = "replication lag to \(what[1]) is back under \(DurationText.format(microseconds: settings.lagUs))"
            default: text = "restore drill of \(what[1]) passes again"
            }
            if post("RESOLVED", key: key, text: text, nowUs: nowUs) { firing[key] = nil }
        }
    }

    /// A one-off event (no recovery follows).
    func event(_ text: String) { _ = post("EVENT", key: "event", text: text, nowUs: nowMicroseconds()) }

    private func post(_ state: String, key: String, text: String, nowUs: Int64) -> Bool {
        sentTimes = sentTimes.filter { nowUs - $0 < 60_000_000 }
        guard sentTimes.count < settings.perMinute else { return false }
        sentTimes.append(nowUs)
        let host = hostName()
        let message = "[walship \(state)] \(database) on \(host): \(text)"
        let json = "{\"text\":\"\(jsonEscape(message))\",\"walship\":{\"state\":\"\(state)\",\"condition\":\"\(jsonEscape(key))\",\"database\":\"\(jsonEscape(database))\",\"host\":\"\(jsonEscape(host))\"}}"
        logger.notice("alert \(state.lowercased())", metadata: ["alert.condition": "\(key)", "webhook": "\(safeTarget)"])
        queue.async {
            if self.client == nil { self.client = HTTPClient(); self.client!.timeoutSeconds = 10 }
            for attempt in 1...3 {
                do {
                    let r = try self.client!.perform(method: "POST", url: self.settings.url, headers: ["Content-Type: application/json"],
                                                     body: .bytes(Array(json.utf8)), sign: nil)
                    if (200..<300).contains(r.status) { return }
                    self.logger.warning("webhook answered \(r.status)", metadata: ["webhook": "\(self.safeTarget)"])
                } catch {
                    self.logger.warning("webhook unreachable", metadata: ["webhook": "\(self.safeTarget)", "error": "\(error)"])
                }
                usleep(UInt32(500_000 * attempt))
            }
        }
        return true
    }
}

func format1(_ v: Double) -> String {
    let tenths = Int64((v * 10).rounded())
    return "\(tenths / 10).\(abs(tenths % 10))"
}

func jsonEscape(_ s: String) -> String {
    var o = ""
    for u in s.unicodeScalars {
        switch u {
        case "\"": o += "\\\""
        case "\\": o += "\\\\"
        case "\n": o += "\\n"
        case "\r": o += "\\r"
        case "\t": o += "\\t"
        default:
            if u.value < 0x20 { o += "\\u" + String(repeating: "0", count: 4 - String(u.value, radix: 16).count) + String(u.value, radix: 16) }
            else { o.unicodeScalars.append(u) }
        }
    }
    return o
}
