#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import Logging
import WalshipFormat
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// Uploads the spool's outbox to one replica, strictly in sequence order, on its own queue.
/// A replica that fails is retried with capped exponential backoff and jitter; it delays
/// only itself (G7). Its acknowledged sequence is kept in the spool.
final class Shipper {
    let replica: Replica
    let id: String
    private let spool: Spool
    private let logger: Logger
    private let queue: DispatchQueue
    private let mutex = Mutex()
    private var _acked: UInt64
    private var _limit: UInt64 = 0
    private var _lastError: String?
    private var _lastSuccessUs: Int64 = 0
    private var _failingSinceUs: Int64?
    private var _housekeepingPending = false
    /// Told about every failed upload, and every failed deletion (for the error counters).
    var onError: (() -> Void)?
    var onHousekeepingError: (() -> Void)?
    private var _running = false
    private var _stopping = false
    private var _uploads = 0
    private var _bytes: UInt64 = 0
    /// Set when this replica's backlog was dropped (spool over its limit): its objects of that
    /// generation are skipped, and the agent starts a new generation once it answers again.
    private var _droppedGeneration: String?
    private var _reachableAgain = false
    /// Why the backlog was dropped, for the new generation's reason (nil: the spool limit).
    private var _dropReason: String?
    /// The generation of the last object this replica acknowledged (its generation.json was
    /// acknowledged before it: objects ship in order).
    private var _lastShippedGeneration: String?
    /// The generation this replica was last found able to take the next object of (checked
    /// once per generation and process, on this queue only).
    private var positionCheckedGeneration: String?

    init(replica: Replica, spool: Spool, logger: Logger) {
        self.replica = replica
        self.id = hex16(XXH64.hash(Array(replica.displayURL.utf8)))
        self.spool = spool
        self.logger = logger
        self.queue = DispatchQueue(label: "walship.ship.\(id)")
        self._acked = spool.loadAck(id)
        self._droppedGeneration = spool.loadDropped(id)
    }

    var acked: UInt64 { mutex.locked { _acked } }
    var droppedGeneration: String? { mutex.locked { _droppedGeneration } }
    var reachableAgain: Bool { mutex.locked { _reachableAgain } }
    var dropReason: String? { mutex.locked { _dropReason } }

    /// Gives up this replica's backlog up to `sequence` (it stays failing and the spool is
    /// over its limit). Persisted like an acknowledgement.
    func dropBacklog(through sequence: UInt64, generation: String) {
        mutex.locked {
            _acked = max(_acked, sequence)
            _droppedGeneration = generation
            _reachableAgain = false
            _dropReason = nil
        }
        try? spool.saveAck(id, sequence)
        spool.saveDropped(id, generation)
    }

    /// While the backlog is dropped: checks whether the replica answers again.
    func probe() {
        guard droppedGeneration != nil, !reachableAgain else { return }
        queue.async {
            if (try? self.replica.put(key: replicaMarkerKey, bytes: Array("{\"format\":\"walship-replica\",\"version\":1}\n".utf8))) != nil {
                self.mutex.locked { self._reachableAgain = true }
            }
        }
    }
    var lastError: String? { mutex.locked { _lastError } }
    var lastSuccessUs: Int64 { mutex.locked { _lastSuccessUs } }
    /// When uploads started failing without a success since (nil when healthy).
    var failingSinceUs: Int64? { mutex.locked { _failingSinceUs } }

    /// Runs `body` on this replica's queue, after the uploads queued before it; skipped while
    /// an earlier one is still waiting.
    func housekeeping(_ body: @escaping () -> Void) {
        let go: Bool = mutex.locked {
            if _housekeepingPending { return false }
            _housekeepingPending = true
            return true
        }
        guard go else { return }
        queue.async {
            body()
            self.mutex.locked { self._housekeepingPending = false }
        }
    }
    var uploads: (count: Int, bytes: UInt64) { mutex.locked { (_uploads, _bytes) } }

    /// Ships every outbox entry with a sequence below `limit` (entries the state vouches for).
    func kick(limit: UInt64) {
        let start: Bool = mutex.locked {
            _limit = max(_limit, limit)
            if _running { return false }
            _running = true
            return true
        }
        if start { queue.async { self.drain() } }
    }

    func stop() { mutex.locked { _stopping = true } }
    var isStopping: Bool { mutex.locked { _stopping } }

