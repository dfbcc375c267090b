// An object's key (generation, txids, commit times) is what listings, plans and retention go
// by; its metadata is what the writer recorded, and with encryption it is authenticated. A
// reader checks that both say the same thing, so an object copied or renamed from another
// generation, another database or another point in time is refused instead of applied.

extension ObjectMetadata {
    /// Why this metadata does not belong under the snapshot key `name`, or nil when it does.
    public func mismatch(snapshot name: SnapshotName) -> String? {
        if kind != .snapshot { return "is a \(kind), stored under a snapshot's name" }
        if generation != name.generation { return "belongs to generation \(generation.isEmpty ? "(none)" : generation), not to \(name.generation) where it is stored" }
        if lastTxid != name.txid { return "holds txid \(lastTxid), its name says \(name.txid)" }
        if floorMs(lastTimeUs) != name.timeMs { return "was taken at \(floorMs(lastTimeUs)) ms, its name says \(name.timeMs) ms" }
        return nil
    }

    /// Why this metadata does not belong under the segment key `name`, or nil when it does.
    public func mismatch(segment name: SegmentName) -> String? {
        if kind != .segment { return "is a \(kind), stored under a segment's name" }
        if generation != name.generation { return "belongs to generation \(generation.isEmpty ? "(none)" : generation), not to \(name.generation) where it is stored" }
        if firstTxid != name.firstTxid || lastTxid != name.lastTxid {
            return "holds txids \(firstTxid)-\(lastTxid), its name says \(name.firstTxid)-\(name.lastTxid)"
        }
        if floorMs(firstTimeUs) != name.firstTimeMs || floorMs(lastTimeUs) != name.lastTimeMs {
            return "holds commits from \(floorMs(firstTimeUs)) to \(floorMs(lastTimeUs)) ms, its name says \(name.firstTimeMs) to \(name.lastTimeMs) ms"
        }
        return nil
    }

    /// Why this metadata does not belong to the database `expected`, or nil when it does.
    /// 0 means "not recorded" (objects written by a walship that did not record the id, on
    /// either side), which nothing can be checked against.
    public func mismatch(database expected: UInt64) -> String? {
        if databaseID == expected || databaseID == 0 || expected == 0 { return nil }
        return "belongs to database \(DatabaseID.text(databaseID)), not to \(DatabaseID.text(expected))"
    }

    /// Why this metadata does not belong under `key`, or nil when it does (or when the key is
    /// not a snapshot's or a segment's).
    public func mismatch(key: String) -> String? {
        switch ObjectKey.parse(key) {
        case .snapshot(let s)?: return mismatch(snapshot: s)
        case .segment(let s)?: return mismatch(segment: s)
        default: return nil
        }
    }
}

/// Milliseconds as names carry them: writers divide microseconds by 1000.
private func floorMs(_ us: Int64) -> Int64 { us / 1000 }

/// A database's identity in its replica: 16 lowercase hex digits of a random nonzero 64-bit
/// number, recorded in every object's metadata (authenticated when objects are encrypted).
public enum DatabaseID {
    public static func text(_ id: UInt64) -> String { id == 0 ? "(not recorded)" : hex16(id) }

    /// Parses what `text` prints (or what an operator pinned): exactly 16 hex digits, not all zero.
    public static func parse(_ s: String) throws -> UInt64 {
        let hexDigit = { (c: UInt8) in (48...57).contains(c) || (97...102).contains(c) || (65...70).contains(c) }
        guard s.utf8.count == 16, s.utf8.allSatisfy(hexDigit), let v = UInt64(s, radix: 16), v != 0 else {
            throw FormatError.invalidArgument("database id '\(s)' is not 16 hexadecimal digits, not all zero (as `walship status` prints it)")
        }
        return v
    }
}
