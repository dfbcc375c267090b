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
