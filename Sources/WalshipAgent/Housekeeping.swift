#if canImport(Glibc)
import Glibc
#endif
import Logging
import WalshipFormat
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// Compaction jobs that failed (retention still ran).
struct HousekeepingError: Error, CustomStringConvertible {
    let problems: [String]
    var description: String { problems.count == 1 ? problems[0] : "\(problems.count) compaction jobs failed; first: \(problems[0])" }
}

/// Retention and compaction for one replica, carried out from plans made on a LIST
/// (WalshipFormat's RetentionPlanner and CompactionPlanner). Runs on the replica's shipper
/// queue, so it never races that replica's uploads.
final class Housekeeper {
    struct Settings {
        var retentionUs: Int64
        var compactionLevelsUs: [Int64]
        var fineWindowUs: Int64
        /// A compaction window is closed this long after its end.
        var settleUs: Int64
        var encryptionKey: EncryptionKey?
        /// The first level this housekeeper builds (the agent builds level 1 in its spool).
        var fromLevel = 2
    }

    struct Outcome { var deleted = 0; var compacted = 0; var written = 0 }

    let replica: Replica
    let workDir: String
    let settings: Settings
    let logger: Logger
    /// Asked between jobs: true once shutdown has begun (the work left is done next time).
    var shouldStop: () -> Bool = { false }

    /// Housekeeping stopped early because the agent is shutting down.
    struct Stopped: Error {}

    init(replica: Replica, workDir: String, settings: Settings, logger: Logger) {
        self.replica = replica; self.workDir = workDir; self.settings = settings; self.logger = logger
    }

    /// The snapshot retention last checked before keeping it as the oldest (on this queue only).
    private var checkedBase: String?

    /// Compaction, then retention, over the generations up to `currentGeneration` (the agent's;
    /// any that sort after it are not its own and are left alone). A job that fails (an object
    /// sealed with an older key, a damaged one) is skipped and reported; retention runs
    /// whatever happened before it.
    func run(nowUs: Int64 = nowMicroseconds(), currentGeneration: String) throws -> Outcome {
        var outcome = Outcome()
        var problems: [String] = []
        let foreign = try listGenerations(replica).filter { $0.id > currentGeneration }.map(\.id)
        if !foreign.isEmpty {
            logger.warning("the replica holds generations that sort after this agent's current one; they are not its own and are left alone",
                           metadata: ["replica.url": "\(replica.displayURL)", "generations": "\(foreign.prefix(3).joined(separator: ", "))",
                                      "generation": "\(currentGeneration)"])
        }
        if !settings.compactionLevelsUs.isEmpty {
            for g in try listGenerations(replica) where g.id <= currentGeneration {
                let firstSnapshot = g.snapshots.first?.txid ?? 0
                let jobs = CompactionPlanner.plan(g, levelsMs: settings.compactionLevelsUs.map { $0 / 1000 }, nowMs: nowUs / 1000,
                                                  fineCutoffMs: (nowUs - settings.fineWindowUs) / 1000,
                                                  settleMs: settings.settleUs / 1000, afterTxid: firstSnapshot,
                                                  fromLevel: settings.compactionLevelsUs.count == 1 ? 1 : settings.fromLevel)
                for job in jobs {
                    if shouldStop() { throw Stopped() }
                    do {
                        try compact(job, pageSize: nil)
                        outcome.compacted += job.inputs.count + job.covered.count
                        outcome.written += 1
                    } catch {
                        problems.append("compacting \(job.output.key): \(error)")
                        if error is EncryptionError { break }   // the whole generation has the other key
                    }
                }
            }
        }
        if shouldStop() { throw Stopped() }
        let plan = RetentionPlanner.plan(try listGenerations(replica), cutoffMs: (nowUs - settings.retentionUs) / 1000,
                                         newestGeneration: currentGeneration)
        if !plan.deleteKeys.isEmpty, let base = plan.oldestKept, base.key != checkedBase {
            // Everything older goes only once the snapshot kept in its place proves to be one.
            do { try checkSnapshot(base) } catch {
                throw HousekeepingError(problems: problems + ["retention deletes nothing: the snapshot it would keep, \(base.key), is not a valid snapshot there: \(error)"])
            }
            checkedBase = base.key
        }
        if !plan.deleteKeys.isEmpty {
            try replica.delete(keys: plan.deleteKeys)
            outcome.deleted = plan.deleteKeys.count
            logger.info("retention deleted old objects", metadata: ["replica.url": "\(replica.displayURL)", "objects": "\(plan.deleteKeys.count)",
                                                                  "oldest.snapshot": "\(plan.oldestKept?.key ?? "-")"])
        }
        if !problems.isEmpty { throw HousekeepingError(problems: problems) }
        return outcome
    }

