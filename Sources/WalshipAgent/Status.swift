#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Logging
import WalshipFormat
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// What one replica of a running agent looks like from outside.
public struct ReplicaStatus: Codable, Sendable, Equatable {
    public var url: String
    /// Age of the oldest committed transaction this replica has not acknowledged; 0 when caught up.
    public var lagSeconds: Double = 0
    public var lastSyncUnix: Double = 0
    public var shippedBytes: UInt64 = 0
    public var shippedObjects: UInt64 = 0
    public var requests: [String: UInt64] = [:]
    public var lastError: String?
    /// Since when uploads have failed without a success (nil when healthy).
    public var failingSinceUnix: Double?
    public var verifyOK: Bool?
    public var verifyUnix: Double?
    public var verifyMessage: String?
    public var deletedObjects: UInt64 = 0
    /// Errors with this replica, by kind (upload, verify, housekeeping).
    public var errors: [String: UInt64] = [:]
    public var compactedObjects: UInt64 = 0
}

/// A running agent's figures, for /metrics, `walship status` and alerts. Updated by the
/// agent's loop and read from other threads.
public struct StatusReport: Codable, Sendable, Equatable {
    public var database: String
    public var pid: Int32 = getpid()
    public var updatedUnix: Double = 0
    public var generation = ""
    /// The id recorded in every object (`--database-id` pins it; restores can insist on it).
    public var databaseID: String?
    public var txid: UInt64 = 0
    public var lastCommitUnix: Double = 0
    /// When the newest level-0 segment was cut. Cuts run at a fixed rate from the agent's
    /// start, so this and the sync interval give the whole schedule.
    public var lastCutUnix: Double = 0
    public var walBytes: UInt64 = 0
    public var spoolBytes: UInt64 = 0
    public var lastSnapshotUnix: Double = 0
    public var checkpoints: [String: UInt64] = [:]
    public var checkpointSecondsTotal: Double = 0
    public var lastCheckpointSeconds: Double = 0
    public var errors: [String: UInt64] = [:]
    public var newGenerations: UInt64 = 0
    public var replicas: [ReplicaStatus] = []
    /// The lag past which this database counts as lagging (its `alert-lag`); absent in the
    /// files of older agents.
    public var alertLagSeconds: Double?

    /// Uploads to some replica fail (and none succeeded since).
    public var failing: Bool { replicas.contains { $0.failingSinceUnix != nil } }
    /// Some replica is further behind than the database's `alert-lag`.
    public var lagging: Bool { replicas.contains { $0.lagSeconds > (alertLagSeconds ?? 300) } }
}

public final class AgentStatus: @unchecked Sendable {
    private let mutex = Mutex()
    private var report: StatusReport
    init(database: String) { report = StatusReport(database: database) }

    public var current: StatusReport { mutex.locked { report } }
    func update(_ body: (inout StatusReport) -> Void) { mutex.locked { body(&report) } }
    /// Counts an error of the database, or of its replica number `replica`.
    func countError(_ kind: String, replica: Int? = nil) {
        mutex.locked {
            if let i = replica {
                while report.replicas.count <= i { report.replicas.append(ReplicaStatus(url: "")) }
                report.replicas[i].errors[kind, default: 0] += 1
            } else {
                report.errors[kind, default: 0] += 1
            }
        }
    }
}

/// Every agent of the process, for the metrics endpoint.
public enum StatusBoard {
    private static let mutex = Mutex()
    nonisolated(unsafe) private static var agents: [String: AgentStatus] = [:]
    /// The counters of agents replaced (a restart) or retired, so that the process's totals
    /// never go down (Prometheus would read a fall as a counter reset).
    nonisolated(unsafe) private static var carriedTotals = Totals()

    public struct Totals: Sendable {
        public var shippedBytes = 0.0
        public var errors = 0.0
        public init() {}
        init(_ r: StatusReport) {
            shippedBytes = r.replicas.reduce(0.0) { $0 + Double($1.shippedBytes) }
            errors = Double(r.errors.values.reduce(0, +)) + r.replicas.reduce(0.0) { $0 + Double($1.errors.values.reduce(0, +)) }
        }
        mutating func add(_ o: Totals) { shippedBytes += o.shippedBytes; errors += o.errors }
    }

