import XCTest
import CLZ4
@testable import WalshipLZ4

/// Frames are checked with the shim's XXH32, not liblz4's: liblz4's compressor is the oracle
/// (every frame it writes carries its own XXH32 of the content), over lengths around the
/// 16-byte stripe and 4-byte word boundaries, fed in random pieces.
final class LZ4ChecksumTests: XCTestCase {
    struct Rng {
        var state: UInt64
        mutating func next() -> UInt64 { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state }
    }

    func compress(_ data: [UInt8], level: Int32 = 0) throws -> [UInt8] {
        var out: [UInt8] = []
        let c = try LZ4FrameCompressor(level: level) { out += $0 }
        try c.write(data)
        try c.finish()
        return out
    }

    func decompress(_ frame: [UInt8], rng: inout Rng) throws -> [UInt8] {
        let d = try LZ4FrameDecompressor(name: "test")
        var out: [UInt8] = []
        var at = 0
        while at < frame.count {
            let n = min(frame.count - at, 1 + Int(rng.next() % 70_000))
            try frame.withUnsafeBytes { try d.feed(UnsafeRawBufferPointer(rebasing: $0[at..<at + n])) { out += $0 } }
            at += n
        }
        try d.finish()
        return out
    }

    func testTheShimsHashMatchesLiblz4sOverManyLengthsAndSplits() throws {
        var rng = Rng(state: 0x5EED_0001)
        for length in [0, 1, 3, 4, 5, 15, 16, 17, 19, 31, 32, 33, 64, 100, 1000, 262_143, 262_144, 262_145, 1_000_003] {
            let data = (0..<length).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
            for level: Int32 in [0, 3] {
                XCTAssertEqual(try decompress(try compress(data, level: level), rng: &rng), data, "length \(length)")
            }
        }
    }

    func testXXH32ReferenceVectors() {
        // From the xxhash package (4.1.0), on bytes (i * 7 + 3) mod 256, seeds 0 and 5.
        let vectors: [(Int, UInt32, UInt32)] = [
            (0, 0x02CC_5D05, 0x8093_8EDA), (1, 0x21AE_663A, 0x1369_B3DA), (15, 0x82D3_C84D, 0x2837_FDE9),
            (16, 0x8845_547D, 0x3E68_24FC), (17, 0x450E_5F84, 0x264D_A2EF), (100, 0x7309_1A4D, 0x30BF_213A),
            (4096, 0x4E81_883C, 0xBF8B_A54B),
        ]
        for (n, seed0, seed5) in vectors {
            let data = (0..<n).map { UInt8(truncatingIfNeeded: $0 * 7 + 3) }
            for (seed, want) in [(UInt32(0), seed0), (5, seed5)] {
                var s = walship_xxh32_state()
                walship_xxh32_init(&s, seed)
                data.withUnsafeBytes { walship_xxh32_update(&s, $0.baseAddress, $0.count) }
                XCTAssertEqual(walship_xxh32_digest(&s), want, "length \(n), seed \(seed)")
            }
        }
    }

    func testADamagedLiteralIsCaughtByTheContentChecksum() throws {
        var rng = Rng(state: 0x5EED_0002)
        // Random bytes do not compress: the block holds them as literals, so a flipped byte
        // decodes without a format error and only the checksum can see it.
        let data = (0..<100_000).map { _ in UInt8(truncatingIfNeeded: rng.next()) }
        var frame = try compress(data)
        frame[frame.count / 2] ^= 0x20
        XCTAssertThrowsError(try decompress(frame, rng: &rng)) { e in
            XCTAssertTrue("\(e)".contains("content checksum mismatch"), "\(e)")
        }
        var frame2 = try compress(data)
        frame2[frame2.count - 1] ^= 0x01   // the stored checksum itself
        XCTAssertThrowsError(try decompress(frame2, rng: &rng)) { e in
            XCTAssertTrue("\(e)".contains("content checksum mismatch"), "\(e)")
        }
    }

    func testASkippableFrameAloneIsNotTakenForAnEmptyFrame() throws {
        // Magic 0x184D2A5x, size 4, four bytes that would pass as the checksum of nothing.
        let frame: [UInt8] = [0x54, 0x2A, 0x4D, 0x18, 4, 0, 0, 0, 0x05, 0x5D, 0xCC, 0x02]
        var rng = Rng(state: 4)
        XCTAssertThrowsError(try decompress(frame, rng: &rng)) { e in
            XCTAssertTrue("\(e)".contains("not an LZ4 frame"), "\(e)")
        }
    }

    func testAFrameWithoutAContentChecksumIsRefused() throws {
        var prefs = LZ4F_preferences_t()
        prefs.frameInfo.contentChecksumFlag = LZ4F_noContentChecksum
        let data = [UInt8](repeating: 7, count: 1000)
        var frame = [UInt8](repeating: 0, count: LZ4F_compressFrameBound(data.count, &prefs))
        let n = frame.withUnsafeMutableBytes { f in data.withUnsafeBytes { d in
            LZ4F_compressFrame(f.baseAddress, f.count, d.baseAddress, d.count, &prefs)
        } }
        XCTAssertEqual(LZ4F_isError(n), 0)
        var rng = Rng(state: 3)
        XCTAssertThrowsError(try decompress(Array(frame[..<n]), rng: &rng)) { e in
            XCTAssertTrue("\(e)".contains("no content checksum"), "\(e)")
        }
    }
}
