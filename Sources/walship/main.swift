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

struct Replicate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Replicate a database continuously (runs until SIGTERM/SIGINT).",
        discussion: """
        With no REPLICA_URL, replicates to file://<dir of DB>/<name>-replica. With --config, replicates \
        every database of the file, each to its replicas. With --dir, replicates every database in \
        a directory, picking up new ones within a second and retiring those that vanish; each \
        replica URL is a template where {name} is the database's file name \
        (--replica-template s3://bucket/tenants/{name}). Databases are switched to WAL mode if \
        needed. Applications must use busy_timeout >= 5000 ms. On SIGTERM or SIGINT, walship ships \
        everything committed, then exits 0.
        """)

    @Argument(help: "Path of the SQLite database (omit with --config).") var database: String?
    @Argument(help: "Replica URLs (default: file://<dir of DB>/<name>-replica).") var replicas: [String] = []
    @Option(help: "YAML config file with databases and their replicas.") var config: String?
    @Option(help: ArgumentHelp("Replicate every database in this directory, as they come and go (see --pattern, --replica-template).", valueName: "dir"))
    var dir: String?
    @Option(help: ArgumentHelp("With --dir: which file names are databases (a shell pattern; names starting with a dot, and -wal, -shm and -journal files, never are).", valueName: "glob"))
    var pattern: String = DirectoryConfig.defaultPattern
    @Option(help: ArgumentHelp("With --dir: a replica URL with {name} where the database's file name goes; repeat for more replicas (default: file://<dir>/<name>-replica beside each database).", valueName: "url"))
    var replicaTemplate: [String] = []
    // The options a config file also takes: DatabaseOptions holds their rules, defaults and help.
    @Option(help: shared("sync-interval")) var syncInterval: String?
    @Option(help: shared("snapshot-interval")) var snapshotInterval: String?
    @Option(help: shared("checkpoint-frames")) var checkpointFrames: String?
    @Option(help: shared("read-delay", valueName: "duration")) var readDelay: String?
    @Option(help: "Spool directory (default: .<name>-walship beside the database).") var spoolDir: String?
    @Option(help: shared("spool-limit")) var spoolLimit: String?
    @Option(help: ArgumentHelp("Encrypt every stored object with AES-256-GCM using this key (a file of 32 random bytes, e.g. `head -c 32 /dev/urandom > key`). Keep a copy: without it nothing can be restored.", valueName: "path"))
    var encryptionKeyFile: String?
    @Option(help: ArgumentHelp("Record this id (16 hex digits, as `walship status` prints it) in every object, so that restores can insist on it (`restore --database-id`). Default: the id the spool keeps, or a random one on a first run.", valueName: "id"))
    var databaseId: String?
    @Option(help: shared("retention")) var retention: String?
    @Option(help: shared("compaction", valueName: "windows")) var compaction: String?
    @Option(help: shared("fine-window")) var fineWindow: String?
    @Option(help: shared("verify-interval")) var verifyInterval: String?
    @Option(help: ArgumentHelp("Serve Prometheus metrics at http://HOST:PORT/metrics.", valueName: "host:port"))
    var metricsAddr: String?
    @Option(help: shared("webhook-url", valueName: "url")) var webhookUrl: String?
    @Option(help: shared("alert-lag")) var alertLag: String?
    @Option(help: shared("alert-sync-failure")) var alertSyncFailure: String?
    @OptionGroup var log: LogOptions

    /// The shared options given on the command line, by key.
    var sharedGiven: [(String, String)] {
        let typed: [(String, String?)] = [
            ("sync-interval", syncInterval), ("snapshot-interval", snapshotInterval), ("checkpoint-frames", checkpointFrames),
            ("read-delay", readDelay), ("spool-limit", spoolLimit), ("retention", retention), ("compaction", compaction),
            ("fine-window", fineWindow), ("verify-interval", verifyInterval), ("webhook-url", webhookUrl),
            ("alert-lag", alertLag), ("alert-sync-failure", alertSyncFailure),
        ]
        return typed.compactMap { k, v in v.map { (k, $0) } }
    }

    /// The database's settings: the defaults, then what was typed, by the same rules as the file.
    func settings(path: String) throws -> DatabaseConfig {
        var c = DatabaseOptions.defaults(path: path)
        for (k, v) in sharedGiven {
            do { try DatabaseOptions.apply(k, v, to: &c) } catch { throw ValidationError("--\(k): \(error)") }
        }
        return c
    }

    func validate() throws {
        if config == nil && database == nil && dir == nil { throw ValidationError("give a database path, --dir DIR, or --config FILE") }
        if config != nil && dir != nil { throw ValidationError("give --dir or --config, not both (a config file lists directories under directories:)") }
        if config != nil && (database != nil || !replicas.isEmpty) { throw ValidationError("with --config, databases and replicas come from the file; give no paths") }
        if dir != nil && (database != nil || !replicas.isEmpty) { throw ValidationError("with --dir, give no database path or replica URL: the replicas come from --replica-template") }
        if dir == nil && (!replicaTemplate.isEmpty || CommandLine.arguments.contains(where: { $0 == "--pattern" || $0.hasPrefix("--pattern=") })) {
            throw ValidationError("--pattern and --replica-template go with --dir")
        }
        if dir != nil {
            if pattern.isEmpty || pattern.contains("/") { throw ValidationError("--pattern: a pattern matches file names in the directory (like *.db): no '/', not empty") }
            for t in replicaTemplate {
                guard t.contains(DirectoryConfig.namePlaceholder) else {
                    throw ValidationError("--replica-template \(Redact.url(t)): put {name} where the database's file name goes, so that each database has a replica of its own")
                }
                do { try ReplicaBackends.validate(DirectoryConfig.fill(t, name: "example.db")) } catch { throw ValidationError("--replica-template: \(error)") }
            }
            for flag in ["--spool-dir", "--database-id"] where CommandLine.arguments.contains(where: { $0 == flag || $0.hasPrefix(flag + "=") }) {
                throw ValidationError("\(flag) names one database; with --dir each database has its own (its spool beside it, its id drawn on its first run)")
            }
        }
        if config != nil {
            // These have config keys of the same name; silently running with the file's
            // values (or defaults) instead of what was typed would be worse than an error.
            let perDatabase = DatabaseOptions.all.map(\.flag) + ["--spool-dir", "--encryption-key-file", "--database-id"]
            let given = CommandLine.arguments.compactMap { a in perDatabase.first { a == $0 || a.hasPrefix($0 + "=") } }
            if !given.isEmpty {
                throw ValidationError("with --config, set \(given.joined(separator: ", ")) in the file (under defaults: or per database, without the dashes; encryption: key-file: for the key; database-id per database only)")
            }
        }
        _ = try settings(path: "")
        if let d = databaseId { do { _ = try DatabaseID.parse(d) } catch { throw ValidationError("--database-id: \(error)") } }
    }

    func run() throws {
        log.bootstrap()
        let logger = Logger(label: "walship")
        var all: [AgentOptions] = []
        var directories: [DirectoryConfig] = []
        var directoryKeys: [EncryptionKey?] = []
        do {
            var metricsAddress = metricsAddr
            if let file = config {
                let cfg = try ConfigLoader.load(path: file)
                metricsAddress = metricsAddress ?? cfg.metricsAddress
                for d in cfg.databases {
                    all.append(AgentOptions(d, encryptionKey: try loadKey(d.encryptionKeyFile)))
                }
                directories = cfg.directories
                directoryKeys = try directories.map { try loadKey($0.settings.encryptionKeyFile) }
            } else if let d = dir {
                var settings = try settings(path: "")
                settings.replicas = replicaTemplate.map { ReplicaConfig(url: $0, environment: nil) }
                directories = [DirectoryConfig(path: FS.absolute(d), pattern: pattern, settings: settings)]
                directoryKeys = [try loadKey(encryptionKeyFile)]
            } else {
                let db = FS.absolute(database!)
                var d = try settings(path: db)
                d.replicas = (replicas.isEmpty ? [DatabaseConfig.defaultReplicaURL(forDatabase: db)] : replicas).map { ReplicaConfig(url: $0, environment: nil) }
                d.spoolDirectory = spoolDir.map(FS.absolute)
                d.databaseID = try databaseId.map(DatabaseID.parse)
                all.append(AgentOptions(d, encryptionKey: try loadKey(encryptionKeyFile)))
            }
            for d in directories where !FS.isDirectory(d.path) {
                throw ValidationError("directory \(d.path) does not exist (or is not a directory)")
            }
            if let addr = metricsAddress {
                let server = MetricsServer(address: addr)
                try server.start()
                logger.info("serving metrics", metadata: ["metrics.url": "http://\(addr.hasPrefix(":") ? "0.0.0.0" : String(addr[..<addr.lastIndex(of: ":")!])):\(server.port)/metrics"])
                metricsServer = server
            }
        } catch { fail(error) }
        // One agent per database, each on its own thread. A failure of a database named in the
        // command or the file stops the process with its message (a service manager restarts
        // it); a directory's database is retried on its own (see Supervisor).
        let supervisor = Supervisor(logger: logger)
        do {
            for opts in all { try supervisor.start(opts, onFailure: .stopProcess({ fail($0) })) }
        } catch { fail(error) }
        if !directories.isEmpty {
            for d in directories {
                logger.info("watching a directory for databases", metadata: ["dir.path": "\(d.path)", "dir.pattern": "\(d.pattern)"])
            }
            DirectoryWatcher(directories: directories, encryptionKeys: directoryKeys, supervisor: supervisor, logger: logger).run()
        }
        supervisor.waitForAll()
    }
}