    /// Stops, then waits until nothing runs on this replica's queue: neither an upload nor
    /// housekeeping (which notices the stop between jobs). Nothing may outlive shutdown.
    func stopAndWait() {
        stop()
        queue.sync {}
    }

    private func drain() {
        var backoffMs = 250
        while true {
            let (limit, acked, stopping) = mutex.locked { (_limit, _acked, _stopping) }
            let entries: [Spool.OutboxEntry]
            do { entries = try spool.outboxEntries().filter { $0.sequence > acked && $0.sequence < limit } } catch {
                logger.error("cannot read the spool outbox", metadata: ["error": "\(error)"])
                entries = []
            }
            if entries.isEmpty {
                let done: Bool = mutex.locked {
                    if _limit == limit { _running = false; return true }
                    return false
                }
                if done { return }
                continue
            }
            var failed = false
            for e in entries {
                // Shutdown waits for the upload under way, not for a whole backlog.
                if isStopping { mutex.locked { _running = false }; return }
                if let dropped = droppedGeneration {
                    if e.key.hasPrefix("generations/\(dropped)/") || e.key.hasPrefix(Spool.deletionPrefix + "generations/\(dropped)/") {
                        mutex.locked { _acked = e.sequence }   // part of the dropped backlog
                        try? spool.saveAck(id, e.sequence)
                        continue
                    }
                    if e.key.hasPrefix("generations/") {
                        mutex.locked { _droppedGeneration = nil; _reachableAgain = false }
                        spool.saveDropped(id, nil)
                    }
                }
                do {
                    if !e.key.hasPrefix(Spool.deletionPrefix), let object = ObjectKey.parse(e.key),
                       object.generation != positionCheckedGeneration {
                        if let hole = try missingBase(before: object) {
                            lostGeneration(object.generation, through: mutex.locked { _acked }, because: hole)
                            failed = true
                            break
                        }
                        positionCheckedGeneration = object.generation
                    }
                    if e.key.hasPrefix(Spool.deletionPrefix) {
                        // Objects replaced by a compacted one shipped just before. A failure
                        // (a bucket that forbids deletes, say) must not hold up the uploads
                        // behind it: the objects stay, and retention removes them later.
                        let keys = String(decoding: try FS.readAll(e.path), as: UTF8.self).split(separator: "\n").map(String.init)
                        do { try replica.delete(keys: keys) } catch {
                            onHousekeepingError?()
                            logger.warning("could not delete segments replaced by a compacted one; they stay until retention removes them",
                                           metadata: ["replica.url": "\(replica.displayURL)", "error": "\(error)"])
                        }
                    } else {
                        try replica.put(key: e.key, fromFile: e.path)
                        if let g = ObjectKey.parse(e.key)?.generation { mutex.locked { _lastShippedGeneration = g } }
                    }
                    try spool.saveAck(id, e.sequence)
                    let uploaded = !e.key.hasPrefix(Spool.deletionPrefix)
                    let size = uploaded ? UInt64(FS.fileSize(e.path) ?? 0) : 0
                    mutex.locked {
                        _acked = e.sequence; _lastError = nil; _lastSuccessUs = nowMicroseconds(); _failingSinceUs = nil
                        if uploaded { _uploads += 1; _bytes += size }
                    }
                    backoffMs = 250
                } catch ReplicaError.generationVanished(_, let gen) {
                    lostGeneration(gen, through: e.sequence)
                    failed = true
                    break
                } catch {
                    let msg = "\(error)"
                    let first = mutex.locked { () -> Bool in
                        let f = _lastError == nil
                        _lastError = msg
                        if _failingSinceUs == nil { _failingSinceUs = nowMicroseconds() }
                        return f
                    }
                    onError?()
                    if first {
                        logger.error("upload failed; retrying with backoff", metadata: ["replica.url": "\(replica.displayURL)", "object.key": "\(e.key)", "error": "\(msg)"])
                    }
                    failed = true
                    break
                }
            }
            if failed {
                if stopping { mutex.locked { _running = false }; return }
                let jitter = Int.random(in: 0...(backoffMs / 2))
                // Slept in slices, so that shutdown never waits out a long backoff.
                let until = monotonicMicroseconds() + Int64(backoffMs + jitter) * 1000
                while monotonicMicroseconds() < until && !isStopping { usleep(20_000) }
                if isStopping { mutex.locked { _running = false }; return }
                backoffMs = min(backoffMs * 2, 30_000)
            }
        }
    }