    static func register(_ s: AgentStatus, for db: String) {
        mutex.locked {
            if let old = agents[db], old !== s { carriedTotals.add(Totals(old.current)) }
            agents[db] = s
        }
    }
    /// A retired database leaves the metrics and the process's status.
    static func unregister(database db: String) {
        mutex.locked {
            if let old = agents.removeValue(forKey: db) { carriedTotals.add(Totals(old.current)) }
        }
    }
    public static var carried: Totals { mutex.locked { carriedTotals } }
    public static var reports: [StatusReport] { mutex.locked { agents.values.map(\.current) }.sorted { $0.database < $1.database } }
}

/// Prometheus text exposition (version 0.0.4) of the reports.
public enum PrometheusText {
    /// Up to this many databases, every database has its own series. Past it (a directory of
    /// thousands), only the databases that lag or fail have theirs, at most this many, worst
    /// first; the process's totals (`walship_databases`, `walship_all_*`) cover the rest. A
    /// scrape then stays a few hundred KiB, and the series do not grow with the fleet.
    public static let perDatabaseLimit = 100

    public static func render(_ all: [StatusReport], carried: StatusBoard.Totals = .init()) -> String {
        var out = ""
        // The process's totals, for every database.
        let failing = all.filter(\.failing)
        let lagging = all.filter { $0.lagging && !$0.failing }
        out += "# HELP walship_databases Databases replicated by this process, by state (failing: uploads to a replica fail; lagging: a replica is further behind than alert-lag).\n"
        out += "# TYPE walship_databases gauge\n"
        out += "walship_databases{state=\"ok\"} \(all.count - failing.count - lagging.count)\n"
        out += "walship_databases{state=\"lagging\"} \(lagging.count)\n"
        out += "walship_databases{state=\"failing\"} \(failing.count)\n"
        let maxLag = all.flatMap { $0.replicas.map(\.lagSeconds) }.max() ?? 0
        out += "# HELP walship_all_replication_lag_seconds_max The largest replication lag of any database and replica.\n"
        out += "# TYPE walship_all_replication_lag_seconds_max gauge\nwalship_all_replication_lag_seconds_max \(number(maxLag))\n"
        var totals = carried
        for r in all { totals.add(StatusBoard.Totals(r)) }
        let bytes = totals.shippedBytes
        out += "# HELP walship_all_shipped_bytes_total Bytes uploaded to every replica of every database.\n"
        out += "# TYPE walship_all_shipped_bytes_total counter\nwalship_all_shipped_bytes_total \(number(bytes))\n"
        let errors = totals.errors
        out += "# HELP walship_all_errors_total Errors of every kind, of every database.\n"
        out += "# TYPE walship_all_errors_total counter\nwalship_all_errors_total \(number(errors))\n"
        let reports = shown(all)
        func family(_ name: String, _ type: String, _ help: String, _ samples: [(String, Double)]) {
            out += "# HELP \(name) \(help)\n# TYPE \(name) \(type)\n"
            for (labels, v) in samples { out += "\(name)\(labels.isEmpty ? "" : "{\(labels)}") \(number(v))\n" }
        }
        func l(_ pairs: [(String, String)]) -> String { pairs.map { "\($0.0)=\"\(escape($0.1))\"" }.joined(separator: ",") }
        let perDB = { (f: (StatusReport) -> Double) in reports.map { (l([("db", $0.database)]), f($0)) } }
        let perReplica = { (f: (ReplicaStatus) -> Double?) in
            reports.flatMap { r in r.replicas.compactMap { rep in f(rep).map { (l([("db", r.database), ("replica", rep.url)]), $0) } } }
        }
        family("walship_replication_lag_seconds", "gauge", "Age of the oldest committed transaction the replica has not acknowledged (0 when caught up).", perReplica { $0.lagSeconds })
        family("walship_last_sync_timestamp_seconds", "gauge", "Unix time of the replica's last successful upload.", perReplica { $0.lastSyncUnix })
        family("walship_txid", "gauge", "Last transaction id captured from the WAL.", perDB { Double($0.txid) })
        family("walship_last_commit_timestamp_seconds", "gauge", "Commit time of the last captured transaction.", perDB { $0.lastCommitUnix })
        family("walship_last_cut_timestamp_seconds", "gauge", "When the newest segment was cut (cuts run at a fixed rate).", perDB { $0.lastCutUnix })
        family("walship_shipped_bytes_total", "counter", "Bytes uploaded to the replica.", perReplica { Double($0.shippedBytes) })
        family("walship_shipped_objects_total", "counter", "Objects uploaded to the replica.", perReplica { Double($0.shippedObjects) })
        family("walship_requests_total", "counter", "Requests made to the replica, by type.",
               reports.flatMap { r in r.replicas.flatMap { rep in rep.requests.sorted { $0.key < $1.key }.map { (l([("db", r.database), ("replica", rep.url), ("type", $0.key)]), Double($0.value)) } } })
        family("walship_errors_total", "counter", "Errors, by kind (and replica, for upload, verify and housekeeping errors).",
               reports.flatMap { r in r.errors.sorted { $0.key < $1.key }.map { (l([("db", r.database), ("kind", $0.key)]), Double($0.value)) } }
               + reports.flatMap { r in r.replicas.flatMap { rep in rep.errors.sorted { $0.key < $1.key }.map { (l([("db", r.database), ("replica", rep.url), ("kind", $0.key)]), Double($0.value)) } } })
        family("walship_checkpoints_total", "counter", "Checkpoint cycles, by result.",
               reports.flatMap { r in r.checkpoints.sorted { $0.key < $1.key }.map { (l([("db", r.database), ("result", $0.key)]), Double($0.value)) } })
        family("walship_checkpoint_duration_seconds_total", "counter", "Time spent in checkpoint cycles.", perDB { $0.checkpointSecondsTotal })
        family("walship_checkpoint_duration_seconds", "gauge", "Duration of the last checkpoint cycle.", perDB { $0.lastCheckpointSeconds })
        family("walship_wal_bytes", "gauge", "Size of the -wal file.", perDB { Double($0.walBytes) })
        family("walship_spool_bytes", "gauge", "Bytes waiting in the local spool.", perDB { Double($0.spoolBytes) })
        family("walship_snapshot_age_seconds", "gauge", "Seconds since the last snapshot.", perDB { $0.lastSnapshotUnix > 0 ? max(0, $0.updatedUnix - $0.lastSnapshotUnix) : 0 })
        family("walship_generations_total", "counter", "New generations started by this process.", perDB { Double($0.newGenerations) })
        family("walship_verify_last_success", "gauge", "1 if the replica's last restore drill passed, 0 if it failed.", perReplica { $0.verifyOK.map { $0 ? 1 : 0 } })
        family("walship_verify_last_timestamp_seconds", "gauge", "Unix time of the replica's last restore drill.", perReplica { $0.verifyUnix })
        family("walship_retention_deleted_objects_total", "counter", "Objects deleted by retention and compaction.", perReplica { Double($0.deletedObjects) })
        family("walship_compacted_objects_total", "counter", "Segments merged into larger ones.", perReplica { Double($0.compactedObjects) })
        return out
    }