/// glibc's mallopt (malloc.h is not in the Glibc module).
@_silgen_name("mallopt") func glibcMallopt(_ param: Int32, _ value: Int32) -> Int32

func oneDecimal(_ v: Double) -> String {
    let tenths = Int64((v * 10).rounded())
    return (tenths < 0 ? "-" : "") + "\(abs(tenths) / 10).\(abs(tenths) % 10)"
}

/// Lives as long as the process.
nonisolated(unsafe) var metricsServer: MetricsServer?


struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Restore a database from a replica, to its latest state or to a point in time.",
        discussion: """
        --timestamp T restores the state after the last transaction whose commit time (as seen by the \
        agent, milliseconds after the real commit) is at or before T. --txid N restores the state right \
        after transaction N. The result is verified against the recorded whole-database checksum and \
        PRAGMA integrity_check, written to a temporary file beside OUT, fsynced and renamed: OUT is \
        never half-written.
        """)

    @Argument(help: "Replica URL to restore from; with --config, the database path from the file.") var replica: String
    @Option(name: [.short, .customLong("output")], help: "Path of the restored database (with --config, default: the database path).") var output: String?
    @Option(help: "YAML config file: restore the database named by the argument from its first healthy replica.") var config: String?
    @OptionGroup var point: RestorePointOptions
    @Flag(help: "Overwrite OUT if it exists.") var force = false
    @Flag(help: "Do nothing (exit 0) if OUT already exists.") var ifNotExists = false
    @Flag(help: "Do nothing (exit 0) if the replica answers and holds nothing yet. Any error reaching it (refused, denied, no such bucket or directory) still fails.") var ifReplicaExists = false
    @Option(help: "Integrity check after restore: full, quick or none.") var integrity: String = "full"
    @OptionGroup var key: ReadKeyOptions
    @OptionGroup var log: LogOptions

    func validate() throws {
        guard IntegrityMode(rawValue: integrity) != nil else { throw ValidationError("--integrity must be full, quick or none") }
        if force && ifNotExists { throw ValidationError("--force and --if-not-exists contradict each other") }
        if config == nil && output == nil { throw ValidationError("give the output path with -o OUT") }
    }

    func run() throws {
        log.bootstrap()
        var o = RestoreOptions()
        o.fast = true
        o.target = try point.target()
        o.force = force; o.ifNotExists = ifNotExists; o.ifReplicaExists = ifReplicaExists
        o.allowUnencrypted = key.allowUnencrypted
        o.integrity = IntegrityMode(rawValue: integrity)!
        o.databaseID = try key.databaseID()
        do {
            var out = output ?? ""
            let r: Replica
            o.encryptionKey = try loadKey(key.encryptionKeyFile)
            if let file = config {
                let db = FS.absolute(replica)
                let d = try configuredDatabase(db, in: file)
                if out.isEmpty { out = d.path }
                // Nothing to do, and no replica needs to answer for it.
                if ifNotExists && FS.exists(FS.absolute(out)) && !FS.isDirectory(FS.absolute(out)) {
                    print("walship: \(FS.absolute(out)) already exists; --if-not-exists leaves it as it is")
                    return
                }
                if o.encryptionKey == nil { o.encryptionKey = try loadKey(d.encryptionKeyFile) }
                if o.databaseID == nil { o.databaseID = d.databaseID }
                r = try firstHealthyReplica(d.replicas)
            } else {
                r = try ReplicaBackends.open(replica)
            }
            let res = try Restorer.restore(replica: r, output: out, options: o) { msg in
                FileHandleStderr.write("walship: \(msg)\n")
            }
            if let s = res.skipped { print("walship: \(s)"); return }
            if let n = res.note { FileHandleStderr.write("walship: note: \(n)\n") }
            print("restored \(FS.absolute(out)): generation \(res.generation) (database \(DatabaseID.text(res.databaseID))), txid \(res.txid), committed \(Timestamp.format(microseconds: res.commitTimeUs)), \(res.transactionsApplied) transaction(s) from \(res.segmentCount) segment(s) after \(res.snapshotKey), checksum \(hex16(res.checksum)) verified, integrity \(o.integrity.rawValue == "none" ? "not checked" : "ok")")
        } catch { fail(error) }
    }
}

