#if canImport(Glibc)
import Glibc
#endif
import WalshipFormat
import WalshipSQLite
import WalshipStorage
import WalshipSystem

public enum IntegrityMode: String, CaseIterable, Sendable {
    case full, quick, none
}

public struct RestoreOptions {
    public var target: RestoreTarget = .latest
    public var force = false
    public var ifNotExists = false
    public var ifReplicaExists = false
    public var integrity: IntegrityMode = .full
    /// The key encrypted objects were sealed with.
    public var encryptionKey: EncryptionKey?
    /// With a key: also accept objects stored in the clear (before encryption was turned on).
    public var allowUnencrypted = false
    /// The database the replica must belong to (`--database-id`). Without it, the snapshot's
    /// id is taken, and every segment applied after it must carry the same.
    public var databaseID: UInt64?
    /// For the `restore` command: build the database through a memory mapping (RestoreOutput).
    /// Drills and `verify` keep plain writes: a mapping's I/O errors are signals.
    public var fast = false
    public init() {}
}

/// Errors of the restore domain. Each says what to do about it.
public enum RestoreError: Error, CustomStringConvertible {
    case outputExists(String)
    case outputDirectoryMissing(String)
    case outputIsDirectory(String)
    case checksumMismatch(expected: UInt64, actual: UInt64, after: String)
    case integrityFailed(String)
    case chainBroken(String)
    case noRoom(String)

    public var description: String {
        switch self {
        case .outputExists(let p): return "\(p) already exists; pass --force to overwrite it, or --if-not-exists to keep it"
        case .outputIsDirectory(let p): return "\(p) is a directory; -o names the database file to write (for example \(p)/app.db)"
        case .outputDirectoryMissing(let p): return "the output directory \(p) does not exist; create it first"
        case .checksumMismatch(let e, let a, let after):
            return "restored database checksum \(hex16(a)) does not match the recorded \(hex16(e)) after \(after): the replica is corrupt; nothing was written"
        case .integrityFailed(let s): return "PRAGMA integrity_check failed on the restored database: \(s); nothing was written"
        case .chainBroken(let s): return s
        case .noRoom(let s): return "\(s): free some space, or restore elsewhere (-o)"
        }
    }
}

/// A generation whose snapshot records another database than the one asked for.
struct ForeignGeneration: Error {
    let generation: String
    let databaseID: UInt64
}

public struct RestoreResult: Sendable {
    public var skipped: String?
    public var generation = ""
    public var txid: UInt64 = 0
    public var commitTimeUs: Int64 = 0
    public var snapshotKey = ""
    public var segmentCount = 0
    public var transactionsApplied = 0
    public var bytesDownloaded: UInt64 = 0
    public var dbPages: UInt32 = 0
    public var pageSize = 0
    public var checksum: UInt64 = 0
    public var databaseID: UInt64 = 0
    /// Something the user should know about the point reached (a compacted range).
    public var note: String?
}

