// The pages a version-2 segment may encode as deltas: the most recently written distinct
// pages of the object, at most `capacity` of them, least recently written evicted first.
// Writer and reader run the same bookkeeping over the same sequence of page records, so both
// always agree on which pages are in the window and on their content.

/// Memory for a window's pages, reserved whole up front but touched only as pages come in, so
/// resident memory follows use and growing never copies. Shared by copies of a window until
/// one of them writes (then that one takes a copy of its own).
final class PageSlab {
    let base: UnsafeMutableRawPointer
    let bytes: Int
    init(bytes: Int) {
        self.bytes = bytes
        base = UnsafeMutableRawPointer.allocate(byteCount: max(bytes, 1), alignment: 16)
    }
    func clone(used: Int) -> PageSlab {
        let c = PageSlab(bytes: bytes)
        c.base.copyMemory(from: base, byteCount: used)
        return c
    }
    deinit { base.deallocate() }
}

/// A least-recently-written set of page versions.
public struct PageWindow {
    public let capacity: Int
    public let pageSize: Int
    private var slab: PageSlab?
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
            // New slots start zeroed, whatever the memory held.
            ownSlab().base.advanced(by: Int(s) * pageSize).initializeMemory(as: UInt8.self, repeating: 0, count: pageSize)
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

    /// The slab, allocated on first use and made this window's own before a write.
    private mutating func ownSlab() -> PageSlab {
        if slab == nil {
            slab = PageSlab(bytes: capacity * pageSize)
        } else if !isKnownUniquelyReferenced(&slab) {   // checked before any other reference is taken
            slab = slab!.clone(used: pageOf.count * pageSize)
        }
        return slab!
    }

    public func withSlot<R>(_ slot: Int, _ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        precondition(slot >= 0 && slot < pageOf.count)
        return try body(UnsafeRawBufferPointer(start: slab!.base.advanced(by: slot * pageSize), count: pageSize))
    }

    public mutating func withMutableSlot<R>(_ slot: Int, _ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        precondition(slot >= 0 && slot < pageOf.count)
        let s = ownSlab()
        return try body(UnsafeMutableRawBufferPointer(start: s.base.advanced(by: slot * pageSize), count: pageSize))
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

/// A page as a delta against its previous version: a sequence of runs, each
/// `skip u16 | word u16 | ...`. `skip` counts unchanged bytes since the previous run's end (or
/// the page's start). A `word` below 0x8000 is a *literal* run: that many new bytes follow (at
/// least 1). A `word` of 0x8000 or more is a *copy* run: `src u16` follows, and the next
/// `word - 0x8000` bytes (at least 1) are those of the previous version at offset `src`. Copy
/// runs carry what SQLite moves inside a page, the cell pointer array that an insert or a
/// delete in the middle of a b-tree page shifts by two bytes. Bytes after the last run are
/// unchanged.
public enum PageDelta {
    public static let runHeaderSize = 4
    public static let copyRunSize = 6
    static let maxRun = 0x7FFF
    /// Unchanged gaps up to this long are carried inside a run: cheaper than a run header.
    static let mergeGap = 8
    /// Shorter stretches stay literal: a copy run costs more than its header.
    static let minCopy = 12

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
        func u16(_ v: Int) { out.append(UInt8(v & 0xff)); out.append(UInt8(v >> 8)) }
        func literal(_ from: Int, _ to: Int) {
            var a = from
            while a < to {
                let n = min(to - a, maxRun)
                u16(a - pos); u16(n)
                out.append(contentsOf: UnsafeRawBufferPointer(rebasing: new[a..<a + n]))
                a += n; pos = a
            }
        }
        while i < size {
            // Skip equal bytes, a word at a time while aligned.
            if i % 8 == 0 && i / 8 < words && old.loadUnaligned(fromByteOffset: i, as: UInt64.self) == new.loadUnaligned(fromByteOffset: i, as: UInt64.self) {
                i += 8; continue
            }
            if old[i] == new[i] { i += 1; continue }
            // A changed stretch starts at i; it ends where mergeGap equal bytes in a row begin.
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
            // Within the stretch: copy runs where it is the old bytes shifted, literals elsewhere.
            var k = i, lit = i
            while k < end {
                var best = 0, bestSrc = 0
                if end - k >= minCopy {
                    func tryShift(_ d: Int) {
                        let src = k - d
                        // Cheap test first: most positions match no shift at all.
                        guard src >= 0, src + minCopy <= size, new[k] == old[src], new[k + 1] == old[src + 1] else { return }
                        var m = 2
                        let most = min(end - k, size - src, maxRun)
                        while m < most && new[k + m] == old[src + m] { m += 1 }
                        if m > best { best = m; bestSrc = src }
                    }
                    tryShift(2); tryShift(-2); tryShift(4); tryShift(-4)
                }
                if best >= minCopy {
                    literal(lit, k)
                    u16(k - pos); u16(0x8000 | best); u16(bestSrc)
                    k += best; pos = k; lit = k
                } else {
                    k += 1
                }
            }
            literal(lit, end)
            if out.count - start >= limit { out.removeSubrange(start...); return false }
            i = end
        }
        return true
    }

    /// Applies a delta to `page` in place; copy runs read `previous`, the page as it was before
    /// (the caller's copy: earlier runs may already have changed `page`). Throws on a run that
    /// is empty or leaves the page or the delta.
    public static func apply(_ delta: UnsafeRawBufferPointer, to page: UnsafeMutableRawBufferPointer,
                             previous: UnsafeRawBufferPointer, name: String) throws {
        var pos = 0, at = 0
        func bad(_ what: String) -> FormatError { .corrupt("\(name): page delta \(what)") }
        while at < delta.count {
            guard delta.count - at >= runHeaderSize else { throw bad("ends inside a run header") }
            let skip = Int(delta[at]) | Int(delta[at + 1]) << 8
            let word = Int(delta[at + 2]) | Int(delta[at + 3]) << 8
            at += runHeaderSize
            let count = word & maxRun
            guard count > 0, pos + skip + count <= page.count else {
                throw bad("run (skip \(skip), \(count) bytes) is empty or leaves the page")
            }
            pos += skip
            if word & 0x8000 == 0 {
                guard delta.count - at >= count else { throw bad("literal of \(count) bytes runs past the record") }
                page.baseAddress!.advanced(by: pos).copyMemory(from: delta.baseAddress!.advanced(by: at), byteCount: count)
                at += count
            } else {
                guard delta.count - at >= 2 else { throw bad("ends inside a copy run") }
                let src = Int(delta[at]) | Int(delta[at + 1]) << 8
                at += 2
                guard src + count <= previous.count else { throw bad("copy of \(count) bytes from offset \(src) leaves the page") }
                page.baseAddress!.advanced(by: pos).copyMemory(from: previous.baseAddress!.advanced(by: src), byteCount: count)
            }
            pos += count
        }
    }
}
