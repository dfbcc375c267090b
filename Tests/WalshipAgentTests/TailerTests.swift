import XCTest
@testable import WalshipAgent
import WalshipFormat
#if canImport(Glibc)
import Glibc
#endif
@testable import WalshipConfig
@testable import WalshipRestore
@testable import WalshipStorage
@testable import WalshipSystem

/// The WAL tailer against logs written by hand, byte for byte as SQLite lays them out, where
/// a real application could produce the same only by luck of timing.
final class TailerTests: XCTestCase {
    /// Header and frames with a correct checksum chain (native little-endian checksums).
    struct Log {
        let pageSize = 512
        let salt1: UInt32 = 0x0102_0304, salt2: UInt32 = 0x0a0b_0c0d
        var bytes: [UInt8] = []
        var running = WalChecksum.zero

        static func be(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }

        init() {
            var h = Log.be(WalHeader.magicLittle) + Log.be(3_007_000) + Log.be(UInt32(pageSize)) + Log.be(1) + Log.be(salt1) + Log.be(salt2)
            running = h.withUnsafeBytes { WalChecksum.zero.updated(with: $0, bigEndianWords: false) }
            h += Log.be(running.s0) + Log.be(running.s1)
            bytes = h
        }

        mutating func frame(page: UInt32, commitSize: UInt32 = 0, fill: UInt8) {
            var fh = Log.be(page) + Log.be(commitSize) + Log.be(salt1) + Log.be(salt2)
            let body = [UInt8](repeating: fill, count: pageSize)
            var c = fh.withUnsafeBytes { running.updated(with: UnsafeRawBufferPointer(rebasing: $0[0..<8]), bigEndianWords: false) }
            c = body.withUnsafeBytes { c.updated(with: $0, bigEndianWords: false) }
            running = c
            fh += Log.be(c.s0) + Log.be(c.s1)
            bytes += fh + body
        }
    }

    private func write(_ bytes: [UInt8], to path: String) throws {
        let f = try RawFile(path: path, flags: O_WRONLY | O_CREAT, mode: 0o600)
        try bytes.withUnsafeBytes { try f.write(at: 0, $0) }
    }

    private func transactions(_ o: WalTailer.Observation) -> [CommittedTransaction] {
        if case .transactions(let t) = o { return t }
        XCTFail("expected transactions, got \(o)")
        return []
    }

    /// A transaction spills frames 3-6 and rolls back; the tailer has read them. The next
    /// transaction is written from frame 3 again, further than the first (frames 3-8, commit
    /// at 8). One poll, as the agent makes under the write lock, must return that commit:
    /// before, it stopped at the frame where the old chain broke and returned nothing, and the
    /// self-check then saw SQLite's last commit past the tailer's (a false divergence, and a
    /// needless new generation).
    func testCommitWrittenOverALongerRolledBackTransactionIsReadInOnePoll() throws {
        let path = NSTemporaryDirectory() + "walship-tailer-\(getpid())-\(UInt32.random(in: 0...UInt32.max))-wal"
        defer { unlink(path) }
        var committed = Log()
        committed.frame(page: 1, fill: 1)
        committed.frame(page: 2, commitSize: 2, fill: 2)
        var rolledBack = committed
        for p in 3...6 { rolledBack.frame(page: UInt32(p), fill: 0xA0) }
        var rewritten = committed
        for p in 3...7 { rewritten.frame(page: UInt32(p), fill: 0xB0) }
        rewritten.frame(page: 8, commitSize: 8, fill: 0xB1)

        var index = WalIndexHeader(mxFrame: 2, salt1: committed.salt1, salt2: committed.salt2)
        try write(rolledBack.bytes, to: path)
        let tailer = WalTailer(walPath: path)
        tailer.walIndex = { index }
        guard case .headerChanged(_, let h) = try tailer.poll() else { return XCTFail("expected the header first") }
        tailer.adopt(h)
        let first = transactions(try tailer.poll())
        XCTAssertEqual(first.map(\.commitFrame), [2])
        XCTAssertEqual(tailer.framesInLog, 2)

        try write(rewritten.bytes, to: path)
        index = WalIndexHeader(mxFrame: 8, salt1: committed.salt1, salt2: committed.salt2)
        let second = transactions(try tailer.poll())
        XCTAssertEqual(second.map(\.commitFrame), [8])
        XCTAssertEqual(second.first?.frames.map(\.0), [3, 4, 5, 6, 7, 8])
        XCTAssertEqual(tailer.framesInLog, 8)
    }
}
