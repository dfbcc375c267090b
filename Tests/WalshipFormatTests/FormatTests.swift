import XCTest
import WalshipFormat
import WalshipLZ4
#if canImport(Glibc)
import Glibc
#endif

final class ChecksumTests: XCTestCase {
    func testXXH64GoldenVectors() {
        XCTAssertEqual(XXH64.hash([UInt8]()), 0xEF46_DB37_51D8_E999)
        XCTAssertEqual(XXH64.hash(Array("abc".utf8)), 0x44BC_2CF5_AD77_0999)
        // Inputs of 32 bytes and more take the four-lane path, then every tail path. Reference
        // values from the xxhash package (4.1.0) on bytes (i * 7 + 3) mod 256.
        let vectors: [(Int, UInt64, UInt64)] = [
            (31, 0xA2AA_5F33_CC4A_6119, 0x4B62_0437_708C_3EA9), (32, 0x23C3_C17E_F790_FD97, 0xB483_E00F_1DD6_7337),
            (33, 0x50A7_CFC7_BA58_8784, 0xBB0F_5983_C203_F593), (63, 0x5E3E_54B4_31C7_493C, 0xBF5E_1C4F_A32C_6E24),
            (64, 0x0EB6_4B3E_F6EE_B01F, 0xAC77_14C4_1EC0_53A0), (100, 0xA61F_8D4C_170F_E531, 0x708D_C77A_BB05_EC00),
            (1000, 0x5F23_5FA0_33F1_A3FB, 0x208B_E8CA_F3F7_89AF), (4096, 0x7963_98CD_4327_97CC, 0x9B95_A478_F0AD_0D51),
        ]
        for (n, seed0, seed5) in vectors {
            let data = (0..<n).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }
            XCTAssertEqual(XXH64.hash(data), seed0, "length \(n), seed 0")
            XCTAssertEqual(XXH64.hash(data, seed: 5), seed5, "length \(n), seed 5")
        }
    }

    func testDatabaseChecksumIsOrderIndependentAndPageSensitive() {
        let a = [UInt8](repeating: 1, count: 4096), b = [UInt8](repeating: 2, count: 4096)
        let ha = a.withUnsafeBytes { DatabaseChecksum.pageHash($0, pageNumber: 1) }
        let hb = b.withUnsafeBytes { DatabaseChecksum.pageHash($0, pageNumber: 2) }
        let swapped = a.withUnsafeBytes { DatabaseChecksum.pageHash($0, pageNumber: 2) }
        XCTAssertNotEqual(ha ^ hb, swapped ^ b.withUnsafeBytes { DatabaseChecksum.pageHash($0, pageNumber: 1) })
        XCTAssertEqual(DatabaseChecksum.lockBytePage(pageSize: 4096), 262_145)
        XCTAssertEqual(DatabaseChecksum.lockBytePage(pageSize: 65536), 16_385)
    }
}

final class SegmentTests: XCTestCase {
    func makeSegment(pageSize: Int = 512) -> [UInt8] {
        var bytes = SegmentCodec.headerVersion1(pageSize: pageSize)
        for txid in UInt64(11)...13 {
            let pages: [UInt32] = txid == 12 ? [] : [1, UInt32(txid)]
            bytes += SegmentCodec.transactionHeader(TransactionHeader(txid: txid, commitTimeUs: Int64(txid) * 1000, dbPages: UInt32(txid), pageCount: UInt32(pages.count)))
            for p in pages { bytes += SegmentCodec.pageRecordPrefixVersion1(p) + [UInt8](repeating: UInt8(txid), count: pageSize) }
            bytes += SegmentCodec.transactionChecksum(txid * 100)
        }
        bytes += SegmentCodec.trailer(transactionCount: 3, lastTxid: 13, dbChecksum: 1300)
        return bytes
    }

