import XCTest
import WalshipFormat
import WalshipSQLite
#if canImport(Glibc)
import Glibc
#endif

/// Builds WAL bytes by hand: header, then frames with a correct (or deliberately broken)
/// checksum chain.
struct HandWAL {
    var pageSize = 512
    var bigEndian = false
    var salt1: UInt32 = 0x1234_5678
    var salt2: UInt32 = 0x9abc_def0
    var checkpointSeq: UInt32 = 7
    var bytes: [UInt8] = []
    var running = WalChecksum.zero

    static func be(_ v: UInt32) -> [UInt8] { [UInt8(v >> 24), UInt8(v >> 16 & 0xff), UInt8(v >> 8 & 0xff), UInt8(v & 0xff)] }

    init(pageSize: Int = 512, bigEndian: Bool = false) {
        self.pageSize = pageSize
        self.bigEndian = bigEndian
        var h: [UInt8] = []
        h += HandWAL.be(bigEndian ? WalHeader.magicBig : WalHeader.magicLittle)
        h += HandWAL.be(3_007_000)
        h += HandWAL.be(UInt32(pageSize))
        h += HandWAL.be(checkpointSeq)
        h += HandWAL.be(salt1)
        h += HandWAL.be(salt2)
        running = h.withUnsafeBytes { WalChecksum.zero.updated(with: $0, bigEndianWords: bigEndian) }
        h += HandWAL.be(running.s0) + HandWAL.be(running.s1)
        bytes = h
    }

    mutating func frame(page pgno: UInt32, commitSize: UInt32 = 0, fill: UInt8, saltOverride: UInt32? = nil) {
        var fh = HandWAL.be(pgno) + HandWAL.be(commitSize) + HandWAL.be(saltOverride ?? salt1) + HandWAL.be(salt2)
        let page = [UInt8](repeating: fill, count: pageSize)
        var c = fh.prefix(8).withUnsafeBytes { running.updated(with: UnsafeRawBufferPointer($0), bigEndianWords: bigEndian) }
        c = page.withUnsafeBytes { c.updated(with: $0, bigEndianWords: bigEndian) }
        running = c
        fh += HandWAL.be(c.s0) + HandWAL.be(c.s1)
        bytes += fh + page
    }
}

final class WALTests: XCTestCase {
    func testHandBuiltWALParsesInEveryChunking() {
        for be in [false, true] {
            var w = HandWAL(pageSize: 512, bigEndian: be)
            w.frame(page: 1, fill: 1); w.frame(page: 2, commitSize: 2, fill: 2)     // txn 1
            w.frame(page: 2, fill: 3); w.frame(page: 3, fill: 4); w.frame(page: 2, commitSize: 3, fill: 5)  // txn 2: page 2 twice
            w.frame(page: 4, fill: 6)                                                 // uncommitted tail
            for chunk in [1, 3, 8, 24, 31, 32, 33, 512, 536, 537, 1000, .max] {
                let (h, txns) = committedTransactions(ofWal: w.bytes, chunkSize: chunk)
                XCTAssertEqual(h?.pageSize, 512)
                XCTAssertEqual(h?.bigEndianChecksum, be)
                XCTAssertEqual(txns.count, 2, "chunk \(chunk)")
                XCTAssertEqual(txns[0].pages.map(\.pageNumber), [1, 2])
                XCTAssertEqual(txns[1].commitSize, 3)
                XCTAssertEqual(txns[1].pages.map(\.pageNumber), [2, 3])
                XCTAssertEqual(txns[1].pages[0].page.first, 5, "last version of a page within a transaction")
            }
        }
    }

    func testBrokenChecksumChainEndsTheLog() {
        var w = HandWAL()
        w.frame(page: 1, commitSize: 1, fill: 1)
        w.frame(page: 2, commitSize: 2, fill: 2)
        let intact = w.bytes
        w.frame(page: 3, commitSize: 3, fill: 3)
        w.frame(page: 4, commitSize: 4, fill: 4)
        // Flip one byte in frame 3's page: frames 3 and 4 are no longer part of the log.
        var broken = w.bytes
        let frame3Page = walHeaderSize + 2 * (walFrameHeaderSize + 512) + walFrameHeaderSize + 100
        broken[frame3Page] ^= 0xff
        for chunk in [1, 17, 536, .max] {
            XCTAssertEqual(committedTransactions(ofWal: broken, chunkSize: chunk).1.count, 2)
        }
        XCTAssertEqual(committedTransactions(ofWal: w.bytes).1.count, 4)
        // A frame with the right checksum but a stale salt also ends the log.
        var stale = HandWAL()
        stale.frame(page: 1, commitSize: 1, fill: 1)
        stale.frame(page: 2, commitSize: 2, fill: 2, saltOverride: 0xdead)
        XCTAssertEqual(committedTransactions(ofWal: stale.bytes).1.count, 1)
        // A corrupt header means an empty log.
        var badHeader = intact
        badHeader[20] ^= 1
        XCTAssertNil(committedTransactions(ofWal: badHeader).0)
        XCTAssertEqual(committedTransactions(ofWal: badHeader).1.count, 0)
    }

