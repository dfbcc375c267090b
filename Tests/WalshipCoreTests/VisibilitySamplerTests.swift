import XCTest
#if canImport(Glibc)
import Glibc
#endif
@testable import WalshipCore
import WalshipFormat

/// One sampling thread for the process dates the commits of every busy agent.
final class VisibilitySamplerTests: XCTestCase {
    /// A wal-index header whose last frame grows by one at every read.
    final class Source: @unchecked Sendable {
        private let m = Mutex()
        private var frame: UInt32 = 0
        var reads: UInt32 { m.locked { frame } }
        func read() -> WalIndexHeader? {
            m.locked {
                frame += 1
                return WalIndexHeader(mxFrame: frame, salt1: 1, salt2: 2)
            }
        }
    }

    private func waitUntil(_ what: String, _ cond: () -> Bool) {
        let deadline = monotonicMicroseconds() + 10_000_000
        while !cond() && monotonicMicroseconds() < deadline { usleep(2_000) }
        XCTAssertTrue(cond(), what)
    }

    func testEveryArmedLogIsSampledByTheOneThreadAndOnlyWhileArmed() throws {
        let sampler = VisibilitySampler()
        let sources = (0..<50).map { _ in Source() }
        let logs = sources.map { s in VisibilityLog(everyUs: 2_000, sampler: sampler) { s.read() } }
        for l in logs { try l.start() }
        for l in logs { l.setBusy(true) }
        waitUntil("an armed log was never sampled") { sources.allSatisfy { $0.reads >= 3 } }
        for l in logs { l.setBusy(false) }
        // Disarmed: at most one sample already under way may still land.
        let after = sources.map(\.reads)
        usleep(100_000)
        for (s, a) in zip(sources, after) { XCTAssertLessThanOrEqual(s.reads, a + 1) }
        // Samples date commits: each log saw its frames grow.
        XCTAssertNotNil(logs[7].firstSeen(salt1: 1, salt2: 2, commitFrame: 2))
        XCTAssertNil(logs[7].firstSeen(salt1: 9, salt2: 2, commitFrame: 1), "a sample of another log's salts")
    }

    func testAStoppedLogIsNeverSampledAgain() throws {
        let sampler = VisibilitySampler()
        let s = Source()
        let log = VisibilityLog(everyUs: 1_000, sampler: sampler) { s.read() }
        try log.start()
        log.setBusy(true)
        waitUntil("never sampled") { s.reads >= 2 }
        log.stop()
        let n = s.reads
        usleep(50_000)
        XCTAssertEqual(s.reads, n, "sampled after stop() returned")
        log.setBusy(true)   // ignored once stopped
        usleep(50_000)
        XCTAssertEqual(s.reads, n)
    }
}