    /// The databases that get series of their own (see `perDatabaseLimit`).
    static func shown(_ all: [StatusReport]) -> [StatusReport] {
        if all.count <= perDatabaseLimit { return all }
        func worst(_ r: StatusReport) -> Double { r.replicas.map(\.lagSeconds).max() ?? 0 }
        let trouble = all.filter { $0.failing || $0.lagging }
            .sorted { ($0.failing ? 1 : 0, worst($0)) > ($1.failing ? 1 : 0, worst($1)) }
        return Array(trouble.prefix(perDatabaseLimit)).sorted { $0.database < $1.database }
    }

    static func escape(_ s: String) -> String {
        var o = ""
        for c in s { switch c { case "\\": o += "\\\\"; case "\"": o += "\\\""; case "\n": o += "\\n"; default: o.append(c) } }
        return o
    }

    static func number(_ v: Double) -> String {
        if v == v.rounded() && abs(v) < 1e15 { return String(Int64(v)) }
        return String(v)
    }
}

/// The status file an agent keeps in its spool (status.json), read by `walship status`.
public enum StatusFile {
    public static func path(spool: String) -> String { spool + "/status.json" }
    public static func spoolDirectory(forDatabase db: String, configured: String?) -> String {
        configured ?? Spool.defaultDirectory(forDatabase: FS.absolute(db))
    }

