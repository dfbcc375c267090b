import XCTest
@testable import WalshipFormat

/// Version-2 segments: pages as deltas against the page window, read back whole.
final class SegmentV2Tests: XCTestCase {
    struct Rng {   // SplitMix64: reproducible from its seed
        var s: UInt64
        mutating func next() -> UInt64 {
            s &+= 0x9E37_79B9_7F4A_7C15
            var z = s
            z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9; z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
            return z ^ (z >> 31)
        }
        mutating func below(_ n: Int) -> Int { Int(next() % UInt64(n)) }
    }

    /// Encodes `txns` (each a list of page number and content) and returns the payload.
    func encode(_ txns: [[(UInt32, [UInt8])]], pageSize: Int, window: Int) throws -> (bytes: [UInt8], encoder: SegmentEncoder) {
        var out: [UInt8] = []
        let e = try SegmentEncoder(pageSize: pageSize, windowPages: window) { out.append(contentsOf: $0) }
        for (i, t) in txns.enumerated() {
            try e.transaction(TransactionHeader(txid: UInt64(i + 1), commitTimeUs: Int64(i), dbPages: 100, pageCount: UInt32(t.count)))
            for (pg, bytes) in t { try bytes.withUnsafeBytes { try e.page(pg, $0) } }
            try e.commit(checksum: UInt64(i))
        }
        try e.finish(transactionCount: UInt32(txns.count), lastTxid: UInt64(txns.count), dbChecksum: UInt64(txns.count - 1))
        return (out, e)
    }

    func decode(_ bytes: [UInt8], chunk: Int) throws -> [[(UInt32, [UInt8])]] {
        var d = SegmentDecoder(name: "v2")
        var txns: [[(UInt32, [UInt8])]] = []
        var i = 0
        while i < bytes.count {
            let end = min(bytes.count, i + chunk)
            try d.feed(Array(bytes[i..<end])) { e in
                switch e {
                case .transaction: txns.append([])
                case .page(let pg, let b): txns[txns.count - 1].append((pg, Array(b)))
                default: break
                }
            }
            i = end
        }
        try d.finish()
        XCTAssertEqual(d.payloadVersion, 2)
        return txns
    }

    /// Random transactions over a few pages: most changes are small edits of the previous
    /// version (as SQLite's b-tree pages change), some are whole rewrites.
    func randomHistory(seed: UInt64, pageSize: Int, pages: Int, txns: Int) -> [[(UInt32, [UInt8])]] {
        var r = Rng(s: seed)
        var current: [UInt32: [UInt8]] = [:]
        var out: [[(UInt32, [UInt8])]] = []
        for _ in 0..<txns {
            var t: [(UInt32, [UInt8])] = []
            for _ in 0..<(1 + r.below(4)) {
                let pg = UInt32(1 + r.below(pages))
                var page = current[pg] ?? [UInt8](repeating: 0, count: pageSize)
                switch r.below(10) {
                case 0: for k in 0..<pageSize { page[k] = UInt8(truncatingIfNeeded: r.next()) }
                case 1: break   // written again unchanged
                case 2, 3:
                    // An insert into a sorted array: the tail moves by two bytes, as SQLite's
                    // cell pointer array does (and a delete moves it back).
                    let from = r.below(pageSize / 2), to = from + 16 + r.below(pageSize / 2 - 16)
                    if r.below(2) == 0 {
                        for k in stride(from: to - 1, through: from + 2, by: -1) { page[k] = page[k - 2] }
                        page[from] = UInt8(truncatingIfNeeded: r.next()); page[from + 1] = UInt8(truncatingIfNeeded: r.next())
                    } else {
                        for k in from..<(to - 2) { page[k] = page[k + 2] }
                    }
                default:
                    for _ in 0..<(1 + r.below(6)) {
                        let at = r.below(pageSize), n = min(pageSize - at, 1 + r.below(40))
                        for k in at..<at + n { page[k] = UInt8(truncatingIfNeeded: r.next()) }
                    }
                    page[pageSize - 1] ^= UInt8(1 + r.below(255))   // an edit at the very end
                }
                current[pg] = page
                t.append((pg, page))
            }
            out.append(t)
        }
        return out
    }

    func assertSame(_ a: [[(UInt32, [UInt8])]], _ b: [[(UInt32, [UInt8])]], _ what: String) {
        XCTAssertEqual(a.count, b.count, what)
        for (x, y) in zip(a, b) {
            XCTAssertEqual(x.map(\.0), y.map(\.0), what)
            XCTAssertTrue(zip(x, y).allSatisfy { $0.1 == $1.1 }, what)
        }
    }