public enum Restorer {
    public static func restore(replica: Replica, output: String, options: RestoreOptions,
                               log: (String) -> Void = { _ in }) throws -> RestoreResult {
        let out = FS.absolute(output)
        // Checked before anything else: a directory is neither "an existing database" for
        // --if-not-exists nor something a restore can replace.
        if FS.isDirectory(out) { throw RestoreError.outputIsDirectory(out) }
        if FS.exists(out) {
            if options.ifNotExists { return RestoreResult(skipped: "\(out) already exists; --if-not-exists leaves it as it is") }
            if !options.force { throw RestoreError.outputExists(out) }
        }
        let dir = FS.dirname(out)
        guard FS.isDirectory(dir) else { throw RestoreError.outputDirectoryMissing(dir) }
        if options.ifReplicaExists {
            // Only a replica that answers and holds nothing counts as absent. A refused
            // connection, a wrong secret or a missing bucket is an error: starting the
            // application on an empty database would lose the data.
            if try replica.isEmpty() || listGenerations(replica).isEmpty {
                return RestoreResult(skipped: "the replica \(replica.displayURL) holds no backup yet; --if-replica-exists leaves \(out) absent")
            }
        }
        try replica.checkReadable()
        // With --database-id, generations of another database are left out (named on the
        // log); the plan is made from the rest.
        var foreign: [String: UInt64] = [:]
        var listed: [GenerationListing] = []
        func makePlan() throws -> RestorePlan {
            let gens = try listGenerations(replica).filter { foreign[$0.id] == nil }
            listed = gens
            do { return try RestorePlanner.plan(gens, target: options.target) } catch let e as PlanError where !foreign.isEmpty {
                let others = foreign.sorted { $0.key < $1.key }.map { "\($0.key) (database \(DatabaseID.text($0.value)))" }
                throw RestoreError.chainBroken("\(e), among the generations of database \(DatabaseID.text(options.databaseID ?? 0)); the replica's other generations belong to other databases: \(others.joined(separator: ", "))")
            }
        }
        var plan = try makePlan()
        log("restoring \(options.target) from generation \(plan.generation): snapshot \(plan.snapshot.key) and \(plan.segments.count) segment(s)")

        // Everything is built in a private directory beside the output (unguessable name,
        // 0700): in a shared directory nobody can plant a file or link where it writes.
        let work = try FS.makePrivateDirectory(beside: out)
        let tmp = work + "/restore.db"
        func cleanup() {
            for p in [tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"] { try? FS.remove(p) }
            FS.removeTree(tmp + "-segments")
        }
        defer { FS.removeTree(work) }
        do {
            var result: RestoreResult
            var vanished = false
            while true {
                do {
                    result = try build(replica: replica, plan: plan, into: tmp, options: options)
                    break
                } catch let f as ForeignGeneration {
                    log("generation \(f.generation) belongs to database \(DatabaseID.text(f.databaseID)), not \(DatabaseID.text(options.databaseID ?? 0)) (--database-id): leaving it out")
                    foreign[f.generation] = f.databaseID
                } catch ReplicaError.missingObject(let r, let key) {
                    // Retention or compaction removed an object after the listing: plan once more.
                    if vanished {
                        throw RestoreError.chainBroken("object '\(key)' in \(r) vanished during the restore, twice: retention or compaction keeps changing the replica; retry the restore")
                    }
                    vanished = true
                    log("object \(key) vanished during the restore (retention or compaction replaced it); planning again")
                }
                cleanup()
                plan = try makePlan()
            }
            try verifyIntegrity(tmp, mode: options.integrity)
            cleanup_sidecars(tmp)
            let f = try RawFile(path: tmp, flags: O_RDWR)
            try f.sync()
            for p in [out + "-wal", out + "-shm"] { try FS.remove(p) }   // a stale WAL would be replayed onto the restore
            try FS.rename(tmp, out)
            try FS.syncDirectory(dir)
            result.generation = plan.generation
            // A time after everything the replica holds gives its latest state: say so, since
            // commits after it may not have reached the replica (or the clock is off).
            if case .timeUs(let ts) = options.target, ts > result.commitTimeUs,
               let newest = listed.filter({ !$0.snapshots.isEmpty }).max(by: { $0.id < $1.id }),
               newest.id == plan.generation, result.txid == newest.lastTxid {
                let after = "the time asked for is after the newest commit the replica holds (txid \(result.txid), \(Timestamp.format(microseconds: result.commitTimeUs))): this is its latest state"
                result.note = result.note.map { $0 + "; " + after } ?? after
            }
            return result
        } catch {
            cleanup()
            throw error
        }
    }

    static func cleanup_sidecars(_ p: String) { for s in ["-wal", "-shm", "-journal"] { try? FS.remove(p + s) } }

    /// Writes the snapshot and applies transactions into `tmp`, then checks the checksum.
    static func build(replica: Replica, plan: RestorePlan, into tmp: String, options: RestoreOptions) throws -> RestoreResult {
        var result = RestoreResult()
        // 0600: a decrypted database must not be readable by others while it is being built
        // (the restored file keeps it; chmod it for the application).
        let file = try RawFile(path: tmp, flags: O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode: 0o600)
        // Remote replicas: download segments ahead, in parallel, while the snapshot
        // streams and earlier segments are applied.
        var prefetcher: SegmentPrefetcher?
        if replica.readsAhead, !plan.segments.isEmpty {
            prefetcher = try SegmentPrefetcher(keys: plan.segments.map(\.key), dir: tmp + "-segments") {
                try replica.anotherHandle()
            }
        }
        defer { prefetcher?.finish() }
        // Objects are read, checked and decompressed on a thread of their own, one after
        // another, while this thread applies the ones before (ObjectReadAhead).
        var jobs = [ObjectReadAhead.Job(key: plan.snapshot.key, kind: .snapshot) { replica }]
        for (index, seg) in plan.segments.enumerated() {
            jobs.append(ObjectReadAhead.Job(key: seg.key, kind: .segment) {
                guard let p = prefetcher else { return replica }
                return try p.object(index, original: replica)
            })
        }
        let reader = try ObjectReadAhead(jobs: jobs, encryption: options.encryptionKey, allowUnencrypted: options.allowUnencrypted)
        defer {   // before the prefetcher's files go (defers run last first)
            prefetcher?.abandon()
            reader.cancel()
        }
        /// Takes the next object's metadata and payload from the reader. Errors thrown by the
        /// handlers are reported as reading the object reports them. Returns nil when
        /// `payload` stopped early (StopStreaming): the rest of the object is not wanted.
        func take(_ key: String, onMetadata: (ObjectMetadata) throws -> Void,
                  payload: (UnsafeRawBufferPointer) throws -> Void) throws -> ObjectMetadata? {
            while true {
                switch reader.next() {
                case .failed(let e): throw e
                case .metadata(let m):
                    do { try onMetadata(m) } catch { throw objectReadError(error, key: key, replica: replica) }
                case .payload(let bytes):
                    do { try bytes.withUnsafeBytes { try payload($0) } } catch is StopStreaming { return nil } catch {
                        throw objectReadError(error, key: key, replica: replica)
                    }
                    reader.recycle(bytes)
                case .end(let m): return m
                }
            }
        }

        var offset = 0
        var foreignID: UInt64?
        // Every byte read is checked by its LZ4 frame's checksum, also in a fast restore: a
        // damaged object is one error that names it, even where later history would have
        // overwritten the damage, and commit times (outside the whole-database checksum) are
        // covered too.
        let snapMeta = try take(plan.snapshot.key, onMetadata: { m in
            if let why = m.mismatch(snapshot: plan.snapshot) {
                throw ObjectError(key: plan.snapshot.key, replica: replica.displayURL, problem: why)
            }
            if let pinned = options.databaseID, m.mismatch(database: pinned) != nil {
                // Encrypted metadata is authentic only once the whole object has been read:
                // a generation is left out only for what the key vouches for.
                foreignID = m.databaseID
                if !m.isEncrypted { throw ForeignGeneration(generation: plan.generation, databaseID: m.databaseID) }
            }
        }) { chunk in
            try file.write(at: offset, chunk)
            offset += chunk.count
        }!
        if let id = foreignID { throw ForeignGeneration(generation: plan.generation, databaseID: id) }
        result.bytesDownloaded += UInt64(offset)
        guard snapMeta.lastTxid == plan.snapshot.txid, UInt64(offset) == snapMeta.payloadBytes,
              offset == Int(snapMeta.dbPages) * snapMeta.pageSize else {
            throw ObjectError(key: plan.snapshot.key, replica: replica.displayURL,
                              problem: "does not match its metadata (txid \(snapMeta.lastTxid), \(offset) bytes for \(snapMeta.dbPages) pages)")
        }
        let pageSize = snapMeta.pageSize
        let databaseID = snapMeta.databaseID
        result.databaseID = databaseID
        var applied = snapMeta.lastTxid
        var expectedChecksum = snapMeta.dbChecksum
        var commitTime = snapMeta.lastTimeUs
        var dbPages = snapMeta.dbPages
        var describe = "snapshot \(plan.snapshot.key)"
        result.snapshotKey = plan.snapshot.key
        let output = try RestoreOutput(file: file, pageSize: pageSize, pages: Int(dbPages), map: options.fast)

        segments: for (index, seg) in plan.segments.enumerated() {
            var decoder = SegmentDecoder(name: seg.key)
            var current: TransactionHeader?
            var skipping = false
            var reachedTarget = false
            // With a key, the object is read to its end even past the target: only its final
            // tag authenticates the whole of it, metadata included. Without one, reading stops.
            let readToEnd = options.encryptionKey != nil
            let meta = try take(seg.key, onMetadata: { m in
                if let why = m.mismatch(segment: seg) { throw ObjectError(key: seg.key, replica: replica.displayURL, problem: why) }
                if let why = m.mismatch(database: databaseID) {
                    throw ObjectError(key: seg.key, replica: replica.displayURL, problem: "\(why), whose snapshot \(plan.snapshot.key) it would be applied to")
                }
                guard m.pageSize == pageSize else {
                    throw ObjectError(key: seg.key, replica: replica.displayURL, problem: "has page size \(m.pageSize), the snapshot \(pageSize)")
                }
            }) { chunk in
                result.bytesDownloaded += UInt64(chunk.count)
                try decoder.feed(chunk) { event in
                    if reachedTarget { return }
                    switch event {
                    case .begin(let ps):
                        guard ps == pageSize else { throw FormatError.corrupt("page size \(ps), expected \(pageSize)") }
                    case .transaction(let t):
                        if t.lastTxid <= applied { skipping = true; return }
                        skipping = false
                        guard t.txid == applied + 1 else {
                            throw RestoreError.chainBroken("object '\(seg.key)' holds txid \(t.txid) but the restore is at \(applied): the chain has a gap")
                        }
                        switch options.target {
                        case .txid(let n) where t.lastTxid > n:
                            if t.txid <= n {
                                throw RestoreError.chainBroken("transaction \(n) lies inside the compacted range \(t.txid)-\(t.lastTxid) (object '\(seg.key)'), older than the fine window: the nearest restore points are txids \(t.txid - 1) and \(t.lastTxid)")
                            }
                            reachedTarget = true
                            if readToEnd { return } else { throw StopStreaming() }
                        case .timeUs(let ts) where t.commitTimeUs > ts:
                            if t.isSquashed && t.txid > applied {
                                result.note = "\(Timestamp.format(microseconds: ts)) lies in the compacted range of txids \(t.txid)-\(t.lastTxid) (older than the fine window, restore points only at its ends): restored to its start, txid \(applied)"
                            }
                            reachedTarget = true
                            if readToEnd { return } else { throw StopStreaming() }
                        default: break
                        }
                        if let m = t.truncateFirstTo { try output.truncate(toPages: Int(m)) }
                        current = t
                    case .page(let pgno, let bytes):
                        // A page beyond the size the record leaves is cut off when it ends.
                        guard !skipping, let t = current, pgno <= t.dbPages else { return }
                        try output.write(page: pgno, bytes)
                    case .commit(let sum):
                        if skipping { return }
                        guard let t = current else { return }
                        try output.truncate(toPages: Int(t.dbPages))
                        applied = t.lastTxid; expectedChecksum = sum; commitTime = t.commitTimeUs; dbPages = t.dbPages
                        result.transactionsApplied += Int(t.lastTxid - t.txid + 1)
                        current = nil
                    case .end:
                        break
                    }
                }
            }
            if !reachedTarget || readToEnd {
                do { try decoder.finish() } catch {
                    throw ObjectError(key: seg.key, replica: replica.displayURL, problem: "is truncated (\(error))")
                }
                // (meta is nil only after a stop at the target, which does not come here)
                if let meta = meta, meta.lastTxid != seg.lastTxid || meta.firstTxid != seg.firstTxid {
                    throw ObjectError(key: seg.key, replica: replica.displayURL, problem: "holds txids \(meta.firstTxid)-\(meta.lastTxid), not what its name says")
                }
            }
            // Read to its end: the reader is done with its copy. (After a stop or an error the
            // reader may still be in it; the copies go once it has stopped.)
            if meta != nil { prefetcher?.release(index) }
            result.segmentCount += 1
            describe = "txid \(applied) (object '\(seg.key)')"
            if reachedTarget { break segments }
        }
        if case .txid(let n) = options.target, applied != n {
            throw RestoreError.chainBroken("transaction \(n) is not in the replica (restore reached \(applied))")
        }
        try output.finish(pages: Int(dbPages))
        let actual = try checksumOfFile(file, pageSize: pageSize)
        guard actual == expectedChecksum else {
            throw RestoreError.checksumMismatch(expected: expectedChecksum, actual: actual, after: describe)
        }
        result.txid = applied; result.commitTimeUs = commitTime; result.dbPages = dbPages
        result.pageSize = pageSize; result.checksum = actual
        return result
    }

    /// Recomputes the whole-database checksum of a file in one pass.
    static func checksumOfFile(_ file: RawFile, pageSize: Int) throws -> UInt64 {
        let size = try file.size()
        let pages = size / pageSize
        let lockPage = DatabaseChecksum.lockBytePage(pageSize: pageSize)
        var sum: UInt64 = 0
        let batch = max(1, (1 << 20) / pageSize)
        var buf = [UInt8](repeating: 0, count: batch * pageSize)
        var pg = 1
        while pg <= pages {
            let n = min(batch, pages - pg + 1)
            let got = try buf.withUnsafeMutableBytes { try file.read(at: (pg - 1) * pageSize, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n * pageSize])) }
            guard got == n * pageSize else { throw SystemError(errno: EIO, context: "short read of \(file.path)") }
            buf.withUnsafeBytes { b in
                for i in 0..<n where UInt32(pg + i) != lockPage {
                    sum ^= DatabaseChecksum.pageHash(UnsafeRawBufferPointer(rebasing: b[i * pageSize..<(i + 1) * pageSize]), pageNumber: UInt32(pg + i))
                }
            }
            pg += n
        }
        return sum
    }

    static func verifyIntegrity(_ path: String, mode: IntegrityMode) throws {
        guard mode != .none else { return }
        let db = try SQLiteConnection(path: path, mode: .readWrite)
        let rows = try db.query(mode == .full ? "PRAGMA integrity_check" : "PRAGMA quick_check")
        let lines = rows.compactMap { $0.first ?? nil }
        db.close()
        guard lines == ["ok"] else { throw RestoreError.integrityFailed(lines.prefix(5).joined(separator: "; ")) }
    }
}