    func decode(_ bytes: [UInt8], chunk: Int) throws -> [String] {
        var d = SegmentDecoder(name: "seg")
        var events: [String] = []
        var i = 0
        while i < bytes.count {
            let end = min(bytes.count, i + chunk)
            try d.feed(Array(bytes[i..<end])) { e in
                switch e {
                case .begin(let ps): events.append("begin \(ps)")
                case .transaction(let t): events.append("txn \(t.txid) \(t.commitTimeUs) \(t.dbPages) \(t.pageCount)")
                case .page(let p, let b): events.append("page \(p) \(b.count) \(b[0])")
                case .commit(let s): events.append("commit \(s)")
                case .end(let c, let l, let s): events.append("end \(c) \(l) \(s)")
                }
            }
            i = end
        }
        try d.finish()
        return events
    }

    func testRoundTripInEveryChunking() throws {
        let bytes = makeSegment()
        let reference = try decode(bytes, chunk: .max)
        XCTAssertEqual(reference.first, "begin 512")
        XCTAssertEqual(reference.filter { $0.hasPrefix("txn") }.count, 3)
        XCTAssertEqual(reference.last, "end 3 13 1300")
        XCTAssertTrue(reference.contains("txn 12 12000 12 0"))
        for chunk in [1, 2, 3, 4, 5, 15, 16, 17, 31, 32, 33, 516, 517, 1000] {
            XCTAssertEqual(try decode(bytes, chunk: chunk), reference, "chunk \(chunk)")
        }
    }

    func testTruncatedAndCorruptSegmentsFail() {
        let bytes = makeSegment()
        for cut in [0, 10, 16, 40, bytes.count - 1] {
            XCTAssertThrowsError(try decode(Array(bytes.prefix(cut)), chunk: 7), "cut at \(cut)")
        }
        var badTrailer = bytes
        badTrailer[badTrailer.count - 1] ^= 1     // trailer checksum no longer matches the last transaction
        XCTAssertThrowsError(try decode(badTrailer, chunk: .max))
        var badMagic = bytes
        badMagic[16] ^= 1
        XCTAssertThrowsError(try decode(badMagic, chunk: .max))
    }

    func testMetadataRoundTripAndCorruption() throws {
        let m = ObjectMetadata(kind: .segment, pageSize: 4096, firstTxid: 5, lastTxid: 9, firstTimeUs: 1, lastTimeUs: 2,
                               dbPages: 77, transactionCount: 5, dbChecksum: 0xfeed, payloadBytes: 1234, generation: "0006616277058590abcd",
                               databaseID: 0x0123_4567_89ab_cdef)
        let enc = m.encoded()
        XCTAssertEqual(enc.count, ObjectMetadata.encodedSize)
        XCTAssertEqual(try ObjectMetadata.decode(enc), m)
        var bad = enc
        bad[40] ^= 1
        XCTAssertThrowsError(try ObjectMetadata.decode(bad))
        XCTAssertThrowsError(try ObjectMetadata.decode(Array(enc.prefix(50))))
        XCTAssertEqual(try ObjectMetadata.decode(enc).databaseID, 0x0123_4567_89ab_cdef)
        XCTAssertNil(m.mismatch(database: 0x0123_4567_89ab_cdef))
        XCTAssertNil(m.mismatch(database: 0))   // 0: not recorded, nothing to check against
        XCTAssertNotNil(m.mismatch(database: 1))
    }

    func testDatabaseIDText() throws {
        XCTAssertEqual(try DatabaseID.parse("00000000000000a1"), 0xa1)
        XCTAssertEqual(DatabaseID.text(0xa1), "00000000000000a1")
        for bad in ["", "0000000000000000", "a1", "00000000000000a1f", "+0000000000000a1", "0x000000000000a1", "00000000000000zz"] {
            XCTAssertThrowsError(try DatabaseID.parse(bad), bad)
        }
    }
}

