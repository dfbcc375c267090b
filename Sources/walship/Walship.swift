import ArgumentParser
import Logging
import WalshipConfig
import WalshipAgent
import WalshipFormat
import WalshipRestore
import WalshipS3
import WalshipStorage
import WalshipSystem
#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

struct Walship: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "walship",
        abstract: "Continuous, point-in-time recoverable backups of SQLite databases.",
        discussion: """
        walship tails a SQLite database's write-ahead log, ships LZ4-compressed segments every sync \
        interval beside periodic snapshots to a replica, and restores the database exactly as it was \
        after any transaction.

        Replica URLs: file:///absolute/path and s3://bucket/prefix?endpoint=URL&region=R&path-style=true
        (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN or the config file).
        Durations: 500ms, 1s, 15m, 24h, 7d. Timestamps: RFC 3339 (2024-12-14T14:00:00Z).
        """,
        version: "0.2.0",
        subcommands: [Replicate.self, Restore.self, List.self, Snapshot.self, Verify.self, Status.self]
    )
}

struct LogOptions: ParsableArguments {
    @Option(help: "Log level: trace, debug, info, notice, warning, error.")
    var logLevel: String = "info"

    func validate() throws {
        guard Logger.Level(rawValue: logLevel) != nil else {
            throw ValidationError("--log-level must be one of \(Logger.Level.allCases.map(\.rawValue).joined(separator: ", "))")
        }
    }

    func bootstrap() {
        let level = Logger.Level(rawValue: logLevel) ?? .info
        LoggingSystem.bootstrap { label in
            var h = StreamLogHandler.standardError(label: label)
            h.logLevel = level
            return h
        }
    }
}

/// Prints one clear error line and exits non-zero.
func fail(_ error: Error) -> Never {
    var msg = "\(error)"
    if let e = error as? ValidationError { msg = e.message }
    FileHandleStderr.write("walship: error: \(msg)\n")
    exit(1)
}

enum FileHandleStderr {
    static func write(_ s: String) {
        var bytes = Array(s.utf8)
        _ = Glibc.write(2, &bytes, bytes.count)
    }
}

/// The encryption key named by --encryption-key-file (warns when others may read the file).
func loadKey(_ path: String?, logger: Logger? = nil) throws -> EncryptionKey? {
    guard let p = path else { return nil }
    let key = try EncryptionKey.load(path: FS.absolute(p))
    if EncryptionKey.isExposed(path: FS.absolute(p)) {
        FileHandleStderr.write("walship: warning: \(p) can be read by other users; chmod 600 it\n")
    }
    return key
}

func parseDuration(_ s: String, _ name: String) throws -> Int64 {
    do { return try DurationText.parseMicroseconds(s) } catch { throw ValidationError("\(name): \(error)") }
}

/// `--help` text of a shared option, with its default.
func shared(_ key: String, valueName: String? = nil) -> ArgumentHelp {
    guard let o = DatabaseOptions.named(key) else { preconditionFailure("no shared option '\(key)'") }
    return ArgumentHelp(o.helpWithDefault, valueName: valueName)
}

@_silgen_name("mallopt") func glibcMallopt(_ param: Int32, _ value: Int32) -> Int32

func oneDecimal(_ v: Double) -> String {
    let tenths = Int64((v * 10).rounded())
    return (tenths < 0 ? "-" : "") + "\(abs(tenths) / 10).\(abs(tenths) % 10)"
}

/// Lives as long as the process.
nonisolated(unsafe) var metricsServer: MetricsServer?

func printJSON<T: Encodable>(_ value: T, snakeCase: Bool = false) throws {
    let enc = JSONEncoder()
    if snakeCase { enc.keyEncodingStrategy = .convertToSnakeCase }
    enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    print(String(decoding: try enc.encode(value), as: UTF8.self))
}

/// The database `db` (an absolute path) of the config file, read for a command other than
/// `replicate`.