    func testRandomHistoriesRoundTripInEveryChunkingAndWindow() throws {
        for seed in UInt64(1)...30 {
            let pageSize = [512, 1024, 4096][Int(seed % 3)]
            let window = [1, 2, 3, 8, 64][Int(seed % 5)]
            let history = randomHistory(seed: seed, pageSize: pageSize, pages: 12, txns: 60)
            let (bytes, e) = try encode(history, pageSize: pageSize, window: window)
            for chunk in (seed % 5 == 0 ? [1] : []) + [7, 8, 13, 4096, .max] {
                assertSame(try decode(bytes, chunk: chunk), history, "seed \(seed) window \(window) chunk \(chunk)")
            }
            if window >= 8 { XCTAssertGreaterThan(e.deltaPages, 0, "seed \(seed)") }
        }
    }

    func testSmallEditsCostLessThanAPage() throws {
        var page = [UInt8](repeating: 0, count: 4096)
        for k in 0..<4096 { page[k] = UInt8(truncatingIfNeeded: k &* 31 &+ 7) }
        var history: [[(UInt32, [UInt8])]] = []
        for i in 0..<100 {
            page[100 + i] = 0xEE; page[4000 - i * 3] = UInt8(i)
            history.append([(5, page)])
        }
        let (bytes, e) = try encode(history, pageSize: 4096, window: 16)
        XCTAssertEqual(e.wholePages, 1)
        XCTAssertEqual(e.deltaPages, 99)
        // Per transaction: its header (32), a page record header (8), two runs (2 x 5), a checksum (8).
        XCTAssertLessThanOrEqual(bytes.count, 16 + 32 + 8 + 4096 + 8 + 99 * (32 + 8 + 2 * 5 + 8) + 24)
        assertSame(try decode(bytes, chunk: 100), history, "edits")
    }

    func testAShiftedPointerArrayIsACopyRunNotALiteral() throws {
        var old = [UInt8](repeating: 0, count: 4096)
        for k in 8..<1208 { old[k] = UInt8(truncatingIfNeeded: k &* 131 &+ k >> 3) }   // 600 "pointers"
        var new = old
        for k in stride(from: 1209, through: 302, by: -1) { new[k] = old[k - 2] }      // insert at 300
        new[300] = 0xAB; new[301] = 0xCD
        var delta: [UInt8] = []
        let smaller = old.withUnsafeBytes { o in new.withUnsafeBytes { n in PageDelta.encode(from: o, to: n, limit: 4000, into: &delta) } }
        XCTAssertTrue(smaller)
        XCTAssertLessThan(delta.count, 40, "a 2-byte insert costs a literal and a copy run, not 900 bytes")
        var page = old
        try delta.withUnsafeBytes { d in try old.withUnsafeBytes { o in try page.withUnsafeMutableBytes { try PageDelta.apply(d, to: $0, previous: o, name: "t") } } }
        XCTAssertEqual(page, new)
    }

    func testCopyRunsThatLeaveThePageAreCorrupt() {
        let old = [UInt8](repeating: 1, count: 512)
        for run: [UInt8] in [[0, 0, 0x10, 0x80, 0xF8, 0x01], [0, 0, 0x00, 0x80, 0, 0], [0, 0, 0x10, 0x80, 0]] {
            var page = old
            XCTAssertThrowsError(try run.withUnsafeBytes { d in try old.withUnsafeBytes { o in try page.withUnsafeMutableBytes { try PageDelta.apply(d, to: $0, previous: o, name: "t") } } }, "\(run)")
        }
    }

    func testACopiedWindowKeepsItsOwnPages() {
        var a = PageWindow(capacity: 4, pageSize: 512)
        let slot = a.admit(7)
        a.withMutableSlot(slot) { $0.initializeMemory(as: UInt8.self, repeating: 1) }
        var b = a
        b.withMutableSlot(slot) { $0.initializeMemory(as: UInt8.self, repeating: 2) }
        XCTAssertEqual(a.withSlot(slot) { $0[0] }, 1)
        XCTAssertEqual(b.withSlot(slot) { $0[0] }, 2)
    }