final class LZ4Tests: XCTestCase {
    func testStreamingRoundTripAndStandardFrame() throws {
        var compressed: [UInt8] = []
        let c = try LZ4FrameCompressor { compressed += $0 }
        var input: [UInt8] = []
        for i in 0..<300_000 { input.append(UInt8((i * 7) % 13)) }
        try c.write(Array(input[0..<1000])); try c.write(Array(input[1000...])); try c.finish()
        XCTAssertLessThan(compressed.count, input.count / 4)
        for chunk in [1, 100, 65536, .max] {
            let d = try LZ4FrameDecompressor(name: "x")
            var out: [UInt8] = []
            var i = 0
            while i < compressed.count {
                let end = min(compressed.count, i + chunk)
                try Array(compressed[i..<end]).withUnsafeBytes { try d.feed($0) { out += $0 } }
                i = end
            }
            try d.finish()
            XCTAssertEqual(out, input, "chunk \(chunk)")
        }
        // Truncation and corruption are detected (content checksum on).
        let t = try LZ4FrameDecompressor(name: "t")
        try Array(compressed.prefix(compressed.count - 3)).withUnsafeBytes { try t.feed($0) { _ in } }
        XCTAssertThrowsError(try t.finish())
        var bad = compressed
        bad[bad.count / 2] ^= 0x55
        XCTAssertThrowsError(try {
            let d = try LZ4FrameDecompressor(name: "bad")
            try bad.withUnsafeBytes { try d.feed($0) { _ in } }
            try d.finish()
        }())
        // The `lz4` tool reads a walship object: metadata in a skippable frame, then the frame.
        let meta = ObjectMetadata(kind: .snapshot, pageSize: 4096, firstTxid: 0, lastTxid: 0, firstTimeUs: 0, lastTimeUs: 0,
                                  dbPages: 0, transactionCount: 0, dbChecksum: 0, payloadBytes: UInt64(input.count), generation: "g")
        let dir = ProcessInfoEnv.tmp + "/walship-lz4-\(getpid())"
        mkdir(dir, 0o755)
        defer { system("rm -rf '\(dir)'") }
        let f = fopen(dir + "/obj.lz4", "wb")!
        let object = meta.encoded() + compressed
        fwrite(object, 1, object.count, f); fclose(f)
        XCTAssertEqual(system("lz4 -dqf '\(dir)/obj.lz4' '\(dir)/obj.out'"), 0, "lz4 -d must open walship objects (apt install lz4)")
        XCTAssertEqual(try readFile(dir + "/obj.out"), input)
    }
}

final class NamesAndTimeTests: XCTestCase {
    func testObjectNamesRoundTrip() {
        let s = SegmentName(generation: "0006616277058590abcd", level: 0, firstTxid: 1, lastTxid: 0x1f5, firstTimeMs: 1795925393418, lastTimeMs: 1795925393482)
        XCTAssertEqual(s.fileName, "0000000000000001-00000000000001f5-1795925393418-1795925393482.seg.lz4")
        XCTAssertEqual(SegmentName.parse(generation: s.generation, level: 0, fileName: s.fileName), s)
        XCTAssertNil(SegmentName.parse(generation: "g", level: 0, fileName: "junk.seg.lz4"))
        XCTAssertNil(SegmentName.parse(generation: "g", level: 0, fileName: "0000000000000005-0000000000000001-1-2.seg.lz4"))
        let n = SnapshotName(generation: "g", txid: 42, timeMs: 99)
        XCTAssertEqual(SnapshotName.parse(generation: "g", fileName: n.fileName), n)
        let g = GenerationID.make(timeUs: 1_700_000_000_000_000, random: 0xbeef)
        XCTAssertTrue(GenerationID.isValid(g))
        XCTAssertEqual(GenerationID.creationTimeUs(g), 1_700_000_000_000_000)
        XCTAssertLessThan(GenerationID.make(timeUs: 5, random: 0xffff), GenerationID.make(timeUs: 6, random: 0))
    }

