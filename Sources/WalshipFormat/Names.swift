// Object names in a replica. They carry txid and commit-time ranges so that a restore plan
// needs LIST only (docs/FORMAT.md):
//   generations/<gen>/generation.json
//   generations/<gen>/snapshots/<txid:016x>-<unixMs>.snap.lz4
//   generations/<gen>/segments/<level>/<first:016x>-<last:016x>-<firstUnixMs>-<lastUnixMs>.seg.lz4
//   (a compacted segment squashed to its boundaries ends in -s.seg.lz4)

public struct SnapshotName: Equatable, Hashable, Sendable {
    public var generation: String
    public var txid: UInt64
    public var timeMs: Int64
    public init(generation: String, txid: UInt64, timeMs: Int64) { self.generation = generation; self.txid = txid; self.timeMs = timeMs }
    public var fileName: String { "\(hex16(txid))-\(timeMs).snap.lz4" }
    public var key: String { "generations/\(generation)/snapshots/\(fileName)" }

    public static func parse(generation: String, fileName: String) -> SnapshotName? {
        guard fileName.hasSuffix(".snap.lz4") else { return nil }
        let parts = fileName.dropLast(".snap.lz4".count).split(separator: "-", omittingEmptySubsequences: false)
        guard parts.count == 2, parts[0].count == 16, let txid = UInt64(parts[0], radix: 16),
              let ms = Int64(parts[1]), ObjectNameLimits.valid(txid: txid), ObjectNameLimits.valid(timeMs: ms) else { return nil }
        return SnapshotName(generation: generation, txid: txid, timeMs: ms)
    }
}

public struct SegmentName: Equatable, Hashable, Sendable {
    public var generation: String
    public var level: Int
    public var firstTxid: UInt64
    public var lastTxid: UInt64
    public var firstTimeMs: Int64
    public var lastTimeMs: Int64
    /// Restore points only at its boundaries (compacted beyond the fine window).
    public var squashed = false
    public init(generation: String, level: Int, firstTxid: UInt64, lastTxid: UInt64, firstTimeMs: Int64, lastTimeMs: Int64, squashed: Bool = false) {
        self.generation = generation; self.level = level; self.firstTxid = firstTxid; self.lastTxid = lastTxid
        self.firstTimeMs = firstTimeMs; self.lastTimeMs = lastTimeMs; self.squashed = squashed
    }
    public var fileName: String { "\(hex16(firstTxid))-\(hex16(lastTxid))-\(firstTimeMs)-\(lastTimeMs)\(squashed ? "-s" : "").seg.lz4" }
    public var key: String { "generations/\(generation)/segments/\(level)/\(fileName)" }

    public static func parse(generation: String, level: Int, fileName: String) -> SegmentName? {
        guard fileName.hasSuffix(".seg.lz4") else { return nil }
        let parts = fileName.dropLast(".seg.lz4".count).split(separator: "-", omittingEmptySubsequences: false)
        let squashed = parts.count == 5 && parts[4] == "s"
        guard parts.count == 4 || squashed, parts[0].count == 16, parts[1].count == 16,
              let a = UInt64(parts[0], radix: 16), let b = UInt64(parts[1], radix: 16),
              let t0 = Int64(parts[2]), let t1 = Int64(parts[3]), a <= b, t0 <= t1,
              a >= 1, ObjectNameLimits.valid(txid: b), ObjectNameLimits.valid(timeMs: t0), ObjectNameLimits.valid(timeMs: t1) else { return nil }
        return SegmentName(generation: generation, level: level, firstTxid: a, lastTxid: b, firstTimeMs: t0, lastTimeMs: t1, squashed: squashed)
    }
}

/// Bounds on what a name read from a replica may say, so that every sum and product made
/// with it (txid + 1, milliseconds × 1000) stays in range. A name outside them is not one of
/// walship's objects (a segment always starts at txid 1 or later: txid 0 is a snapshot's).
/// Txids stay below 2^62, leaving room for generations that follow.
enum ObjectNameLimits {
    static func valid(txid: UInt64) -> Bool { txid < 1 << 62 }
    /// Up to the year 2255, in milliseconds since 1970.
    static func valid(timeMs: Int64) -> Bool { timeMs >= 0 && timeMs <= 9_000_000_000_000 }
}

/// What a replica key names, read back from the key alone.
public enum ObjectKey: Equatable, Sendable {
    case generationInfo(generation: String)
    case snapshot(SnapshotName)
    case segment(SegmentName)

    /// nil for anything that is not one of walship's object keys (other files under the
    /// prefix, deletion lists, temporary names).
    public static func parse(_ key: String) -> ObjectKey? {
        let parts = key.split(separator: "/", omittingEmptySubsequences: false).map(String.init)
        guard parts.count >= 3, parts[0] == "generations", GenerationID.isValid(parts[1]) else { return nil }
        let gen = parts[1]
        switch (parts.count, parts[2]) {
        case (3, "generation.json"):
            return .generationInfo(generation: gen)
        case (4, "snapshots"):
            return SnapshotName.parse(generation: gen, fileName: parts[3]).map(ObjectKey.snapshot)
        case (5, "segments"):
            guard let level = Int(parts[3]), level >= 0, String(level) == parts[3] else { return nil }
            return SegmentName.parse(generation: gen, level: level, fileName: parts[4]).map(ObjectKey.segment)
        default:
            return nil
        }
    }

    public var generation: String {
        switch self {
        case .generationInfo(let g): return g
        case .snapshot(let s): return s.generation
        case .segment(let s): return s.generation
        }
    }

    /// The segment, when this names a segment of exactly `level`.
    public func segment(atLevel level: Int) -> SegmentName? {
        if case .segment(let s) = self, s.level == level { return s }
        return nil
    }
    public var segment: SegmentName? {
        if case .segment(let s) = self { return s }
        return nil
    }
}

public enum GenerationID {
    /// A new id: 16 hex digits of the creation time in microseconds, then 4 random hex digits,
    /// so that ids sort by creation time.
    public static func make(timeUs: Int64, random: UInt16) -> String {
        hex16(UInt64(timeUs)) + hexPadded(UInt64(random), width: 4)
    }
    public static func isValid(_ s: String) -> Bool {
        s.utf8.count == 20 && s.utf8.allSatisfy { ($0 >= 48 && $0 <= 57) || ($0 >= 97 && $0 <= 102) }
    }
    public static func creationTimeUs(_ s: String) -> Int64? {
        // Names are read from replicas: one past the range of a time must not trap.
        guard isValid(s), let v = UInt64(s.prefix(16), radix: 16), v < UInt64(Int64.max) else { return nil }
        return Int64(v)
    }
}

public func hex16(_ v: UInt64) -> String { hexPadded(v, width: 16) }

func hexPadded(_ v: UInt64, width: Int) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: max(0, width - s.count)) + s
}