/// The point to restore to, shared by `restore` and `verify`.
struct RestorePointOptions: ParsableArguments {
    @Option(help: "Restore to this RFC 3339 time (default: the latest state).") var timestamp: String?
    @Option(help: "Restore to right after this transaction id (default: the latest state).") var txid: UInt64?

    func validate() throws {
        if timestamp != nil && txid != nil { throw ValidationError("give --timestamp or --txid, not both") }
        if let t = timestamp { do { _ = try Timestamp.parseMicroseconds(t) } catch { throw ValidationError("--timestamp: \(error)") } }
    }

    func target() throws -> RestoreTarget {
        if let t = timestamp { return .timeUs(try Timestamp.parseMicroseconds(t)) }
        if let n = txid { return .txid(n) }
        return .latest
    }
}

/// How commands that read a replica get its encryption key.
struct ReadKeyOptions: ParsableArguments {
    @Option(help: ArgumentHelp("The key the replica was encrypted with (32-byte file).", valueName: "path")) var encryptionKeyFile: String?
    @Flag(help: "With a key, also accept objects stored unencrypted (written before encryption was turned on).") var allowUnencrypted = false
    @Option(help: ArgumentHelp("Refuse objects of any other database than this id (16 hex digits, as `walship status` prints it; `database-id` in the config).", valueName: "id"))
    var databaseId: String?