    static func write(_ r: StatusReport, spool: String) {
        guard let data = try? JSONEncoder().encode(r) else { return }
        let p = path(spool: spool)
        let tmp = p + ".tmp"
        let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard fd >= 0 else { return }
        let bytes = Array(data)
        _ = bytes.withUnsafeBytes { Glibc.write(fd, $0.baseAddress, $0.count) }
        close(fd)
        rename(tmp, p)
    }

    public static func read(spool: String) throws -> StatusReport? {
        let p = path(spool: spool)
        guard FS.exists(p) else { return nil }
        return try JSONDecoder().decode(StatusReport.self, from: Data(try FS.readAll(p)))
    }
}

/// One status for the whole process (`replicate --status-file`, a config's `status-file:`, and
/// by default `<dir>/.walship-status.json` for `--dir`): every database's report in one file,
/// so that `walship status` reads one file, not one per database.
public struct ProcessStatus: Codable, Sendable, Equatable {
    public var formatVersion = 1
    public var pid: Int32 = getpid()
    public var updatedUnix: Double = 0
    public var databases: [StatusReport] = []

    /// Whether the process that wrote it still runs and wrote it lately (it rewrites the file
    /// at least every 10 s).
    public var fresh: Bool {
        let alive = kill(pid, 0) == 0 || errno == EPERM
        return alive && Double(nowMicroseconds()) / 1e6 - updatedUnix < 30
    }
}

public enum ProcessStatusFile {
    public static let defaultName = ".walship-status.json"
    public static func defaultPath(forDirectory dir: String) -> String { dir + "/" + defaultName }

    /// Written atomically (a scratch file made with O_EXCL|O_NOFOLLOW, then renamed): the
    /// directory may be shared.
    static func write(_ s: ProcessStatus, to path: String) throws {
        let enc = JSONEncoder()
        enc.keyEncodingStrategy = .convertToSnakeCase
        try FS.writeAtomically(path, Array(try enc.encode(s)), mode: 0o644)
    }

    public static func read(_ path: String) throws -> ProcessStatus? {
        guard FS.exists(path) else { return nil }
        let dec = JSONDecoder()
        dec.keyDecodingStrategy = .convertFromSnakeCase
        do { return try dec.decode(ProcessStatus.self, from: Data(try FS.readAll(path))) } catch let e as DecodingError {
            throw ValidationFailure("\(path) is not a walship status file (\(e))")
        }
    }
}

/// An input that is not what it claims to be.
public struct ValidationFailure: Error, CustomStringConvertible {
    public let description: String
    public init(_ d: String) { description = d }
}

/// Writes the process's status file: within a second of a change, and every 10 s regardless.
final class ProcessStatusWriter {
    private let path: String
    private var last = ProcessStatus()
    private var lastWriteUs: Int64 = 0
    private var lastLookUs: Int64 = 0
    private var warned = false
    private let logger: Logger

    init(path: String, logger: Logger) { self.path = path; self.logger = logger }

    func tick(force: Bool = false) {
        let now = monotonicMicroseconds()
        if !force && now - lastLookUs < 1_000_000 { return }
        lastLookUs = now
        var s = ProcessStatus()
        s.databases = StatusBoard.reports.map { var r = $0; r.updatedUnix = 0; return r }
        if !force && s.databases == last.databases && now - lastWriteUs < 10_000_000 { return }
        last = s
        lastWriteUs = now
        s.updatedUnix = Double(nowMicroseconds()) / 1e6
        s.databases = StatusBoard.reports
        do {
            try ProcessStatusFile.write(s, to: path)
            warned = false
        } catch {
            if !warned { logger.error("cannot write the process's status file", metadata: ["status.file": "\(path)", "error": "\(error)"]) }
            warned = true
        }
    }
}