    /// Reads a snapshot's metadata and checks it against its name. With a key, the whole
    /// object is read: only its final tag authenticates the metadata.
    private func checkSnapshot(_ name: SnapshotName) throws {
        let key = settings.encryptionKey
        _ = try streamObject(replica, key: name.key, expect: .snapshot, encryption: key, onMetadata: { m in
            if let why = m.mismatch(snapshot: name) { throw ObjectError(key: name.key, replica: self.replica.displayURL, problem: why) }
            if key == nil { throw StopStreaming() }
        }) { _ in }
    }

    /// Builds the job's output from its inputs, uploads it, then deletes what it replaces.
    func compact(_ job: CompactionJob, pageSize: Int?) throws {
        let out = job.output
        let path = workDir + "/compact-\(hex16(XXH64.hash(Array(replica.displayURL.utf8)))).part"
        let builder = try ObjectBuilder(path: path, key: settings.encryptionKey)
        defer { builder.abandon() }
        try SegmentMerger.merge(job.inputs, from: replica, into: builder, output: out, squash: job.squash,
                                encryption: settings.encryptionKey)
        try replica.put(key: out.key, fromFile: path)
        try replica.delete(keys: (job.inputs + job.covered).map(\.key))
        logger.debug("compacted segments", metadata: ["replica.url": "\(replica.displayURL)", "segment.key": "\(out.key)",
                                                     "inputs": "\(job.inputs.count)", "squashed": "\(job.squash)"])
    }
}

/// Re-encodes a run of segments as one: every transaction as it was, or (squash) one record
/// holding the last version of each page, applied as a whole.
final class SegmentMerger {
    /// Reads `inputs` from `replica` (each under `storedKey(input)`), merges them into `builder`
    /// and finishes it as `output`, which must span exactly the txids read. Both compaction
    /// paths go through here: level 1 from the spool's links, later levels from a replica.
    static func merge(_ inputs: [SegmentName], from replica: Replica, storedKey: (SegmentName) -> String = { $0.key },
                      into builder: ObjectBuilder, output: SegmentName, squash: Bool, encryption: EncryptionKey?) throws {
        let merger = try SegmentMerger(builder: builder, squash: squash, scratch: builder.path + ".pages")
        defer { merger.close() }
        // The merged object starts when its first input starts. (Its first record's time is
        // not that when the input is squashed: a squashed record carries the time of the
        // last commit it holds.)
        var firstTimeUs: Int64?
        var databaseID: UInt64?   // every input must come from the same database as the first
        for input in inputs {
            var decoder = SegmentDecoder(name: input.key)
            try streamObject(replica, key: storedKey(input), expect: .segment, encryption: encryption, onMetadata: { m in
                if let why = m.mismatch(segment: input) { throw ObjectError(key: input.key, replica: replica.displayURL, problem: why) }
                if let d = databaseID, let why = m.mismatch(database: d) {
                    throw ObjectError(key: input.key, replica: replica.displayURL, problem: "\(why), as \(inputs[0].key) it would be merged with does")
                }
                if firstTimeUs == nil { firstTimeUs = m.firstTimeUs }
                if (databaseID ?? 0) == 0 { databaseID = m.databaseID }
            }) { chunk in
                try decoder.feed(chunk) { ev in try merger.handle(ev, object: input.key) }
            }
            try decoder.finish()
        }
        let m = try merger.finish()
        guard m.firstTxid == output.firstTxid, m.lastTxid == output.lastTxid else {
            throw ObjectError(key: output.key, replica: replica.displayURL,
                              problem: "merged txids \(m.firstTxid)-\(m.lastTxid), expected \(output.firstTxid)-\(output.lastTxid)")
        }
        var meta = ObjectMetadata(kind: .segment, pageSize: m.pageSize, firstTxid: m.firstTxid, lastTxid: m.lastTxid,
                                  firstTimeUs: firstTimeUs ?? m.firstTimeUs, lastTimeUs: m.lastTimeUs, dbPages: m.dbPages,
                                  transactionCount: m.records, dbChecksum: m.checksum, payloadBytes: 0,
                                  generation: output.generation)
        meta.databaseID = databaseID ?? 0
        // Never write an object that readers would refuse under its name.
        if let why = meta.mismatch(segment: output) {
            throw ObjectError(key: output.key, replica: replica.displayURL, problem: "would be written with metadata that \(why)")
        }
        try builder.finish(meta)
    }

