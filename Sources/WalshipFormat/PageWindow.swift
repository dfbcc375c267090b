// The pages a version-2 segment may encode as deltas: the most recently written distinct
// pages of the object, at most `capacity` of them, least recently written evicted first.
// Writer and reader run the same bookkeeping over the same sequence of page records, so both
// always agree on which pages are in the window and on their content.

/// A least-recently-written set of page versions, kept in one growing slab.
public struct PageWindow {
    public let capacity: Int
    public let pageSize: Int
    private var slab: [UInt8] = []
    private var slotOf: [UInt32: Int32] = [:]
    private var pageOf: [UInt32] = []
    // A doubly linked list over slots: head is the most recently written.
    private var newer: [Int32] = []
    private var older: [Int32] = []
    private var head: Int32 = -1
    private var tail: Int32 = -1

    public init(capacity: Int, pageSize: Int) {
        self.capacity = capacity; self.pageSize = pageSize
    }

    public var count: Int { pageOf.count }

    /// The slot holding `page`'s last version, if it is in the window.
    public func slot(of page: UInt32) -> Int? { slotOf[page].map(Int.init) }

    /// Makes `page` the most recently written and returns its slot: its existing one, a new
    /// one, or the least recently written page's (which leaves the window).
    public mutating func admit(_ page: UInt32) -> Int {
        if let s = slotOf[page] { touch(s); return Int(s) }
        let s: Int32
        if pageOf.count < capacity {
            s = Int32(pageOf.count)
            pageOf.append(page); newer.append(-1); older.append(-1)
            if slab.count < pageOf.count * pageSize {
                // Grows by a quarter at a time (at least 16 pages): memory follows use.
                let want = min(capacity, max(pageOf.count + 16, pageOf.count * 5 / 4)) * pageSize
                slab.append(contentsOf: repeatElement(0, count: want - slab.count))
            }
        } else {
            s = tail
            unlink(s)
            slotOf[pageOf[Int(s)]] = nil
            pageOf[Int(s)] = page
        }
        slotOf[page] = s
        pushFront(s)
        return Int(s)
    }

    public func withSlot<R>(_ slot: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try slab.withUnsafeBytes { try body(UnsafeRawBufferPointer(rebasing: $0[slot * pageSize..<(slot + 1) * pageSize])) }
    }

    public mutating func withMutableSlot<R>(_ slot: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        let size = pageSize
        return try slab.withUnsafeMutableBytes { try body(UnsafeMutableRawBufferPointer(rebasing: $0[slot * size..<(slot + 1) * size])) }
    }

    private mutating func touch(_ s: Int32) {
        guard head != s else { return }
        unlink(s); pushFront(s)
    }

    private mutating func unlink(_ s: Int32) {
        let n = newer[Int(s)], o = older[Int(s)]
        if n >= 0 { older[Int(n)] = o } else { head = o }
        if o >= 0 { newer[Int(o)] = n } else { tail = n }
        newer[Int(s)] = -1; older[Int(s)] = -1
    }

    private mutating func pushFront(_ s: Int32) {
        older[Int(s)] = head; newer[Int(s)] = -1
        if head >= 0 { newer[Int(head)] = s }
        head = s
        if tail < 0 { tail = s }
    }
}

/// A page as a delta against its previous version: runs of changed bytes, each
/// `skip u16 | length u16 | bytes`, where `skip` counts unchanged bytes since the previous
/// run's end (or the page's start) and `length` is at least 1.
public enum PageDelta {
    public static let runHeaderSize = 4
    /// Unchanged gaps up to this long are carried inside a run: cheaper than a run header.
    static let mergeGap = 8

    /// Appends the delta from `old` to `new` (same size) to `out`; returns false (leaving
    /// `out` as it was) when it would be no smaller than `limit` bytes.
    public static func encode(from old: UnsafeRawBufferPointer, to new: UnsafeRawBufferPointer,
                              limit: Int, into out: inout [UInt8]) -> Bool {
        precondition(old.count == new.count)
        let size = new.count
        let start = out.count
        var pos = 0          // end of the previous run
        var i = 0
        let words = size / 8
        while i < size {
            // Skip equal bytes, a word at a time while aligned.
            if i % 8 == 0 && i / 8 < words && old.loadUnaligned(fromByteOffset: i, as: UInt64.self) == new.loadUnaligned(fromByteOffset: i, as: UInt64.self) {
                i += 8; continue
            }
            if old[i] == new[i] { i += 1; continue }
            // A run starts at i; it ends where mergeGap equal bytes in a row begin, or at the end.
            var end = i + 1
            var equal = 0
            var j = i + 1
            while j < size {
                if old[j] == new[j] {
                    equal += 1
                    if equal > mergeGap { break }
                } else {
                    equal = 0; end = j + 1
                    // A page rewritten whole gives up early, not after a byte-by-byte scan.
                    if out.count - start + runHeaderSize + (end - i) >= limit { out.removeSubrange(start...); return false }
                }
                j += 1
            }
            var runStart = i
            while runStart < end {
                let length = min(end - runStart, 0xFFFF)
                let skip = runStart - pos
                guard skip <= 0xFFFF, out.count - start + runHeaderSize + length < limit else {
                    out.removeSubrange(start...); return false
                }
                out.append(UInt8(skip & 0xff)); out.append(UInt8(skip >> 8))
                out.append(UInt8(length & 0xff)); out.append(UInt8(length >> 8))
                out.append(contentsOf: UnsafeRawBufferPointer(rebasing: new[runStart..<runStart + length]))
                runStart += length; pos = runStart
            }
            i = end
        }
        return true
    }

    /// Applies a delta to `page` in place. Throws on a run that leaves the page or is empty,
    /// or on a delta that ends inside a run header.
    public static func apply(_ delta: UnsafeRawBufferPointer, to page: UnsafeMutableRawBufferPointer, name: String) throws {
        var pos = 0, at = 0
        while at < delta.count {
            guard delta.count - at >= runHeaderSize else { throw FormatError.corrupt("\(name): page delta ends inside a run header") }
            let skip = Int(delta[at]) | Int(delta[at + 1]) << 8
            let length = Int(delta[at + 2]) | Int(delta[at + 3]) << 8
            at += runHeaderSize
            guard length > 0, pos + skip + length <= page.count, delta.count - at >= length else {
                throw FormatError.corrupt("\(name): page delta run (skip \(skip), length \(length)) leaves the page or the record")
            }
            pos += skip
            page.baseAddress!.advanced(by: pos).copyMemory(from: delta.baseAddress!.advanced(by: at), byteCount: length)
            pos += length; at += length
        }
    }
}
