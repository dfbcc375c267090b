import XCTest
@testable import WalshipAgent
import WalshipFormat
import Dispatch
#if canImport(Glibc)
import Glibc
#endif
@testable import WalshipConfig
@testable import WalshipRestore
@testable import WalshipStorage
@testable import WalshipSystem

/// The restore's read-ahead thread: objects come out whole and in order, a damaged object's
/// error comes after the payload read before it and nothing after it, and stopping early never
/// leaves a thread waiting (on a full queue, or on a download that will not start).
final class ReadAheadTests: XCTestCase {
    var root = ""

    override func setUpWithError() throws {
        root = FS.absolute("readahead-\(getpid())-\(UInt64.random(in: 0...UInt64.max))")
        try FS.makeDirectories(root, mode: 0o700)
    }

    override func tearDown() { FS.removeTree(root) }

    /// Writes an object of `count` bytes (seeded, not compressible) and returns its key and payload.
    func writeObject(_ n: Int, count: Int) throws -> (String, [UInt8]) {
        var rng = UInt64(n + 1) &* 0x9E37_79B9_7F4A_7C15
        let payload = (0..<count).map { _ -> UInt8 in
            rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17
            return UInt8(truncatingIfNeeded: rng)
        }
        let key = "objects/\(n).lz4"
        try FS.makeDirectories(root + "/objects", mode: 0o700)
        let b = try ObjectBuilder(path: root + "/" + key)
        try b.write(payload)
        try b.finish(ObjectMetadata(kind: .segment, pageSize: 4096, firstTxid: UInt64(n), lastTxid: UInt64(n),
                                    firstTimeUs: 0, lastTimeUs: 0, dbPages: 1, transactionCount: 1,
                                    dbChecksum: 0, payloadBytes: 0, generation: "000661a9e1ac7a663fb0"))
        return (key, payload)
    }

    /// Reads every item of one object; nil payload when the object failed.
    func drain(_ r: ObjectReadAhead) -> (meta: Bool, payload: [UInt8], error: Error?) {
        var sawMeta = false
        var bytes: [UInt8] = []
        while true {
            switch r.next() {
            case .metadata: sawMeta = true
            case .payload(let b): bytes += b; r.recycle(b)
            case .end: return (sawMeta, bytes, nil)
            case .failed(let e): return (sawMeta, bytes, e)
            }
        }
    }

    func testObjectsComeOutWholeAndInOrderThroughASmallQueue() throws {
        let replica = FileReplica(root: root)
        let objects = try (0..<4).map { try writeObject($0, count: [3 << 20, 10, 700_000, 1 << 20][$0]) }
        let reader = try ObjectReadAhead(jobs: objects.map { o in .init(key: o.0, kind: .segment) { replica } },
                                         encryption: nil, allowUnencrypted: false, capacity: 300_000)
        defer { reader.cancel() }
        for (_, payload) in objects {
            let got = drain(reader)
            XCTAssertTrue(got.meta)
            XCTAssertNil(got.error)
            XCTAssertEqual(got.payload, payload)
        }
    }

    func testADamagedObjectFailsAfterThePayloadBeforeTheDamageAndStopsTheReader() throws {
        let replica = FileReplica(root: root)
        let objects = try (0..<3).map { try writeObject($0, count: 2 << 20) }
        // Damage the middle of object 1's second half: the frame's content checksum fails at
        // its end, after its payload went out.
        let fd = open(root + "/" + objects[1].0, O_RDWR)
        XCTAssertGreaterThanOrEqual(fd, 0)
        var byte: UInt8 = 0
        XCTAssertEqual(pread(fd, &byte, 1, 1_500_000), 1)
        byte ^= 0x5A
        XCTAssertEqual(pwrite(fd, &byte, 1, 1_500_000), 1)
        close(fd)
        let reader = try ObjectReadAhead(jobs: objects.map { o in .init(key: o.0, kind: .segment) { replica } },
                                         encryption: nil, allowUnencrypted: false, capacity: 1 << 20)
        defer { reader.cancel() }
        XCTAssertNil(drain(reader).error)
        let bad = drain(reader)
        let message = "\(bad.error.map { "\($0)" } ?? "no error")"
        XCTAssertTrue(message.contains(objects[1].0), message)
        XCTAssertGreaterThan(bad.payload.count, 0, "payload before the damage is handed over before the error")
    }

