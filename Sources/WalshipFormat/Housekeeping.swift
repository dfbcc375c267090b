// Pure planning for a replica's housekeeping, from a LIST alone: which objects retention
// deletes, and which segments compaction merges. The agent carries the plans out.

public enum CompactionLevels {
    /// "5m,1h" → window sizes of levels 1 and 2; "off" or "" → no compaction. Each window must
    /// be a whole multiple of the one below, so windows nest.
    public static func parse(_ text: String) throws -> [Int64] {
        let t = text.trimmedSpaces
        if t.isEmpty || t == "off" || t == "none" { return [] }
        var out: [Int64] = []
        for part in t.split(separator: ",") {
            let us = try DurationText.parseMicroseconds(part.trimmedSpaces)
            guard us >= 1_000_000 else { throw FormatError.invalidArgument("compaction windows must be at least 1s, got '\(part)'") }
            if let last = out.last, us <= last || us % last != 0 {
                throw FormatError.invalidArgument("compaction windows must grow, each a whole multiple of the one before ('\(text)')")
            }
            out.append(us)
        }
        return out
    }

    public static func format(_ levels: [Int64]) -> String {
        levels.isEmpty ? "off" : levels.map { DurationText.format(microseconds: $0) }.joined(separator: ",")
    }
}

extension StringProtocol {
    var trimmedSpaces: String {
        var s = Substring(self)
        while s.first == " " { s = s.dropFirst() }
        while s.last == " " { s = s.dropLast() }
        return String(s)
    }
}

public struct RetentionPlan: Equatable, Sendable {
    /// The oldest snapshot kept: every point from it on stays restorable.
    public var oldestKept: SnapshotName?
    public var deleteKeys: [String]
}

public enum RetentionPlanner {
    /// Keeps every snapshot taken at or after `cutoffMs`, plus the newest one before it (so the
    /// whole retention window stays restorable), and always at least one snapshot. Deletes the
    /// older snapshots, the segments that only they needed, and older generations entirely.
    /// Generations that sort after `newestGeneration` (the agent's current one) are not the
    /// agent's: they are neither deleted nor taken as the one to keep, so an object planted
    /// under a name that sorts last cannot make retention delete the live generation.
    public static func plan(_ generations: [GenerationListing], cutoffMs: Int64, newestGeneration: String? = nil) -> RetentionPlan {
        let gens = generations.filter { g in newestGeneration.map { g.id <= $0 } ?? true }.sorted { $0.id < $1.id }
        let snaps = gens.flatMap { $0.snapshots }   // oldest first: generations by id, then txid
        guard !snaps.isEmpty else { return RetentionPlan(oldestKept: nil, deleteKeys: []) }
        let base = snaps.last { $0.timeMs < cutoffMs } ?? snaps[0]
        var keys: [String] = []
        for g in gens {
            if g.id < base.generation {
                keys += g.snapshots.map(\.key) + g.segments.map(\.key) + ["generations/\(g.id)/generation.json"]
            } else if g.id == base.generation {
                keys += g.snapshots.filter { $0.txid < base.txid }.map(\.key)
                keys += g.segments.filter { $0.lastTxid <= base.txid }.map(\.key)
            }
        }
        return RetentionPlan(oldestKept: base, deleteKeys: keys)
    }
}

public struct CompactionJob: Equatable, Sendable {
    public var level: Int
    public var inputs: [SegmentName]
    /// Merge into one record per compacted range (restore points only at its boundaries)
    /// instead of keeping every transaction.
    public var squash: Bool
    /// Segments of lower levels wholly inside the output's range: delete them too.
    public var covered: [SegmentName]
    public var output: SegmentName {
        SegmentName(generation: inputs[0].generation, level: level, firstTxid: inputs[0].firstTxid, lastTxid: inputs.last!.lastTxid,
                    firstTimeMs: inputs[0].firstTimeMs, lastTimeMs: inputs.last!.lastTimeMs, squashed: squash)
    }
}

public enum CompactionPlanner {
    /// Jobs for one generation. Level k merges lower-level segments whose first commit falls in
    /// the same closed window of `levels[k-1]`. Levels below the last keep every transaction.
    /// The last level squashes, and runs only on windows that ended before `fineCutoffMs`, so
    /// everything newer stays exact per transaction. A window is closed once `nowMs` is past
    /// its end by `settleMs` (late segments of a closed window simply stay uncompacted).
    /// `fromLevel` skips the levels the agent builds itself (level 1, from its spool).
    public static func plan(_ g: GenerationListing, levelsMs: [Int64], nowMs: Int64, fineCutoffMs: Int64,
                            settleMs: Int64, afterTxid: UInt64, fromLevel: Int = 1) -> [CompactionJob] {
        var jobs: [CompactionJob] = []
        for (i, window) in levelsMs.enumerated() where i + 1 >= fromLevel {
            let level = i + 1
            let last = level == levelsMs.count
            let limitMs = last ? min(nowMs - settleMs, fineCutoffMs) : nowMs - settleMs
            // The chain a restore would follow, over segments of every level (a segment left
            // at a lower level must not hide the ones after it); only its lower-level members
            // are merged, and a member already at this level or above separates groups.
            let candidates = g.segments.filter { $0.lastTxid > afterTxid }
            let lower = candidates.filter { $0.level < level }
            var byFirst: [UInt64: [SegmentName]] = [:]
            for s in candidates { byFirst[s.firstTxid, default: []].append(s) }
            var chain: [SegmentName] = []
            var next = candidates.map(\.firstTxid).min()
            while let start = next {
                var pos = start - 1
                while let s = byFirst[pos + 1]?.max(by: { $0.lastTxid < $1.lastTxid }) {
                    chain.append(s); pos = s.lastTxid
                }
                next = candidates.filter { $0.firstTxid > pos }.map(\.firstTxid).min()   // after a gap
                if next != nil { chain.append(SegmentName(generation: g.id, level: Int.max, firstTxid: 0, lastTxid: 0, firstTimeMs: 0, lastTimeMs: 0)) }
            }
            var group: [SegmentName] = []
            func flush() {
                if group.count >= 2 || (last && group.count == 1 && !group[0].squashed && group[0].firstTxid < group[0].lastTxid) {
                    let lo = group[0].firstTxid, hi = group.last!.lastTxid
                    let covered = lower.filter { $0.firstTxid >= lo && $0.lastTxid <= hi && !group.contains($0) }
                    jobs.append(CompactionJob(level: level, inputs: group, squash: last, covered: covered))
                }
                group = []
            }
            // Never merge across a snapshot: a restore starting from it must find a segment
            // that begins right after it (segments are cut at every snapshot).
            let snapshotTxids = Set(g.snapshots.map(\.txid))
            for s in chain {
                if s.level >= level { flush(); continue }   // already compacted (or a gap marker)
                if snapshotTxids.contains(s.firstTxid - 1) { flush() }
                let w = s.firstTimeMs / window
                let windowEnd = (w + 1) * window
                // Segments belong to the window they start in; it must be closed, and on the
                // squashing level the whole segment must be older than the fine window.
                guard windowEnd <= limitMs, !last || s.lastTimeMs < limitMs else { flush(); continue }
                if let f = group.first, f.firstTimeMs / window != w { flush() }
                group.append(s)
            }
            flush()
            if !jobs.isEmpty { break }   // one level per pass: the next pass sees the new objects
        }
        return jobs
    }
}
