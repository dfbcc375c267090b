#if canImport(Glibc)
import Glibc
#endif
import WalshipFormat
import WalshipSQLite
import WalshipStorage
import WalshipSystem

/// The result of a restore drill (`walship verify`, or the agent's --verify-interval).
public struct VerifyReport: Codable, Sendable {
    public var ok = false
    public var replica: String
    public var target: String
    public var generation: String?
    public var txid: UInt64?
    public var commitTime: String?
    public var checksum: String?
    /// The database id the restored generation's objects carry.
    public var databaseID: String?
    public var integrity: String?
    public var tables: [String: Int] = [:]
    public var oldestRestorable: String?
    public var newestRestorable: String?
    public var oldestTxid: UInt64?
    public var newestTxid: UInt64?
    public var objectsChecked = 0
    public var problems: [String] = []
    /// Things worth knowing that are not failures (objects of older generations sealed with
    /// another key, for example).
    public var notes: [String] = []
    public var seconds: Double = 0

    public init(replica: String, target: String) { self.replica = replica; self.target = target }
}

public enum ScrubScope: String, Sendable { case all, segments, none }

public enum Verifier {
    /// Restores `target` into `tempDir`, checks the recorded checksum and integrity_check,
    /// counts rows per table, reads every other object of the replica to check it decodes
    /// (`scrub`), and reports the restorable window. Never throws: problems go in the report.
    public static func run(replica: Replica, target: RestoreTarget, encryptionKey: EncryptionKey?, tempDir: String,
                           scrub: ScrubScope = .all, allowUnencrypted: Bool = false, databaseID: UInt64? = nil) -> VerifyReport {
        let start = monotonicMicroseconds()
        var report = VerifyReport(replica: replica.displayURL, target: target.description)
        defer { report.seconds = Double(monotonicMicroseconds() - start) / 1e6 }
        let gens: [GenerationListing]
        do {
            try replica.checkReadable()
            gens = try listGenerations(replica)
        } catch {
            report.problems.append("\(error)")
            return report
        }
        let withSnapshots = gens.filter { !$0.snapshots.isEmpty }
        if let oldest = withSnapshots.first?.snapshots.first {
            report.oldestRestorable = Timestamp.format(microseconds: oldest.timeMs * 1000 + 999)   // as the planner rounds
            report.oldestTxid = oldest.txid
        }
        if let newest = withSnapshots.last {
            report.newestRestorable = newest.lastTimeMs.map { Timestamp.format(milliseconds: $0) }
            report.newestTxid = newest.lastTxid
        }
        // A private directory (unguessable name, 0700) holds the scratch restore and every
        // sidecar SQLite makes for it: nothing planted in a shared temp directory is opened.
        let work: String
        do { work = try FS.makePrivateDirectory(beside: tempDir + "/walship-verify") } catch {
            report.problems.append("\(error)")
            return report
        }
        defer { FS.removeTree(work) }
        let out = work + "/verify.db"
        var options = RestoreOptions()
        options.target = target
        options.integrity = .full
        options.encryptionKey = encryptionKey
        options.allowUnencrypted = allowUnencrypted
        options.databaseID = databaseID
        var restoredSnapshot = ""
        do {
            let r = try Restorer.restore(replica: replica, output: out, options: options)
            report.generation = r.generation
            report.txid = r.txid
            report.commitTime = Timestamp.format(microseconds: r.commitTimeUs)
            report.checksum = hex16(r.checksum)
            report.databaseID = DatabaseID.text(r.databaseID)
            report.integrity = "ok"
            report.objectsChecked += 1 + r.segmentCount
            restoredSnapshot = r.snapshotKey
            let db = try SQLiteConnection(path: out, mode: .readOnly)
            defer { db.close() }
            let names = try db.query("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%' ORDER BY name").compactMap { $0.first ?? nil }
            for n in names {
                let quoted = "\"" + n.replacingAll("\"", with: "\"\"") + "\""
                report.tables[n] = Int(try db.queryScalar("SELECT count(*) FROM \(quoted)") ?? "0") ?? 0
            }
        } catch {
            report.problems.append("restore of \(target) failed: \(error)")
        }
        if scrub != .none {
            for g in gens {
                // Every object of a generation belongs to the database of its first one read.
                var generationDatabase: UInt64?
                var objects: [(String, ObjectKind)] = g.segments.map { ($0.key, .segment) }
                if scrub == .all { objects += g.snapshots.filter { $0.key != restoredSnapshot }.map { ($0.key, .snapshot) } }
                for (key, kind) in objects {
                    do {
                        let m = try checkObject(replica, key: key, kind: kind, encryptionKey: encryptionKey, allowUnencrypted: allowUnencrypted)
                        report.objectsChecked += 1
                        if let expected = generationDatabase, let why = m.mismatch(database: expected) {
                            report.problems.append("\(ObjectError(key: key, replica: replica.displayURL, problem: "\(why), like the rest of generation \(g.id)"))")
                        }
                        if generationDatabase == nil, let pinned = databaseID, m.mismatch(database: pinned) != nil {
                            report.notes.append("generation \(g.id) belongs to database \(DatabaseID.text(m.databaseID)), not \(DatabaseID.text(pinned)): restores with --database-id leave it out")
                        }
                        if (generationDatabase ?? 0) == 0 { generationDatabase = m.databaseID }
                    } catch ReplicaError.missingObject(_, _) {
                        continue   // deleted by retention or compaction since the listing
                    } catch let e as EncryptionError where g.id != report.generation {
                        // An older generation written before a key change: not restorable with
                        // this key, which is worth saying, but the replica is not damaged.
                        report.notes.append("generation \(g.id): \(e)")
                        break
                    } catch {
                        report.problems.append("\(error)")
                    }
                }
            }
        }
        report.ok = report.problems.isEmpty
        return report
    }

    /// Reads one object through: metadata, decryption, LZ4 content checksum, and for a
    /// segment its structure and trailer.
    @discardableResult
    static func checkObject(_ replica: Replica, key: String, kind: ObjectKind, encryptionKey: EncryptionKey?, allowUnencrypted: Bool) throws -> ObjectMetadata {
        var decoder = SegmentDecoder(name: key)
        var bytes: UInt64 = 0
        let meta = try streamObject(replica, key: key, expect: kind, encryption: encryptionKey, allowUnencrypted: allowUnencrypted, onMetadata: { m in
            if let why = m.mismatch(key: key) { throw ObjectError(key: key, replica: replica.displayURL, problem: why) }
        }) { chunk in
            bytes += UInt64(chunk.count)
            if kind == .segment { try decoder.feed(chunk) { _ in } }
        }
        if kind == .segment {
            do { try decoder.finish() } catch { throw ObjectError(key: key, replica: replica.displayURL, problem: "is truncated (\(error))") }
        }
        guard bytes == meta.payloadBytes else {
            throw ObjectError(key: key, replica: replica.displayURL, problem: "holds \(bytes) payload bytes, its metadata says \(meta.payloadBytes)")
        }
        return meta
    }
}
