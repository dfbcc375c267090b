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
    @Option(help: ArgumentHelp("Keep one status file for the whole process here, read by `walship status --status-file` (default with --dir: <dir>/.walship-status.json; a directory's databases then keep none in their spools).", valueName: "path"))
    var statusFile: String?
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
                if let problem = DirectoryConfig.templateProblem(t) {
                    throw ValidationError("--replica-template \(Redact.url(t)): \(problem)")
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
        if !Agent.prepareSQLiteForManyConnections() {
            logger.debug("SQLite was in use already: its page caches are allocated ahead of need")
        }
        var all: [AgentOptions] = []
        var directories: [DirectoryConfig] = []
        var directoryKeys: [EncryptionKey?] = []
        var processStatusFile: String?
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
                processStatusFile = statusFile.map(FS.absolute) ?? cfg.statusFile
            } else if let d = dir {
                var settings = try settings(path: "")
                settings.replicas = replicaTemplate.map { ReplicaConfig(url: $0, environment: nil) }
                directories = [DirectoryConfig(path: FS.absolute(d), pattern: pattern, settings: settings)]
                directoryKeys = [try loadKey(encryptionKeyFile)]
                processStatusFile = statusFile.map(FS.absolute) ?? ProcessStatusFile.defaultPath(forDirectory: FS.absolute(d))
            } else {
                let db = FS.absolute(database!)
                var d = try settings(path: db)
                d.replicas = (replicas.isEmpty ? [DatabaseConfig.defaultReplicaURL(forDatabase: db)] : replicas).map { ReplicaConfig(url: $0, environment: nil) }
                d.spoolDirectory = spoolDir.map(FS.absolute)
                d.databaseID = try databaseId.map(DatabaseID.parse)
                all.append(AgentOptions(d, encryptionKey: try loadKey(encryptionKeyFile)))
                processStatusFile = statusFile.map(FS.absolute)
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
        // One agent per database, all on the supervisor's worker pool. A failure of a database named in the
        // command or the file stops the process with its message (a service manager restarts
        // it); a directory's database is retried on its own (see Supervisor).
        let supervisor = Supervisor(logger: logger)
        do {
            for opts in all { try supervisor.start(opts, onFailure: .stopProcess({ fail($0) })) }
        } catch { fail(error) }
        for d in directories {
            logger.info("watching a directory for databases", metadata: ["dir.path": "\(d.path)", "dir.pattern": "\(d.pattern)"])
        }
        var watcher: DirectoryWatcher?
        if !directories.isEmpty || processStatusFile != nil {
            let w = DirectoryWatcher(directories: directories, encryptionKeys: directoryKeys, supervisor: supervisor,
                                     statusFile: processStatusFile, logger: logger)
            watcher = w
            w.run()
        }
        supervisor.waitForAll()
        watcher?.writeFinalStatus()
    }
}

/// glibc's mallopt (malloc.h is not in the Glibc module).