    func validate() throws {
        if let d = databaseId { do { _ = try DatabaseID.parse(d) } catch { throw ValidationError("--database-id: \(error)") } }
    }
    func databaseID() throws -> UInt64? { try databaseId.map(DatabaseID.parse) }
}

/// Pretty, key-sorted JSON on stdout: what `--json` prints.
func printJSON<T: Encodable>(_ value: T, snakeCase: Bool = false) throws {
    let enc = JSONEncoder()
    if snakeCase { enc.keyEncodingStrategy = .convertToSnakeCase }
    enc.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
    print(String(decoding: try enc.encode(value), as: UTF8.self))
}

/// The database `db` (an absolute path) of the config file, read for a command other than
/// `replicate`.
func configuredDatabase(_ db: String, in file: String) throws -> DatabaseConfig {
    guard let d = try ConfigLoader.load(path: file, purpose: .read).database(at: db) else {
        throw ValidationError("\(db) is not a database in \(file) (neither under databases: nor matching a pattern under directories:)")
    }
    return d
}

/// The first replica, in config order, that answers a LIST and holds a generation. When every
/// replica answers and holds nothing, the first one (a restore then finds it empty); when some
/// fail and the rest are empty, nobody can say there is no backup: that is an error.
func firstHealthyReplica(_ replicas: [ReplicaConfig]) throws -> Replica {
    var problems: [String] = []
    var empty: [Replica] = []
    for rc in replicas {
        do {
            let r = try ReplicaBackends.open(rc.url, environment: rc.environment)
            if try r.isEmpty() || listGenerations(r).isEmpty {
                empty.append(r)
                problems.append("\(r.displayURL): holds no backup yet")
                continue
            }
            return r
        } catch { problems.append("\(error)") }
    }
    if let first = empty.first, empty.count == replicas.count { return first }
    throw ValidationError("no healthy replica: " + problems.joined(separator: "; "))
}

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List a replica's generations, snapshots, segments and time ranges.")
    @Argument(help: "Replica URL; with --config, the database path from the file (each of its replicas is listed).") var replica: String
    @Option(help: "YAML config file: list every replica of the database named by the argument, checked against the file's key.") var config: String?
    @Flag(help: "Print JSON (with --config, an object keyed by replica URL).") var json = false
    @Option(help: ArgumentHelp("Check each generation against this key (32-byte file): its id must match the one the generation was encrypted with.", valueName: "path"))
    var encryptionKeyFile: String?

    /// Restore granularity of a generation: exact per transaction, except squashed history.
    static func granularity(_ g: GenerationListing) -> String {
        guard let edge = g.segments.filter(\.squashed).map(\.lastTimeMs).max() else { return "transaction" }
        return "transaction after \(Timestamp.format(milliseconds: edge)); compacted boundaries before"
    }

    func run() throws {
        do {
            var key = try loadKey(encryptionKeyFile)
            guard let file = config else { try list(try ReplicaBackends.open(replica), key: key, json: json); return }
            let d = try configuredDatabase(FS.absolute(replica), in: file)
            if key == nil { key = try loadKey(d.encryptionKeyFile) }
            if json { print("{") }
            for (i, rc) in d.replicas.enumerated() {
                let r = try ReplicaBackends.open(rc.url, environment: rc.environment)
                if json {
                    print("\(try jsonString(r.displayURL)): ", terminator: "")
                    try list(r, key: key, json: true)
                    if i + 1 < d.replicas.count { print(",") }
                } else {
                    if i > 0 { print("") }
                    try list(r, key: key, json: false)
                }
            }
            if json { print("}") }
        } catch { fail(error) }
    }

    /// JSON text of a string (quotes and escapes).
    func jsonString(_ s: String) throws -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.withoutEscapingSlashes]
        return String(decoding: try enc.encode(s), as: UTF8.self)
    }

    func list(_ r: Replica, key: EncryptionKey?, json: Bool) throws {
        do {
            try r.checkReadable()
            let gens = try listGenerations(r)
            var keyNotes: [String: String] = [:]
            if let k = key {
                for g in gens {
                    var bytes: [UInt8] = []
                    try? r.get(key: "generations/\(g.id)/generation.json") { bytes += $0 }
                    let text = String(decoding: bytes, as: UTF8.self)
                    if text.contains("\"encryption_key_id\":\"\(k.idText)\"") { keyNotes[g.id] = "encrypted with this key (id \(k.idText))" }
                    else if text.contains("encryption_key_id") { keyNotes[g.id] = "encrypted with ANOTHER key (this key's id is \(k.idText))" }
                    else if text.isEmpty { keyNotes[g.id] = "no generation.json" }
                    else { keyNotes[g.id] = "not encrypted" }
                }
            }
            if json {
                var out: [[String: AnyEncodable]] = []
                for g in gens {
                    out.append([
                        "generation": AnyEncodable(g.id),
                        "snapshots": AnyEncodable(g.snapshots.map { ["key": $0.key, "txid": "\($0.txid)", "time": Timestamp.format(milliseconds: $0.timeMs)] }),
                        "segments": AnyEncodable(g.segments.map { ["key": $0.key, "first_txid": "\($0.firstTxid)", "last_txid": "\($0.lastTxid)",
                                                                    "first_time": Timestamp.format(milliseconds: $0.firstTimeMs),
                                                                    "last_time": Timestamp.format(milliseconds: $0.lastTimeMs), "level": "\($0.level)",
                                                                    "granularity": $0.squashed ? "boundary" : "transaction"] }),
                        "first_txid": AnyEncodable(g.snapshots.first.map { "\($0.txid)" } ?? ""),
                        "last_txid": AnyEncodable(g.lastTxid.map { "\($0)" } ?? ""),
                        "first_time": AnyEncodable(g.firstTimeMs.map { Timestamp.format(milliseconds: $0) } ?? ""),
                        "last_time": AnyEncodable(g.lastTimeMs.map { Timestamp.format(milliseconds: $0) } ?? ""),
                        "granularity": AnyEncodable(List.granularity(g)),
                        "encryption": AnyEncodable(keyNotes[g.id] ?? ""),
                    ])
                }
                try printJSON(out)
                return
            }
            if gens.isEmpty { print("no generations in \(r.displayURL)"); return }
            print("replica \(r.displayURL)")
            for g in gens {
                let first = g.firstTimeMs.map { Timestamp.format(milliseconds: $0) } ?? "-"
                let last = g.lastTimeMs.map { Timestamp.format(milliseconds: $0) } ?? "-"
                print("generation \(g.id)  txids \(g.snapshots.first.map { "\($0.txid)" } ?? "-")..\(g.lastTxid.map { "\($0)" } ?? "-")  \(first) .. \(last)  \(g.snapshots.count) snapshot(s), \(g.segments.count) segment(s), restore points: \(List.granularity(g))\(keyNotes[g.id].map { ", " + $0 } ?? "")")
                for s in g.snapshots { print("  snapshot txid \(s.txid)  \(Timestamp.format(milliseconds: s.timeMs))  \(s.key)") }
                for s in g.segments {
                    print("  segment  txids \(s.firstTxid)..\(s.lastTxid)  \(Timestamp.format(milliseconds: s.firstTimeMs)) .. \(Timestamp.format(milliseconds: s.lastTimeMs))  level \(s.level)\(s.squashed ? " (boundaries only)" : "")")
                }
            }
        } catch { fail(error) }
    }
}