    func testThePageWindowEvictsTheLeastRecentlyWrittenPage() {
        var w = PageWindow(capacity: 2, pageSize: 512)
        _ = w.admit(1); _ = w.admit(2); _ = w.admit(1)   // 2 is now the least recent
        _ = w.admit(3)
        XCTAssertNotNil(w.slot(of: 1)); XCTAssertNil(w.slot(of: 2)); XCTAssertNotNil(w.slot(of: 3))
        XCTAssertEqual(w.count, 2)
    }

    func testADeltaForAPageOutsideTheWindowIsCorrupt() throws {
        var p = SegmentCodec.header(pageSize: 512, windowPages: 1)
        p += SegmentCodec.transactionHeader(TransactionHeader(txid: 1, commitTimeUs: 0, dbPages: 3, pageCount: 2))
        p += [1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF] + [UInt8](repeating: 1, count: 512)
        p += [2, 0, 0, 0, 5, 0, 0, 0] + [0, 0, 1, 0, 9]   // page 2 was never written whole
        var d = SegmentDecoder(name: "bad")
        XCTAssertThrowsError(try d.feed(p) { _ in }) { XCTAssertTrue("\($0)".contains("not in the object's page window"), "\($0)") }
    }

    func testADeltaForAnEvictedPageIsCorrupt() throws {
        // Window of 2: pages 1, 2, 3 written whole; page 1 is the least recently written, so
        // it has left the window when page 3 came in, and a delta for it has no base.
        var p = SegmentCodec.header(pageSize: 512, windowPages: 2)
        p += SegmentCodec.transactionHeader(TransactionHeader(txid: 1, commitTimeUs: 0, dbPages: 3, pageCount: 4))
        for pg: UInt8 in [1, 2, 3] { p += [pg, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF] + [UInt8](repeating: pg, count: 512) }
        var q = p
        p += [1, 0, 0, 0, 5, 0, 0, 0] + [0, 0, 1, 0, 9]
        var d = SegmentDecoder(name: "evicted")
        XCTAssertThrowsError(try d.feed(p) { _ in }) { XCTAssertTrue("\($0)".contains("not in the object's page window"), "\($0)") }
        // The same delta for page 2, still in the window, applies.
        q += [2, 0, 0, 0, 5, 0, 0, 0] + [0, 0, 1, 0, 9] + SegmentCodec.transactionChecksum(1)
        var e = SegmentDecoder(name: "kept")
        var last: [UInt8] = []
        try e.feed(q) { if case .page(2, let b) = $0 { last = Array(b) } }
        XCTAssertEqual(last.first, 9)
        XCTAssertEqual(last[1], 2)
    }

    func testDeltaRunsThatLeaveThePageAreCorrupt() throws {
        for run: [UInt8] in [[0xFF, 0x01, 4, 0, 1, 2, 3, 4], [0, 0, 0, 0], [0, 0, 9, 0, 1], [0, 0]] {
            var p = SegmentCodec.header(pageSize: 512, windowPages: 4)
            p += SegmentCodec.transactionHeader(TransactionHeader(txid: 1, commitTimeUs: 0, dbPages: 3, pageCount: 2))
            p += [1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF] + [UInt8](repeating: 1, count: 512)
            p += [1, 0, 0, 0, UInt8(run.count), 0, 0, 0] + run
            p += SegmentCodec.transactionChecksum(0)
            var d = SegmentDecoder(name: "bad")
            XCTAssertThrowsError(try d.feed(p) { _ in }, "run \(run)")
        }
    }

    func testOversizedWindowsAndDeltasAreRefused() {
        var d = SegmentDecoder(name: "w")
        XCTAssertThrowsError(try d.feed(SegmentCodec.header(pageSize: 4096, windowPages: (64 << 20) / 4096 + 1)) { _ in })
        var d0 = SegmentDecoder(name: "w0")
        XCTAssertThrowsError(try d0.feed(SegmentCodec.header(pageSize: 4096, windowPages: 0)) { _ in })
        var p = SegmentCodec.header(pageSize: 512, windowPages: 4)
        p += SegmentCodec.transactionHeader(TransactionHeader(txid: 1, commitTimeUs: 0, dbPages: 3, pageCount: 2))
        p += [1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF] + [UInt8](repeating: 1, count: 512)
        p += [1, 0, 0, 0, 0, 2, 0, 0]   // a 512-byte delta for a 512-byte page
        var d2 = SegmentDecoder(name: "big")
        XCTAssertThrowsError(try d2.feed(p) { _ in })
    }
}