    /// The replica lost the base of the chain: what follows would be unrestorable. Its
    /// backlog of that generation goes (the rest of it is skipped as it comes), and the agent
    /// starts a new generation (a snapshot first), as for a replica that returns after its
    /// backlog was dropped.
    private func lostGeneration(_ gen: String, through sequence: UInt64,
                                because why: String = "the replica lost the current generation (deleted under the agent?)") {
        onError?()
        logger.error("\(why); a new generation with a snapshot follows",
                     metadata: ["replica.url": "\(replica.displayURL)", "generation": "\(gen)"])
        dropBacklog(through: sequence, generation: gen)
        mutex.locked { _reachableAgain = true; _dropReason = why; _lastError = "generation \(gen): \(why)"; if _failingSinceUs == nil { _failingSinceUs = nowMicroseconds() } }
    }

    /// Before the first object of a generation this process ships here (unless it is the
    /// generation's own generation.json, which starts it): whether the replica holds what the
    /// object builds on. A replica added to the list, one that missed objects while others
    /// took them, or one emptied while the agent was stopped would otherwise take segments
    /// that no restore can use. Nil when it holds the base and an unbroken chain up to the
    /// object; otherwise what is missing. One LIST of the generation.
    private func missingBase(before object: ObjectKey) throws -> String? {
        let needTxid: UInt64?
        switch object {
        case .generationInfo: return nil
        case .snapshot: needTxid = nil
        case .segment(let s): needTxid = s.firstTxid - 1
        }
        let gen = object.generation
        var hasInfo = false
        var snaps: [SnapshotName] = [], segs: [SegmentName] = []
        for key in try replica.list(prefix: "generations/\(gen)/") {
            switch ObjectKey.parse(key) {
            case .generationInfo?: hasInfo = true
            case .snapshot(let s)? where s.generation == gen: snaps.append(s)
            case .segment(let s)? where s.generation == gen: segs.append(s)
            default: break
            }
        }
        // A listing that came back without it may be one that could not look (a directory
        // that cannot be read): only a check that fails on such errors counts it as gone.
        if !hasInfo, try replica.contains(key: "generations/\(gen)/generation.json") { hasInfo = true }
        guard hasInfo else { return "the replica does not hold generation \(gen) (added to the replica list, or emptied, while the agent was away)" }
        guard let need = needTxid else { return nil }
        guard !snaps.isEmpty else { return "the replica holds no snapshot of generation \(gen)" }
        do {
            let plan = try RestorePlanner.plan([GenerationListing(id: gen, snapshots: snaps, segments: segs)], target: .latest)
            if plan.reachesTxid >= need { return nil }
            return "the replica's chain of generation \(gen) ends at txid \(plan.reachesTxid), and the next object it would take starts at \(need + 1) (it missed objects while the agent shipped to other replicas)"
        } catch let e as PlanError {
            return "the replica's chain of generation \(gen) is broken (\(e))"
        }
    }

    /// On this replica's queue (from housekeeping): the generation the agent ships into must
    /// still have its generation.json once this replica acknowledged an object of it. An
    /// object store emptied under the agent (an operator, a lifecycle rule) takes new
    /// segments without complaint, so only a look finds it. True when it is there (or not
    /// yet checkable).
    func checkGenerationStillThere(_ gen: String) throws -> Bool {
        let (shipped, dropped, acked) = mutex.locked { (_lastShippedGeneration, _droppedGeneration, _acked) }
        guard shipped == gen, dropped == nil else { return true }
        if try replica.contains(key: "generations/\(gen)/generation.json") { return true }
        lostGeneration(gen, through: acked)
        return false
    }

    /// Waits until everything below `limit` is acknowledged, or the deadline passes.
    /// Looks at least once, even with the deadline passed (the process's shutdown deadline is
    /// shared by agents that stop in turn: one with nothing left is not reported as lacking).
    func waitUntilShipped(limit: UInt64, deadlineUs: Int64) -> Bool {
        while true {
            if acked >= limit - 1 || (try? spool.outboxEntries().filter({ $0.sequence > acked && $0.sequence < limit }).isEmpty) == true {
                return true
            }
            if monotonicMicroseconds() >= deadlineUs { return false }
            usleep(5_000)
        }
    }
}
