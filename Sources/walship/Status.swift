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

struct Status: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Show a running agent's replication status (lag, last sync, shipped, errors, drills).",
        discussion: """
        Reads the status the agent keeps in its spool (rewritten when it changes, and every 10 s \
        while the agent runs), or the one status file of a whole process: --dir DIR reads \
        DIR/.walship-status.json, which `replicate --dir DIR` keeps; --status-file PATH, or a config \
        file with status-file:, reads that file. Exits 0 when an agent is running for every \
        database, 3 otherwise.
        """)
    @Argument(help: "Path of the SQLite database (omit with --config, --dir or --status-file).") var database: String?
    @Option(help: "YAML config file: show every database in it.") var config: String?
    @Option(help: ArgumentHelp("Show every database of `replicate --dir DIR` (from its status file).", valueName: "dir")) var dir: String?
    @Option(help: ArgumentHelp("Show every database of the process that keeps this status file (`replicate --status-file`).", valueName: "path")) var statusFile: String?
    @Option(help: "Spool directory (default: .<name>-walship beside the database).") var spoolDir: String?
    @Flag(help: "Print JSON.") var json = false

    func validate() throws {
        let given = [database != nil, config != nil, dir != nil, statusFile != nil].filter { $0 }.count
        if given != 1 { throw ValidationError("give one of: a database path, --config FILE, --dir DIR, --status-file PATH") }
    }

    /// The entries from a process's status file: every database in it, or those of `only`.
    func fromProcessFile(_ path: String, only: [String]? = nil) throws -> [Entry] {
        guard let ps = try ProcessStatusFile.read(path) else {
            throw ValidationError("no status file at \(path): no `walship replicate` keeps one there (is it running, with --dir or --status-file?)")
        }
        let running = ps.fresh
        let byPath = Dictionary(ps.databases.map { ($0.database, $0) }, uniquingKeysWith: { a, _ in a })
        let names = only ?? ps.databases.map(\.database)
        return names.map { db in
            let r = byPath[db] ?? byPath[FS.resolved(db)]
            return Entry(database: db, running: running && r != nil, pid: running && r != nil ? ps.pid : nil, status: r)
        }
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
            if let d = dir {
                entries = try fromProcessFile(ProcessStatusFile.defaultPath(forDirectory: FS.absolute(d)))
            } else if let f = statusFile {
                entries = try fromProcessFile(FS.absolute(f))
            } else if let file = config {
                let cfg = try ConfigLoader.load(path: file, purpose: .read)
                dbs = cfg.databases.map { ($0.path, $0.spoolDirectory) }
                // A directory's databases: those in it now.
                for d in cfg.directories {
                    for name in try d.databasesPresent() where !dbs.contains(where: { $0.0 == d.path + "/" + name }) {
                        dbs.append((d.path + "/" + name, nil))
                    }
                }
                if let f = cfg.statusFile {
                    entries = try fromProcessFile(f, only: dbs.map(\.0))
                    dbs = []
                }
            } else {
                dbs = [(FS.absolute(database!), spoolDir.map(FS.absolute))]
            }
            for (db, spool) in dbs {
                if database != nil && !FS.exists(db) { throw AgentError.databaseMissing(db) }
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
                var head = e.running ? "agent running (pid \(e.pid!))" : "NO AGENT RUNNING (last status \(ago(r.updatedUnix)))"
                if r.failing { head += ", FAILING" } else if r.lagging { head += ", LAGGING" }
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
