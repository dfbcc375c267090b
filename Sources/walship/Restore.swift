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