    func testObjectKeysParseBack() {
        let gen = "0006616277058590abcd"
        let seg = SegmentName(generation: gen, level: 1, firstTxid: 7, lastTxid: 9, firstTimeMs: 10, lastTimeMs: 20)
        let squashed = SegmentName(generation: gen, level: 2, firstTxid: 1, lastTxid: 9, firstTimeMs: 1, lastTimeMs: 20, squashed: true)
        let snap = SnapshotName(generation: gen, txid: 42, timeMs: 99)
        XCTAssertEqual(ObjectKey.parse(seg.key), .segment(seg))
        XCTAssertEqual(ObjectKey.parse(squashed.key), .segment(squashed))
        XCTAssertEqual(ObjectKey.parse(snap.key), .snapshot(snap))
        XCTAssertEqual(ObjectKey.parse("generations/\(gen)/generation.json"), .generationInfo(generation: gen))
        XCTAssertEqual(ObjectKey.parse(seg.key)?.segment(atLevel: 1), seg)
        XCTAssertNil(ObjectKey.parse(seg.key)?.segment(atLevel: 0))
        XCTAssertEqual(ObjectKey.parse(snap.key)?.generation, gen)
        for bad in ["", "generations", "generations/\(gen)", "generations/NOTAGEN/generation.json",
                    "walship-delete/0001", "generations/\(gen)/segments/01/\(seg.fileName)",
                    "generations/\(gen)/segments/x/\(seg.fileName)", "generations/\(gen)/snapshots/\(seg.fileName)",
                    "generations/\(gen)/segments/1/\(snap.fileName)", "generations/\(gen)/other.json",
                    "generations//\(gen)/generation.json", "generations/\(gen)/segments/1/x/\(seg.fileName)"] {
            XCTAssertNil(ObjectKey.parse(bad), bad)
        }
    }

    func testDurations() throws {
        XCTAssertEqual(try DurationText.parseMicroseconds("500ms"), 500_000)
        XCTAssertEqual(try DurationText.parseMicroseconds("1s"), 1_000_000)
        XCTAssertEqual(try DurationText.parseMicroseconds("15m"), 900_000_000)
        XCTAssertEqual(try DurationText.parseMicroseconds("24h"), 86_400_000_000)
        XCTAssertEqual(try DurationText.parseMicroseconds("7d"), 604_800_000_000)
        XCTAssertEqual(try DurationText.parseMicroseconds("1h30m"), 5_400_000_000)
        XCTAssertEqual(try DurationText.parseMicroseconds("1.5s"), 1_500_000)
        for bad in ["", "5", "s", "5x", "-1s", "1s2"] {
            XCTAssertThrowsError(try DurationText.parseMicroseconds(bad), bad)
        }
        XCTAssertEqual(DurationText.format(microseconds: 100_000), "100ms")
    }

    func testTimestamps() throws {
        XCTAssertEqual(try Timestamp.parseMicroseconds("1970-01-01T00:00:00Z"), 0)
        XCTAssertEqual(try Timestamp.parseMicroseconds("2024-12-14T14:00:00Z"), 1_734_184_800_000_000)
        XCTAssertEqual(try Timestamp.parseMicroseconds("2024-12-14T14:00:00.250+01:00"), 1_734_184_800_000_000 - 3_600_000_000 + 250_000)
        XCTAssertEqual(try Timestamp.parseMicroseconds("2024-12-14T14:00:00.123456789Z"), 1_734_184_800_123_456)
        XCTAssertEqual(try Timestamp.parseMicroseconds("2000-02-29T23:59:59-05:30"), 951_888_599_000_000)
        for bad in ["2024-12-14", "2024-13-01T00:00:00Z", "2024-12-14T14:00:00", "yesterday", "2024-12-14T14:00:00+0100"] {
            XCTAssertThrowsError(try Timestamp.parseMicroseconds(bad), bad)
        }
        let t: Int64 = 1_734_184_800_123_456
        XCTAssertEqual(Timestamp.format(microseconds: t), "2024-12-14T14:00:00.123456Z")
        XCTAssertEqual(try Timestamp.parseMicroseconds(Timestamp.format(microseconds: t)), t)
    }
}

