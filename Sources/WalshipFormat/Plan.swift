// Restore planning from object names alone (a LIST, no GET): which generation, which
// snapshot, which segments, in order, and where to stop.

public enum RestoreTarget: Equatable, Sendable, CustomStringConvertible {
    case latest
    case txid(UInt64)
    case timeUs(Int64)

    public var description: String {
        switch self {
        case .latest: return "the latest state"
        case .txid(let n): return "transaction \(n)"
        case .timeUs(let t): return Timestamp.format(microseconds: t)
        }
    }
}

public struct GenerationListing: Sendable {
    public var id: String
    public var snapshots: [SnapshotName]
    public var segments: [SegmentName]
    public init(id: String, snapshots: [SnapshotName], segments: [SegmentName]) {
        self.id = id
        self.snapshots = snapshots.sorted { $0.txid < $1.txid }
        self.segments = segments.sorted { $0.firstTxid != $1.firstTxid ? $0.firstTxid < $1.firstTxid : $0.lastTxid > $1.lastTxid }
    }
    public var lastTxid: UInt64? {
        let a = segments.map(\.lastTxid).max(), b = snapshots.map(\.txid).max()
        switch (a, b) { case let (x?, y?): return max(x, y); case let (x?, nil): return x; case let (nil, y): return y }
    }
    public var firstTimeMs: Int64? { snapshots.map(\.timeMs).min() }
    public var lastTimeMs: Int64? {
        let a = segments.map(\.lastTimeMs).max(), b = snapshots.map(\.timeMs).max()
        switch (a, b) { case let (x?, y?): return max(x, y); case let (x?, nil): return x; case let (nil, y): return y }
    }
}

public struct RestorePlan: Sendable {
    public var generation: String
    public var snapshot: SnapshotName
    public var segments: [SegmentName]
    public var target: RestoreTarget
    /// The txid the plan reaches when applied to its end (for latest and txid targets).
    public var reachesTxid: UInt64
}

public enum PlanError: Error, CustomStringConvertible, Equatable {
    case emptyReplica
    case noSnapshot(String)
    case beforeHistory(RestoreTarget, String)
    case beyondHistory(RestoreTarget, UInt64)
    case gap(generation: String, afterTxid: UInt64, nextTxid: UInt64?)

    public var description: String {
        switch self {
        case .emptyReplica:
            return "the replica holds no generation: nothing has been replicated there yet (check the URL, or start `walship replicate`)"
        case .noSnapshot(let g):
            return "generation \(g) has no snapshot yet, so it cannot be restored; an older generation may serve (use --timestamp or --txid)"
        case .beforeHistory(let t, let oldest):
            return "\(t) is before the oldest restorable point of this replica (\(oldest))"
        case .beyondHistory(let t, let last):
            return "\(t) is beyond the newest transaction in the replica (txid \(last))"
        case .gap(let g, let after, let next):
            let n = next.map { "the next object starts at txid \($0)" } ?? "no object follows"
            return "generation \(g) has a gap after txid \(after): \(n). A segment is missing from the replica; restore to an earlier point (--txid \(after)) or from another replica"
        }
    }
}

public enum RestorePlanner {
    /// Generations are given in any order; ids sort by creation time.
    public static func plan(_ generations: [GenerationListing], target: RestoreTarget) throws -> RestorePlan {
        let gens = generations.sorted { $0.id > $1.id }   // newest first
        guard !gens.isEmpty else { throw PlanError.emptyReplica }
        switch target {
        case .latest:
            guard let g = gens.first(where: { !$0.snapshots.isEmpty }) else { throw PlanError.noSnapshot(gens[0].id) }
            return try chain(g, from: g.snapshots.last!, target: target)
        case .txid(let n):
            for g in gens {
                guard let snap = g.snapshots.last(where: { $0.txid <= n }) else { continue }
                guard let last = g.lastTxid, last >= n else {
                    if g.id == gens.first(where: { !$0.snapshots.isEmpty })?.id { throw PlanError.beyondHistory(target, g.lastTxid ?? 0) }
                    continue
                }
                return try chain(g, from: snap, target: target)
            }
            let oldest = gens.last(where: { !$0.snapshots.isEmpty })?.snapshots.first.map { "txid \($0.txid)" } ?? "none"
            throw PlanError.beforeHistory(target, oldest)
        case .timeUs(let t):
            for g in gens {
                // A snapshot certainly at or before t: its whole millisecond is <= t.
                guard let snap = g.snapshots.last(where: { $0.timeMs * 1000 + 999 <= t }) else { continue }
                return try chain(g, from: snap, target: target)
            }
            let oldest = gens.last(where: { !$0.snapshots.isEmpty })?.snapshots.first
                .map { Timestamp.format(microseconds: $0.timeMs * 1000 + 999) } ?? "none"
            throw PlanError.beforeHistory(target, oldest)
        }
    }

    /// Picks segments from `snap` onward: at each step, among segments starting right after
    /// the position, the one reaching furthest without passing the target (fewest objects),
    /// else the smallest one that crosses it.
    static func chain(_ g: GenerationListing, from snap: SnapshotName, target: RestoreTarget) throws -> RestorePlan {
        var pos = snap.txid
        var picked: [SegmentName] = []
        var byFirst: [UInt64: [SegmentName]] = [:]
        for s in g.segments where s.lastTxid > snap.txid { byFirst[s.firstTxid, default: []].append(s) }
        let newest = g.lastTxid ?? snap.txid
        loop: while true {
            if case .txid(let n) = target, pos >= n { break }
            let candidates = byFirst[pos + 1] ?? []
            if candidates.isEmpty {
                let next = g.segments.filter { $0.firstTxid > pos }.min { $0.firstTxid < $1.firstTxid }
                switch target {
                case .latest, .txid:
                    // Anything newer than pos that no segment continues to is a gap.
                    if newest > pos { throw PlanError.gap(generation: g.id, afterTxid: pos, nextTxid: next?.firstTxid) }
                case .timeUs(let t):
                    if let n = next, n.firstTimeMs * 1000 <= t {
                        throw PlanError.gap(generation: g.id, afterTxid: pos, nextTxid: n.firstTxid)
                    }
                }
                break loop
            }
            var choice: SegmentName?
            switch target {
            case .latest:
                choice = candidates.max { $0.lastTxid < $1.lastTxid }
            case .txid(let n):
                choice = candidates.filter { $0.lastTxid <= n }.max { $0.lastTxid < $1.lastTxid }
                    ?? candidates.min { $0.lastTxid < $1.lastTxid }
            case .timeUs(let t):
                let whole = candidates.filter { $0.lastTimeMs * 1000 + 999 <= t }
                if let w = whole.max(by: { $0.lastTxid < $1.lastTxid }) { choice = w }
                else if let c = candidates.filter({ $0.firstTimeMs * 1000 <= t }).min(by: { $0.lastTxid < $1.lastTxid }) {
                    picked.append(c); pos = c.lastTxid; break loop   // the target lies inside c
                } else { break loop }
            }
            guard let c = choice else { break }
            picked.append(c)
            pos = c.lastTxid
        }
        return RestorePlan(generation: g.id, snapshot: snap, segments: picked, target: target, reachesTxid: pos)
    }
}
