import XCTest
#if canImport(Glibc)
import Glibc
#endif
@testable import WalshipAgent
import WalshipFormat
@testable import WalshipConfig
@testable import WalshipRestore
@testable import WalshipStorage
@testable import WalshipSystem

/// One sampling thread for the process dates the commits of every busy agent.
final class VisibilitySamplerTests: XCTestCase {
    /// A wal-index header whose last frame grows by one at every read.
    final class Source: @unchecked Sendable {
        private let m = Mutex()
        private var frame: UInt32 = 0
        let salt: UInt32
        init(salt: UInt32) { self.salt = salt }
        var reads: UInt32 { m.locked { frame } }
        func read() -> WalIndexHeader? {
            m.locked {
                frame += 1
                return WalIndexHeader(mxFrame: frame, salt1: salt, salt2: 2)
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
        let sources = (0..<50).map { Source(salt: UInt32(100 + $0)) }
        let logs = sources.map { s in VisibilityLog(everyUs: 2_000, sampler: sampler) { s.read() } }
        for l in logs { try l.start() }
        for l in logs { l.setBusy(true) }
        waitUntil("an armed log was never sampled") { sources.allSatisfy { $0.reads >= 3 } }
        for l in logs { l.setBusy(false) }
        XCTAssertEqual(sampler.armedCount, 0)
        // Disarmed: a sample under way finished before setBusy(false) returned.
        let after = sources.map(\.reads)
        usleep(100_000)
        XCTAssertEqual(sources.map(\.reads), after, "a disarmed log was sampled")
        // Samples date commits: each log holds its own source's samples, none of another's.
        XCTAssertNotNil(logs[7].firstSeen(salt1: 107, salt2: 2, commitFrame: 2))
        XCTAssertNil(logs[7].firstSeen(salt1: 108, salt2: 2, commitFrame: 1), "a sample of another log's source")
    }

    func testAStoppedLogIsNeverSampledAgain() throws {
        let sampler = VisibilitySampler()
        let s = Source(salt: 1)
        let log = VisibilityLog(everyUs: 1_000, sampler: sampler) { s.read() }
        try log.start()
        log.setBusy(true)
        waitUntil("never sampled") { s.reads >= 2 }
        log.stop()
        XCTAssertEqual(sampler.armedCount, 0, "a stopped log stays armed in the sampler")
        let n = s.reads
        usleep(50_000)
        XCTAssertEqual(s.reads, n, "sampled after stop() returned")
        log.setBusy(true)   // ignored once stopped
        usleep(50_000)
        XCTAssertEqual(s.reads, n)
    }
}