struct AnyEncodable: Encodable {
    let value: Encodable
    init(_ v: Encodable) { value = v }
    func encode(to encoder: Encoder) throws { try value.encode(to: encoder) }
}

struct Snapshot: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Take a base snapshot now.",
        discussion: "If an agent is replicating DB, it is asked to take the snapshot; otherwise walship takes it, ships it and exits.")
    @Argument(help: "Path of the SQLite database.") var database: String
    @Argument(help: "Replica URLs (default: file://<dir of DB>/<name>-replica; with --config, the file's).") var replicas: [String] = []
    @Option(help: "YAML config file: take DB's replicas, spool, key and database id from it.") var config: String?
    @Option(help: "Spool directory (default: .<name>-walship beside the database).") var spoolDir: String?
    @Option(help: "How long to wait for a running agent.") var timeout: String = "120s"
    @Option(help: ArgumentHelp("Encrypt the snapshot with this key (as `replicate --encryption-key-file`), when no agent runs.", valueName: "path"))
    var encryptionKeyFile: String?
    @Option(help: ArgumentHelp("The database id to record (as `replicate --database-id`), when no agent runs.", valueName: "id"))
    var databaseId: String?
    @OptionGroup var log: LogOptions

    func validate() throws {
        if config != nil && (!replicas.isEmpty || spoolDir != nil || encryptionKeyFile != nil || databaseId != nil) {
            throw ValidationError("with --config, replicas, --spool-dir, --encryption-key-file and --database-id come from the file")
        }
        if let d = databaseId { do { _ = try DatabaseID.parse(d) } catch { throw ValidationError("--database-id: \(error)") } }
    }

    func run() throws {
        log.bootstrap()
        let logger = Logger(label: "walship")
        let db = FS.absolute(database)
        var opts = AgentOptions(databasePath: db, replicaURLs: replicas.isEmpty ? [DatabaseConfig.defaultReplicaURL(forDatabase: db)] : replicas)
        opts.spoolDirectory = spoolDir.map(FS.absolute)
        opts.oneShotSnapshot = true
        do {
            opts.encryptionKey = try loadKey(encryptionKeyFile)
            opts.databaseID = try databaseId.map(DatabaseID.parse)
            if let file = config {
                let d = try configuredDatabase(db, in: file)
                opts.replicaURLs = d.replicas.map(\.url)
                opts.replicaEnvironments = d.replicas.map(\.environment)
                opts.spoolDirectory = d.spoolDirectory
                opts.encryptionKey = try loadKey(d.encryptionKeyFile)
                opts.databaseID = d.databaseID
            }
            guard FS.exists(db) else { throw AgentError.databaseMissing(db) }
            if let pid = SnapshotRequest.runningAgent(database: db, spoolDirectory: opts.spoolDirectory) {
                switch try SnapshotRequest.ask(database: db, spoolDirectory: opts.spoolDirectory, timeoutUs: try parseDuration(timeout, "--timeout")) {
                case .taken: break
                case .failed: throw ValidationError("the running agent (pid \(pid)) could not take the snapshot: see its log (replication goes on)")
                case .timedOut: throw ValidationError("the running agent (pid \(pid)) did not take the snapshot within \(timeout)")
                }
                print("snapshot taken by the running agent (pid \(pid))")
                return
            }
            let agent = Agent(options: opts, logger: logger)
            try agent.start()
            try agent.run()
            if agent.oneShotTookSnapshot || agent.startedGeneration {
                print("snapshot of \(db) at txid \(agent.currentTxid) shipped (generation \(agent.currentGeneration))")
            } else {
                print("nothing committed since the last snapshot (txid \(agent.lastSnapshotTxid), generation \(agent.currentGeneration)): no new snapshot needed")
            }
        } catch { fail(error) }
    }
}


struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a restore drill against a replica; exit 0 when it is healthy, 1 otherwise (for cron).",
        discussion: """
        Restores the latest state (or --timestamp / --txid) into a temporary directory, checks the \
        recorded whole-database checksum and PRAGMA integrity_check, counts the rows of every table, \
        reads every other stored object through (decryption, LZ4 checksums, segment structure), and \
        reports the restorable window. Nothing is written outside the temporary directory.
        """)
    @Argument(help: "Replica URL; with --config, the database path from the file (every replica of it is verified).") var replica: String
    @Option(help: "YAML config file: verify every replica of the database named by the argument, with the file's key and database id.") var config: String?
    @OptionGroup var point: RestorePointOptions
    @Flag(help: "Print the report as JSON (with --config, a list of reports).") var json = false
    @Option(help: "Objects to read through besides the restore: all, segments or none.") var scrub: String = "all"
    @Option(help: "Directory for the temporary restore (default: $TMPDIR or /tmp).") var tempDir: String?
    @OptionGroup var key: ReadKeyOptions
    @OptionGroup var log: LogOptions

    func validate() throws {
        guard ScrubScope(rawValue: scrub) != nil else { throw ValidationError("--scrub must be all, segments or none") }
    }

    func run() throws {
        log.bootstrap()
        let target = try point.target()
        var reports: [VerifyReport] = []
        do {
            var masterKey = try loadKey(key.encryptionKeyFile)
            var databaseID = try key.databaseID()
            let dir = FS.absolute(tempDir ?? ProcessEnvironment.all()["TMPDIR"] ?? "/tmp")
            guard FS.isDirectory(dir) else { throw ValidationError("temporary directory \(dir) does not exist") }
            var replicas: [Replica] = []
            if let file = config {
                let d = try configuredDatabase(FS.absolute(replica), in: file)
                if masterKey == nil { masterKey = try loadKey(d.encryptionKeyFile) }
                if databaseID == nil { databaseID = d.databaseID }
                replicas = try d.replicas.map { try ReplicaBackends.open($0.url, environment: $0.environment) }
            } else {
                replicas = [try ReplicaBackends.open(replica)]
            }
            for r in replicas {
                reports.append(Verifier.run(replica: r, target: target, encryptionKey: masterKey, tempDir: dir, scrub: ScrubScope(rawValue: scrub)!,
                                            allowUnencrypted: key.allowUnencrypted, databaseID: databaseID))
            }
        } catch { fail(error) }
        if json {
            if config != nil { try printJSON(reports) } else { try printJSON(reports[0]) }
        } else {
            for report in reports {
                print("verify \(report.replica): \(report.ok ? "OK" : "FAILED")")
                if let t = report.txid {
                    print("  restored \(report.target): txid \(t) of generation \(report.generation ?? "-") (database \(report.databaseID ?? "-")), committed \(report.commitTime ?? "-"), checksum \(report.checksum ?? "-") verified, integrity \(report.integrity ?? "-")")
                    print("  tables: " + report.tables.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
                }
                print("  restorable window: \(report.oldestRestorable ?? "-") (txid \(report.oldestTxid.map { "\($0)" } ?? "-")) .. \(report.newestRestorable ?? "-") (txid \(report.newestTxid.map { "\($0)" } ?? "-"))")
                print("  objects checked: \(report.objectsChecked) in \(oneDecimal(report.seconds)) s")
                for p in report.problems { print("  problem: \(p)") }
                for n in report.notes { print("  note: \(n)") }
            }
        }
        let failed = reports.filter { !$0.ok }
        if let first = failed.first {
            FileHandleStderr.write("walship: error: verify failed\(reports.count > 1 ? " for \(failed.count) of \(reports.count) replicas" : ""): \(first.problems.first ?? "unknown problem")\n")
            Glibc.exit(1)
        }
    }
}

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a running agent's replication status (lag, last sync, shipped, errors, drills).",
        discussion: "Reads the status the agent keeps in its spool (rewritten when it changes, and every 10 s while the agent runs). Exits 0 when an agent is running for every database, 3 otherwise.")
    @Argument(help: "Path of the SQLite database (omit with --config).") var database: String?
    @Option(help: "YAML config file: show every database in it.") var config: String?
    @Option(help: "Spool directory (default: .<name>-walship beside the database).") var spoolDir: String?
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        if (config == nil) == (database == nil) { throw ValidationError("give a database path, or --config FILE") }
    }

    struct Entry: Encodable {
        var database: String
        var running: Bool
        var pid: Int32?
        var status: StatusReport?
    }

    func run() throws {
        var entries: [Entry] = []
        do {
            var dbs: [(String, String?)] = []
            if let file = config {
                let cfg = try ConfigLoader.load(path: file, purpose: .read)
                dbs = cfg.databases.map { ($0.path, $0.spoolDirectory) }
                // A directory's databases: those in it now.
                for d in cfg.directories {
                    for name in try d.databasesPresent() where !dbs.contains(where: { $0.0 == d.path + "/" + name }) {
                        dbs.append((d.path + "/" + name, nil))
                    }
                }
            } else {
                dbs = [(FS.absolute(database!), spoolDir.map(FS.absolute))]
            }
            for (db, spool) in dbs {
                if config == nil && !FS.exists(db) { throw AgentError.databaseMissing(db) }
                let pid = SnapshotRequest.runningAgent(database: db, spoolDirectory: spool)
                let report = try StatusFile.read(spool: StatusFile.spoolDirectory(forDatabase: db, configured: spool))
                entries.append(Entry(database: db, running: pid != nil, pid: pid, status: report))
            }
        } catch { fail(error) }
        if json {
            // snake_case like `list`, versioned: {"format_version": 1, "databases": [...]}.
            struct Output: Encodable { var formatVersion = 1; var databases: [Entry] }
            try printJSON(Output(databases: entries), snakeCase: true)
        } else {
            let now = Double(nowMicroseconds()) / 1e6
            func ago(_ t: Double) -> String { t <= 0 ? "never" : "\(oneDecimal(max(0, now - t)))s ago" }
            for e in entries {
                guard let r = e.status else {
                    let note = FS.exists(e.database) ? "" : " (the database file does not exist)"
                    print("\(e.database): \(e.running ? "agent running (pid \(e.pid!)), no status yet" : "no agent running, and no status recorded")\(note)")
                    continue
                }
                let head = e.running ? "agent running (pid \(e.pid!))" : "NO AGENT RUNNING (last status \(ago(r.updatedUnix)))"
                print("\(e.database): \(head), generation \(r.generation), database id \(r.databaseID ?? "-"), txid \(r.txid), last commit \(ago(r.lastCommitUnix))")
                let cps = r.checkpoints.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")
                print("  WAL \(ByteSize.format(Int64(r.walBytes))), spool \(ByteSize.format(Int64(r.spoolBytes))), last snapshot \(ago(r.lastSnapshotUnix)), checkpoints: \(cps.isEmpty ? "none yet" : cps)")
                for rep in r.replicas {
                    let reqs = rep.requests.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: " ")
                    var line = "  replica \(rep.url): lag \(oneDecimal(rep.lagSeconds))s, last sync \(ago(rep.lastSyncUnix)), shipped \(rep.shippedObjects) objects / \(ByteSize.format(Int64(rep.shippedBytes))), requests: \(reqs.isEmpty ? "none" : reqs)"
                    if let ok = rep.verifyOK { line += ", drill \(ok ? "passed" : "FAILED") \(ago(rep.verifyUnix ?? 0))" }
                    print(line)
                    if let err = rep.lastError { print("    failing since \(ago(rep.failingSinceUnix ?? 0)): \(err)") }
                    if !rep.errors.isEmpty { print("    errors: " + rep.errors.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")) }
                }
                if !r.errors.isEmpty { print("  errors: " + r.errors.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", ")) }
            }
        }
        if entries.contains(where: { !$0.running }) { Glibc.exit(3) }
    }
}

