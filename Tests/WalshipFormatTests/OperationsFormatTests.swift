import XCTest
import WalshipFormat
import WalshipCrypto

extension AESGCM: AuthenticatedCipher {}

final class SealingTests: XCTestCase {
    let key = (0..<32).map { UInt8($0 * 7 & 0xff) }

    func testHMACSHA256MatchesRFC4231Case2() {
        let mac = HMACSHA256.mac(key: Array("Jefe".utf8), Array("what do ya want for nothing?".utf8))
        XCTAssertEqual(SHA256.hex(mac), "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    }

    func testBase64() {
        XCTAssertEqual(Base64.encode(Array("".utf8)), "")
        XCTAssertEqual(Base64.encode(Array("f".utf8)), "Zg==")
        XCTAssertEqual(Base64.encode(Array("fo".utf8)), "Zm8=")
        XCTAssertEqual(Base64.encode(Array("foobar".utf8)), "Zm9vYmFy")
        XCTAssertEqual(Base64.encode(md5Digest([])), "1B2M2Y8AsgTpgAmY7PhCfg==")
    }

    private func seal(_ plain: [UInt8], metadata: [UInt8]) throws -> [UInt8] {
        var out: [UInt8] = []
        let w = try SealedStreamWriter(masterKey: key, salt: [UInt8](repeating: 9, count: 16), makeCipher: { try AESGCM(key: $0) }) { out += $0 }
        try plain.withUnsafeBytes { try w.write($0) }
        try w.finish(metadata: metadata)
        return out
    }

    private func open(_ sealed: [UInt8], key k: [UInt8]? = nil, metadata: [UInt8], piece: Int = 1000) throws -> [UInt8] {
        let r = SealedStreamReader(masterKey: k ?? key, metadata: metadata, makeCipher: { try AESGCM(key: $0) })
        var out: [UInt8] = []
        var i = 0
        while i < sealed.count {
            let end = min(sealed.count, i + piece)
            try Array(sealed[i..<end]).withUnsafeBytes { try r.feed($0) { out += $0 } }
            i = end
        }
        try r.finish()
        return out
    }

    func testRoundTripAcrossChunkBoundariesHidesThePlaintext() throws {
        let marker = Array("PLAINTEXT-MARKER".utf8)
        var plain: [UInt8] = []
        while plain.count < 3 * Sealing.chunkSize + 123 { plain += marker }
        let sealed = try seal(plain, metadata: [1, 2, 3])
        XCTAssertEqual(try open(sealed, metadata: [1, 2, 3], piece: 777), plain)
        XCTAssertEqual(try open(sealed, metadata: [1, 2, 3], piece: 1 << 20), plain)
        let text = String(decoding: sealed, as: UTF8.self)
        XCTAssertFalse(text.contains("PLAINTEXT-MARKER"))
        XCTAssertEqual(try open(try seal([], metadata: [7]), metadata: [7]), [])
    }

    func testTamperingTruncationWrongKeyAndAlteredMetadataAreDetected() throws {
        let plain = [UInt8](repeating: 0x41, count: Sealing.chunkSize + 10)
        let sealed = try seal(plain, metadata: [1, 2, 3])
        var flipped = sealed
        flipped[Sealing.headerSize + 100] ^= 1
        XCTAssertThrowsError(try open(flipped, metadata: [1, 2, 3])) { XCTAssertEqual($0 as? SealError, .tampered) }
        XCTAssertThrowsError(try open(sealed, metadata: [1, 2, 4])) { XCTAssertEqual($0 as? SealError, .tampered) }
        XCTAssertThrowsError(try open(sealed, key: [UInt8](repeating: 1, count: 32), metadata: [1, 2, 3])) { XCTAssertEqual($0 as? SealError, .tampered) }
        // Dropping the final chunk leaves a stream that ends too early.
        let firstChunkEnd = Sealing.headerSize + 4 + Sealing.chunkSize + Sealing.tagSize
        XCTAssertThrowsError(try open(Array(sealed[0..<firstChunkEnd]), metadata: [1, 2, 3])) { XCTAssertEqual($0 as? SealError, .truncated) }
        XCTAssertThrowsError(try open(sealed + [0, 0, 0, 0, 0], metadata: [1, 2, 3]))
    }

    func testKeyIDsDifferPerKeyAndObjectKeysPerSalt() {
        XCTAssertEqual(Sealing.keyID(key), Sealing.keyID(key))
        XCTAssertNotEqual(Sealing.keyID(key), Sealing.keyID([UInt8](repeating: 0, count: 32)))
        XCTAssertNotEqual(Sealing.objectKey(key, salt: [UInt8](repeating: 1, count: 16)), Sealing.objectKey(key, salt: [UInt8](repeating: 2, count: 16)))
    }

    func testMetadataCarriesTheKeyID() throws {
        var m = ObjectMetadata(kind: .segment, pageSize: 4096, firstTxid: 1, lastTxid: 2, firstTimeUs: 3, lastTimeUs: 4, dbPages: 5,
                               transactionCount: 2, dbChecksum: 6, payloadBytes: 7, generation: "g", flags: ObjectMetadata.flagEncrypted)
        m.keyID = 0xDEAD_BEEF_0123_4567
        let back = try ObjectMetadata.decode(m.encoded())
        XCTAssertEqual(back.keyID, m.keyID)
        XCTAssertTrue(back.isEncrypted)
    }
}

final class HousekeepingPlanTests: XCTestCase {
    let gen = "000000000000000a0000", old = "00000000000000010000"

    func seg(_ a: UInt64, _ b: UInt64, _ t0: Int64, _ t1: Int64, level: Int = 0, gen g: String? = nil, squashed: Bool = false) -> SegmentName {
        SegmentName(generation: g ?? gen, level: level, firstTxid: a, lastTxid: b, firstTimeMs: t0, lastTimeMs: t1, squashed: squashed)
    }

    func testRetentionKeepsTheNewestSnapshotBeforeTheCutoffAndWhatFollows() {
        let oldGen = GenerationListing(id: old, snapshots: [SnapshotName(generation: old, txid: 0, timeMs: 100)],
                                       segments: [seg(1, 5, 100, 200, gen: old)])
        let g = GenerationListing(id: gen, snapshots: [SnapshotName(generation: gen, txid: 10, timeMs: 1000),
                                                       SnapshotName(generation: gen, txid: 20, timeMs: 2000),
                                                       SnapshotName(generation: gen, txid: 30, timeMs: 3000)],
                                  segments: [seg(11, 20, 1000, 2000), seg(21, 25, 2000, 2500), seg(26, 30, 2500, 3000), seg(31, 40, 3000, 4000)])
        let plan = RetentionPlanner.plan([g, oldGen], cutoffMs: 2600)
        XCTAssertEqual(plan.oldestKept?.txid, 20)
        XCTAssertEqual(Set(plan.deleteKeys), Set([oldGen.snapshots[0].key, oldGen.segments[0].key, "generations/\(old)/generation.json",
                                                  g.snapshots[0].key, g.segments[0].key]))
        // Everything older than the cutoff: still one snapshot kept, the newest.
        let all = RetentionPlanner.plan([g], cutoffMs: 99_999)
        XCTAssertEqual(all.oldestKept?.txid, 30)
        XCTAssertFalse(all.deleteKeys.contains(g.snapshots[2].key))
        XCTAssertFalse(all.deleteKeys.contains(g.segments[3].key))
        XCTAssertTrue(RetentionPlanner.plan([], cutoffMs: 5).deleteKeys.isEmpty)
    }

    func testCompactionMergesClosedWindowsAndNeverCrossesASnapshot() {
        // Window 1000 ms: [0,1000) holds 1-3 and 4-6, but a snapshot at txid 3 splits them.
        let g = GenerationListing(id: gen, snapshots: [SnapshotName(generation: gen, txid: 0, timeMs: 0), SnapshotName(generation: gen, txid: 3, timeMs: 400)],
                                  segments: [seg(1, 2, 100, 200), seg(3, 3, 300, 300), seg(4, 5, 500, 600), seg(6, 6, 700, 800),
                                             seg(7, 8, 1100, 1200), seg(9, 9, 2100, 2200)])
        let jobs = CompactionPlanner.plan(g, levelsMs: [1000, 4000], nowMs: 2500, fineCutoffMs: 0, settleMs: 100, afterTxid: 0)
        XCTAssertEqual(jobs.map { $0.inputs.map(\.firstTxid) }, [[1, 3], [4, 6]])   // window [1000,2000) has one segment; [2000,3000) is open
        XCTAssertTrue(jobs.allSatisfy { !$0.squash && $0.level == 1 })
        XCTAssertEqual(jobs[0].output.lastTxid, 3)
        // Later, with the fine window passed, level 2 squashes what level 1 made.
        let g2 = GenerationListing(id: gen, snapshots: [SnapshotName(generation: gen, txid: 0, timeMs: 0)],
                                   segments: [seg(1, 6, 100, 800, level: 1), seg(7, 8, 1100, 1200), seg(9, 9, 2100, 2200)])
        let later = CompactionPlanner.plan(g2, levelsMs: [1000, 4000], nowMs: 9000, fineCutoffMs: 8000, settleMs: 100, afterTxid: 0)
        // 7-8 and 9 sit alone in their level-1 windows (nothing to merge there); the level-2
        // window [0,4000) ended before the fine cutoff, so all three are squashed into one.
        XCTAssertEqual(later.count, 1)
        XCTAssertEqual(later[0].level, 2)
        XCTAssertTrue(later[0].squash)
        XCTAssertEqual(later[0].inputs.map(\.firstTxid), [1, 7, 9])
    }

    func testLastLevelSquashesOnlyBeyondTheFineWindow() {
        let g = GenerationListing(id: gen, snapshots: [SnapshotName(generation: gen, txid: 0, timeMs: 0)],
                                  segments: [seg(1, 6, 100, 800, level: 1), seg(7, 9, 1100, 1900, level: 1), seg(10, 12, 4100, 4200, level: 1)])
        let inside = CompactionPlanner.plan(g, levelsMs: [1000, 4000], nowMs: 9000, fineCutoffMs: 3000, settleMs: 100, afterTxid: 0)
        XCTAssertTrue(inside.isEmpty, "window [0,4000) ends after the fine cutoff")
        let beyond = CompactionPlanner.plan(g, levelsMs: [1000, 4000], nowMs: 9000, fineCutoffMs: 4000, settleMs: 100, afterTxid: 0)
        XCTAssertEqual(beyond.count, 1)
        XCTAssertTrue(beyond[0].squash)
        XCTAssertEqual(beyond[0].output.fileName.hasSuffix("-s.seg.lz4"), true)
        XCTAssertEqual(SegmentName.parse(generation: gen, level: 2, fileName: beyond[0].output.fileName)?.squashed, true)
    }

    func testCompactionLevelsParse() throws {
        XCTAssertEqual(try CompactionLevels.parse("5m,1h"), [300_000_000, 3_600_000_000])
        XCTAssertEqual(try CompactionLevels.parse("off"), [])
        XCTAssertThrowsError(try CompactionLevels.parse("1h,5m"))
        XCTAssertThrowsError(try CompactionLevels.parse("5m,7m"))
        XCTAssertThrowsError(try CompactionLevels.parse("100ms"))
    }

    func testSquashedRecordsDecodeAndKeepTheChainContiguous() throws {
        var payload = SegmentCodec.headerVersion1(pageSize: 512)
        payload += SegmentCodec.squashedHeader(TransactionHeader(squashing: 5, through: 9, commitTimeUs: 77, dbPages: 3, pageCount: 1, truncateFirstTo: 2))
        payload += SegmentCodec.pageRecordPrefixVersion1(3) + [UInt8](repeating: 7, count: 512) + SegmentCodec.transactionChecksum(42)
        payload += SegmentCodec.transactionHeader(TransactionHeader(txid: 10, commitTimeUs: 80, dbPages: 3, pageCount: 0)) + SegmentCodec.transactionChecksum(43)
        payload += SegmentCodec.trailer(transactionCount: 2, lastTxid: 10, dbChecksum: 43)
        var d = SegmentDecoder(name: "s")
        var headers: [TransactionHeader] = []
        try d.feed(payload) { if case .transaction(let t) = $0 { headers.append(t) } }
        try d.finish()
        XCTAssertEqual(headers.map(\.txid), [5, 10])
        XCTAssertEqual(headers[0].lastTxid, 9)
        XCTAssertEqual(headers[0].truncateFirstTo, 2)
        XCTAssertFalse(headers[1].isSquashed)
    }
}

final class CompactionChainTests: XCTestCase {
    let gen = "000000000000000a0000"
    func seg(_ a: UInt64, _ b: UInt64, _ t0: Int64, _ t1: Int64, level: Int = 0) -> SegmentName {
        SegmentName(generation: gen, level: level, firstTxid: a, lastTxid: b, firstTimeMs: t0, lastTimeMs: t1)
    }

    /// A segment left behind at a lower level (it crossed a window edge) must not stop the
    /// planner from merging the windows after the next already-compacted segment.
    func testALeftoverSegmentDoesNotStallLaterWindows() {
        let g = GenerationListing(id: gen, snapshots: [SnapshotName(generation: gen, txid: 0, timeMs: 0)],
                                  segments: [seg(1, 10, 0, 900, level: 1), seg(11, 12, 950, 1050),
                                             seg(13, 20, 1100, 1900, level: 1),
                                             seg(21, 22, 2100, 2200), seg(23, 24, 2300, 2400)])
        let jobs = CompactionPlanner.plan(g, levelsMs: [1000, 10_000], nowMs: 5000, fineCutoffMs: 0, settleMs: 100, afterTxid: 0)
        XCTAssertEqual(jobs.map { $0.inputs.map(\.firstTxid) }, [[21, 23]])
    }
}

final class RedactionTests: XCTestCase {
    func testCredentialsLeaveEveryURL() {
        let cases = [
            "s3://b/p?endpoint=https://AK:SECRET@minio:9000&region=x",
            "s3://b/p?endpoint=https%3A%2F%2FAK%3ASECRET%40minio%3A9000&region=x",
            "https://user:SECRET@example.com/path",
            "http://SECRET@host/",
            "s3://b/p?endpoint=https://AKIA:abc/SECRET/x@minio:9000&region=x",   // a slash in the secret
        ]
        for c in cases {
            let r = Redact.url(c)
            XCTAssertFalse(r.contains("SECRET"), r)
            XCTAssertTrue(r.contains("***"), r)
        }
        let clean = "s3://b/p?endpoint=http://127.0.0.1:9000&region=x&path-style=true"
        XCTAssertEqual(Redact.url(clean), clean)
        XCTAssertEqual(Redact.url("user@example.com is not a URL"), "user@example.com is not a URL")
    }

    func testOriginKeepsSchemeHostAndPortOnly() {
        XCTAssertEqual(Redact.origin("https://hooks.example.com/services/T0/B0/TOKEN"), "https://hooks.example.com/…")
        XCTAssertEqual(Redact.origin("http://u:p@127.0.0.1:8080/x?y"), "http://127.0.0.1:8080/…")
        XCTAssertEqual(Redact.origin("http://127.0.0.1:8080"), "http://127.0.0.1:8080")
        XCTAssertEqual(Redact.origin("no scheme"), "(url)")
        XCTAssertEqual(Redact.origin("https://user:pa/SECRET@hooks.example.com/x"), "https://hooks.example.com/…")
    }
}

final class ParseRangeTests: XCTestCase {
    /// Found by the fuzzer: a size past Int64 trapped (`--spool-limit 99999999999999999999`).
    func testSizesAndDurationsOutOfRangeAreErrors() {
        XCTAssertThrowsError(try ByteSize.parse("\t\t" + String(repeating: "9", count: 60)))
        XCTAssertThrowsError(try ByteSize.parse("9000000000T"))
        XCTAssertThrowsError(try DurationText.parseMicroseconds(String(repeating: "9", count: 60) + "d"))
        XCTAssertEqual(try ByteSize.parse("2GB"), 2 << 30)
    }
}