    func testRestartCandidates() {
        let a = WalHeader.parse(HandWAL().bytes)!
        var b = a
        b.checkpointSequence = 1; b.salt1 &+= 1; b.salt2 = 42     // what a restarting connection may write
        XCTAssertTrue(a.couldRestart(to: b))
        var c = a
        c.salt1 = 0xdeadbeef; c.salt2 = 7                          // random salts (connection counter 0)
        XCTAssertTrue(a.couldRestart(to: c))
        var d = a
        d.pageSize = 1024; d.salt1 &+= 1
        XCTAssertFalse(a.couldRestart(to: d), "a page size change is never a restart")
        XCTAssertFalse(a.couldRestart(to: a))
    }

    /// A real WAL written by SQLite: parse it in many chunkings, apply its transactions to the
    /// database file as it was before, and get exactly the database SQLite checkpoints to.
    func testRealWALReplaysToTheCheckpointedDatabase() throws {
        for pageSize in [1024, 4096, 65536] {
            let dir = NSTemporaryDirectoryPath() + "/walship-waltest-\(getpid())-\(pageSize)"
            mkdir(dir, 0o755)
            defer { system("rm -rf '\(dir)'") }
            let dbPath = dir + "/t.db"
            let db = try SQLiteConnection(path: dbPath, mode: .readWriteCreate)
            try db.disableCheckpointOnClose()
            try db.execute("PRAGMA page_size=\(pageSize); PRAGMA journal_mode=WAL; PRAGMA wal_autocheckpoint=0; CREATE TABLE t(id INTEGER PRIMARY KEY, v BLOB)")
            try db.checkpoint(.truncate)
            let before = try readFile(dbPath)
            for i in 0..<60 {
                try db.execute("BEGIN; INSERT INTO t(v) VALUES(randomblob(\(100 + i * 37))); UPDATE t SET v = randomblob(50) WHERE id % 7 = \(i % 7); COMMIT")
            }
            try db.execute("DELETE FROM t WHERE id % 2 = 0")
            let wal = try readFile(dbPath + "-wal")
            try db.checkpoint(.truncate)
            let after = try readFile(dbPath)
            db.close()

            var reference: [UInt8]?
            for chunk in [1, 7, 24, 32, 33, pageSize - 1, pageSize + 24, pageSize * 3 + 5, 1 << 20] {
                let (h, txns) = committedTransactions(ofWal: wal, chunkSize: chunk)
                XCTAssertEqual(h?.pageSize, pageSize)
                XCTAssertEqual(txns.count, 61, "page size \(pageSize), chunk \(chunk)")
                var image = before
                for t in txns {
                    for (pg, bytes) in t.pages {
                        let off = Int(pg - 1) * pageSize
                        if image.count < off + pageSize { image += [UInt8](repeating: 0, count: off + pageSize - image.count) }
                        image.replaceSubrange(off..<off + pageSize, with: bytes)
                    }
                    image = Array(image.prefix(Int(t.commitSize) * pageSize))
                }
                if reference == nil { reference = image }
                XCTAssertEqual(image, reference)
            }
            XCTAssertEqual(reference, after, "replaying the WAL must give the checkpointed file, page size \(pageSize)")
        }
    }
}

func NSTemporaryDirectoryPath() -> String { ProcessInfoEnv.tmp }

enum ProcessInfoEnv {
    static var tmp: String { getenv("TMPDIR").map { String(cString: $0) } ?? "/tmp" }
}

func readFile(_ path: String) throws -> [UInt8] {
    guard let f = fopen(path, "rb") else { throw FormatError.invalidArgument("cannot open \(path)") }
    defer { fclose(f) }
    var out: [UInt8] = []
    var buf = [UInt8](repeating: 0, count: 1 << 16)
    while true {
        let n = fread(&buf, 1, buf.count, f)
        if n <= 0 { break }
        out += buf[0..<n]
    }
    return out
}