    static func windowPages(pageSize: Int) -> Int { max(16, (1 << 20) / pageSize) }

    struct Summary {
        var pageSize = 0, firstTxid: UInt64 = 0, lastTxid: UInt64 = 0, firstTimeUs: Int64 = 0, lastTimeUs: Int64 = 0
        var dbPages: UInt32 = 0, checksum: UInt64 = 0, records: UInt32 = 0
    }
    private let builder: ObjectBuilder
    private var encoder: SegmentEncoder?
    private let squash: Bool
    private var summary = Summary()
    private var started = false
    private var current: TransactionHeader?
    // Squash state: the last version of each page in a scratch file, slot by page number.
    private var scratch: RawFile?
    private let scratchPath: String
    private var slots: [UInt32: Int] = [:]
    private var freeSlots: [Int] = []
    private var sawFirst = false
    private var minPages = UInt32.max

    init(builder: ObjectBuilder, squash: Bool, scratch: String) throws {
        self.builder = builder; self.squash = squash; self.scratchPath = scratch
        if squash { self.scratch = try RawFile(path: scratch, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600) }
    }

    func close() { if scratch != nil { try? FS.remove(scratchPath) } }

    func handle(_ ev: SegmentDecoder.Event, object: String) throws {
        switch ev {
        case .begin(let ps):
            if !started {
                summary.pageSize = ps; started = true
                let b = builder
                // A smaller window than the agent's: merges run beside it, and its memory is
                // what a merge adds to the agent's peak.
                encoder = try SegmentEncoder(pageSize: ps, windowPages: SegmentMerger.windowPages(pageSize: ps)) { try b.write($0) }
            } else if ps != summary.pageSize {
                throw FormatError.corrupt("\(object): page size \(ps) differs from \(summary.pageSize)")
            }
        case .transaction(let t):
            if !sawFirst { sawFirst = true; summary.firstTxid = t.txid; summary.firstTimeUs = t.commitTimeUs }
            else if t.txid != summary.lastTxid + 1 { throw FormatError.corrupt("\(object): txid \(t.txid) does not follow \(summary.lastTxid)") }
            current = t
            if let m = t.truncateFirstTo { dropPages(above: m) }
            if !squash { try encoder!.transaction(t) }
        case .page(let pg, let bytes):
            if squash {
                let slot: Int
                if let s = slots[pg] { slot = s } else {
                    slot = freeSlots.popLast() ?? slots.count
                    slots[pg] = slot
                }
                try scratch!.write(at: slot * summary.pageSize, bytes)
            } else {
                try encoder!.page(pg, bytes)
            }
        case .commit(let sum):
            guard let t = current else { return }
            summary.lastTxid = t.lastTxid; summary.lastTimeUs = t.commitTimeUs
            summary.dbPages = t.dbPages; summary.checksum = sum
            if squash {
                dropPages(above: t.dbPages)
            } else {
                try encoder!.commit(checksum: sum)
                summary.records += 1
            }
            current = nil
        case .end:
            break
        }
    }

    /// A page beyond a truncation is gone (zero if the database grows back without writing it).
    private func dropPages(above pages: UInt32) {
        minPages = min(minPages, pages)
        guard squash else { return }
        for (pg, slot) in slots where pg > pages { slots[pg] = nil; freeSlots.append(slot) }
    }

    func finish() throws -> Summary {
        guard let encoder else { throw FormatError.corrupt("no segment to merge") }
        if squash {
            let pages = slots.keys.sorted()
            try encoder.transaction(TransactionHeader(
                squashing: summary.firstTxid, through: summary.lastTxid, commitTimeUs: summary.lastTimeUs,
                dbPages: summary.dbPages, pageCount: UInt32(pages.count), truncateFirstTo: min(minPages, summary.dbPages)))
            var buf = [UInt8](repeating: 0, count: summary.pageSize)
            for pg in pages {
                _ = try buf.withUnsafeMutableBytes { try scratch!.read(at: slots[pg]! * summary.pageSize, into: $0) }
                try buf.withUnsafeBytes { try encoder.page(pg, $0) }
            }
            try encoder.commit(checksum: summary.checksum)
            summary.records = 1
        }
        try encoder.finish(transactionCount: summary.records, lastTxid: summary.lastTxid, dbChecksum: summary.checksum)
        return summary
    }
}