final class PlannerTests: XCTestCase {
    let g = "0006616277058590abcd"
    func seg(_ a: UInt64, _ b: UInt64, _ t0: Int64, _ t1: Int64, level: Int = 0) -> SegmentName {
        SegmentName(generation: g, level: level, firstTxid: a, lastTxid: b, firstTimeMs: t0, lastTimeMs: t1)
    }

    func testLatestTxidAndTimeTargets() throws {
        let listing = GenerationListing(id: g, snapshots: [SnapshotName(generation: g, txid: 0, timeMs: 1000)],
                                        segments: [seg(1, 10, 1100, 1900), seg(11, 20, 2100, 2900), seg(21, 30, 3100, 3900)])
        let latest = try RestorePlanner.plan([listing], target: .latest)
        XCTAssertEqual(latest.segments.map(\.lastTxid), [10, 20, 30])
        XCTAssertEqual(try RestorePlanner.plan([listing], target: .txid(15)).segments.map(\.lastTxid), [10, 20])
        XCTAssertEqual(try RestorePlanner.plan([listing], target: .txid(0)).segments.count, 0)
        XCTAssertEqual(try RestorePlanner.plan([listing], target: .timeUs(2_000_000)).segments.map(\.lastTxid), [10])
        XCTAssertEqual(try RestorePlanner.plan([listing], target: .timeUs(2_500_000)).segments.map(\.lastTxid), [10, 20])
        XCTAssertThrowsError(try RestorePlanner.plan([listing], target: .timeUs(999_000)))
        XCTAssertThrowsError(try RestorePlanner.plan([listing], target: .txid(31)))
        XCTAssertThrowsError(try RestorePlanner.plan([], target: .latest))
    }

    func testGapIsRefusedAndFewestObjectsChosen() throws {
        let gap = GenerationListing(id: g, snapshots: [SnapshotName(generation: g, txid: 0, timeMs: 1000)],
                                    segments: [seg(1, 10, 1100, 1900), seg(21, 30, 3100, 3900)])
        XCTAssertThrowsError(try RestorePlanner.plan([gap], target: .latest)) { e in
            XCTAssertEqual(e as? PlanError, .gap(generation: g, afterTxid: 10, nextTxid: 21))
        }
        XCTAssertEqual(try RestorePlanner.plan([gap], target: .txid(5)).segments.count, 1)
        let compacted = GenerationListing(id: g, snapshots: [SnapshotName(generation: g, txid: 0, timeMs: 1000)],
                                          segments: [seg(1, 10, 1100, 1900), seg(11, 20, 2100, 2900), seg(1, 20, 1100, 2900, level: 1), seg(21, 30, 3100, 3900)])
        XCTAssertEqual(try RestorePlanner.plan([compacted], target: .latest).segments.map(\.level), [1, 0])
    }

    func testNewestGenerationWinsAndOlderServesEarlierTimes() throws {
        let old = GenerationListing(id: "0000000000000001aaaa", snapshots: [SnapshotName(generation: "0000000000000001aaaa", txid: 0, timeMs: 1000)],
                                    segments: [SegmentName(generation: "0000000000000001aaaa", level: 0, firstTxid: 1, lastTxid: 5, firstTimeMs: 1100, lastTimeMs: 1500)])
        let new = GenerationListing(id: "0000000000000002aaaa", snapshots: [SnapshotName(generation: "0000000000000002aaaa", txid: 6, timeMs: 5000)], segments: [])
        XCTAssertEqual(try RestorePlanner.plan([old, new], target: .latest).generation, "0000000000000002aaaa")
        XCTAssertEqual(try RestorePlanner.plan([old, new], target: .timeUs(2_000_000)).generation, "0000000000000001aaaa")
        XCTAssertEqual(try RestorePlanner.plan([old, new], target: .txid(3)).generation, "0000000000000001aaaa")
    }
}