// One clear line on every error, exit 1; --help and --version print as usual.
// A peer that closes early (a metrics scraper, a webhook) must not kill the process.
signal(SIGPIPE, SIG_IGN)
// Memory: buffers of 128 KiB and more (LZ4 blocks, read buffers) are mapped and unmapped
// instead of staying in the heap once freed (glibc otherwise raises this threshold as it
// goes), and the few threads share two malloc arenas rather than one each.
_ = glibcMallopt(-3 /* M_MMAP_THRESHOLD */, 128 * 1024)
_ = glibcMallopt(-8 /* M_ARENA_MAX */, 2)
// One process may replicate thousands of databases, each with about a dozen open files: the
// soft limit on open files (often 1,024) is raised towards the hard limit the process was
// given, up to 1,048,576 (some containers allow far more than any fleet needs).
var openFiles = rlimit()
if getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &openFiles) == 0 && openFiles.rlim_cur < min(openFiles.rlim_max, 1 << 20) {
    openFiles.rlim_cur = min(openFiles.rlim_max, 1 << 20)
    _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &openFiles)
}
// The replica backends beside the built-in directory one: each registers its URL scheme.
S3Backend.register()
do {
    var command = try Walship.parseAsRoot()
    try command.run()
} catch {
    if Walship.exitCode(for: error) == .success { Walship.exit(withError: error) }
    let message = Walship.message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
    // Point at the help of the subcommand that was typed, if one was.
    let names = Walship.configuration.subcommands.map { $0._commandName }
    let help = CommandLine.arguments.dropFirst().first(where: names.contains).map { "walship \($0) --help" } ?? "walship --help"
    FileHandleStderr.write("walship: error: \(message) (see `\(help)`)\n")
    exit(1)
}