    /// A truncated object's error comes after every byte decoded before it, as reading it
    /// directly hands them over: a target inside it is still reached.
    func testATruncatedObjectHandsOverItsDecodedTailBeforeTheError() throws {
        let replica = FileReplica(root: root)
        let o = try writeObject(0, count: 100_000)
        let path = root + "/" + o.0
        XCTAssertEqual(truncate(path, off_t(FS.fileSize(path)! - 1)), 0)   // a byte of the checksum
        var direct = 0
        XCTAssertThrowsError(try streamObject(replica, key: o.0, expect: .segment) { direct += $0.count })
        XCTAssertEqual(direct, 100_000)
        let reader = try ObjectReadAhead(jobs: [.init(key: o.0, kind: .segment) { replica }], encryption: nil, allowUnencrypted: false)
        defer { reader.cancel() }
        let got = drain(reader)
        XCTAssertNotNil(got.error)
        XCTAssertEqual(got.payload, o.1)
    }

    func testCancelWhileTheReaderWaitsOnAFullQueueReturns() throws {
        let replica = FileReplica(root: root)
        let objects = try (0..<3).map { try writeObject($0, count: 4 << 20) }
        let reader = try ObjectReadAhead(jobs: objects.map { o in .init(key: o.0, kind: .segment) { replica } },
                                         encryption: nil, allowUnencrypted: false, capacity: 256 << 10)
        _ = reader.next()   // metadata of object 0; the queue then fills and the reader waits
        usleep(100_000)
        XCTAssertTrue(returnsWithin(seconds: 10) { reader.cancel() }, "cancel hung")
    }

    /// A restore that stops at its target while the reader waits for a download that needs a
    /// window place: abandoning the prefetch wakes it.
    func testStoppingEarlyDoesNotWaitForADownloadThatNeverStarts() throws {
        let replica = FileReplica(root: root)
        let objects = try (0..<4).map { try writeObject($0, count: 100_000) }
        let prefetch = try SegmentPrefetcher(keys: objects.map(\.0), dir: root + "/prefetch", parallel: 1, window: 1) { replica }
        defer { prefetch.finish() }
        var jobs: [ObjectReadAhead.Job] = []
        for (i, o) in objects.enumerated() {
            jobs.append(.init(key: o.0, kind: .segment) { try prefetch.object(i, original: replica) })
        }
        let reader = try ObjectReadAhead(jobs: jobs, encryption: nil, allowUnencrypted: false)
        XCTAssertNil(drain(reader).error)   // object 0, never released: object 1 cannot download
        usleep(100_000)
        XCTAssertTrue(returnsWithin(seconds: 10) { prefetch.abandon(); reader.cancel() }, "stopping hung")
    }

    /// Downloaded copies live in memory up to the budget, then move to files; both read back
    /// the same, and nothing is left in the download directory.
    func testCopiesInMemoryAndCopiesMovedToDiskReadTheSame() throws {
        let replica = FileReplica(root: root)
        let objects = try (0..<5).map { try writeObject($0, count: [300_000, 3 << 20, 10, 2 << 20, 5 << 20][$0]) }
        for budget in [64 << 20, 2 << 20, 1 << 20] {
            let dir = root + "/prefetch-\(budget)"
            let prefetch = try SegmentPrefetcher(keys: objects.map(\.0), dir: dir, parallel: 2, window: 3, memoryBudget: budget) { replica }
            for (i, o) in objects.enumerated() {
                var got: [UInt8] = []
                try streamObject(try prefetch.object(i, original: replica), key: o.0, expect: .segment) { got += $0 }
                XCTAssertEqual(got, o.1, "object \(i), budget \(budget)")
                prefetch.release(i)
            }
            prefetch.finish()
            XCTAssertFalse(FS.exists(dir))
        }
    }

    func returnsWithin(seconds: Int, _ body: @escaping () -> Void) -> Bool {
        let done = DispatchSemaphore(value: 0)
        guard let t = try? JoinableThread({ body(); done.signal() }) else { return false }
        guard done.wait(timeout: .now() + .seconds(seconds)) == .success else { return false }   // left running
        t.join()
        return true
    }
}

/// The compression level of level-1 merges: a light writer's window is merged with the
/// high-compression level (it is uploaded a second time, whole), a heavy writer's with the
/// fast one.
final class MergeLevelTests: XCTestCase {
    func testLightWindowsMergeAtTheHighCompressionLevelAndHeavyOnesFast() {
        let hc = ObjectBuilder.segmentLevel
        XCTAssertEqual(ObjectBuilder.mergeLevel(inputBytes: 20 << 20, spanMs: 1_000), hc)
        // Five minutes of a writer at 500 small transactions a second: 130 MB stored.
        XCTAssertEqual(ObjectBuilder.mergeLevel(inputBytes: 130_000_000, spanMs: 299_000), hc)
        // A gigabyte in fifteen seconds.
        XCTAssertEqual(ObjectBuilder.mergeLevel(inputBytes: 1 << 30, spanMs: 15_000), 0)
        // A span of zero (one commit time) is one second, not a division by zero.
        XCTAssertEqual(ObjectBuilder.mergeLevel(inputBytes: 40 << 20, spanMs: 0), 0)
    }
}
