import XCTest
@testable import WalshipAgent
import Logging
#if canImport(Glibc)
import Glibc
#endif
import WalshipSQLite
@testable import WalshipSystem

/// The agent's loop in this process, turn by turn, on a clock the test moves: a real SQLite
/// database and writer, a directory replica, no waits on the system's clocks. What is cut and
/// when depends only on the turns and the clock, never on the schedule of the machine.
final class AgentLoopTests: XCTestCase {
    /// A clock that moves only when the test says.
    final class FakeClock: LoopClock, @unchecked Sendable {
        private let m = Mutex()
        private var mono: Int64 = 5_000_000_000
        private var wall: Int64 = 1_900_000_000_000_000
        func monotonicUs() -> Int64 { m.locked { mono } }
        func wallUs() -> Int64 { m.locked { wall } }
        func advance(_ us: Int64) { m.locked { mono += us; wall += us } }
        func stepWall(_ us: Int64) { m.locked { wall += us } }
    }

    private var dir = ""
    private var db: SQLiteConnection!
    private var agent: Agent?

    override func setUpWithError() throws {
        var template = Array("/tmp/walship-loop-XXXXXX".utf8CString)
        XCTAssertNotNil(template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) })
        dir = String(cString: template)
        db = try SQLiteConnection(path: dir + "/app.db", mode: .readWriteCreate)
        try db.execute("PRAGMA journal_mode=WAL")
        try db.execute("CREATE TABLE t(x)")
    }

    override func tearDown() {
        if let a = agent {
            a.stop()
            _ = try? a.turn(changed: false)
            try? a.endRun()
        }
        agent = nil
        db = nil
        _ = system("rm -rf '\(dir)'")
    }

    private func makeAgent(_ clock: FakeClock, sync: Int64 = 1_000_000, snapshotEvery: Int64 = 86_400_000_000) throws -> (Agent, WorkerPool.Next) {
        var o = AgentOptions(databasePath: dir + "/app.db", replicaURLs: [dir + "/replica"])
        o.spoolDirectory = dir + "/spool"
        o.syncIntervalUs = sync
        o.snapshotIntervalUs = snapshotEvery
        o.readDelayUs = 0
        let a = Agent(options: o, logger: Logger(label: "test"), clock: clock)
        try a.start()
        let next = try a.beginRun()
        agent = a   // (tearDown stops it)
        return (a, next)
    }

    private func walk(_ path: String) -> [String] {
        guard FS.isDirectory(path) else { return [path] }
        return ((try? FS.list(path)) ?? []).flatMap { walk(path + "/" + $0) }
    }

    /// Objects of `kind` ("segments" or "snapshots") in the replica, once the uploads settle.
    private func objects(_ kind: String, atLeast n: Int = 0) -> [String] {
        let deadline = monotonicMicroseconds() + 10_000_000
        while true {
            let out = walk(dir + "/replica").filter { $0.contains("/\(kind)/") }
            if out.count >= n || monotonicMicroseconds() > deadline { return out.sorted() }
            usleep(5_000)
        }
    }

    /// Turns with no change, the clock moved to each one's time, for `us` of the loop's time.
    /// Returns the times the turns asked for.
    @discardableResult
    private func idleTurns(_ a: Agent, _ clock: FakeClock, _ next: inout WorkerPool.Next, forUs us: Int64) throws -> [Int64] {
        let end = clock.monotonicUs() + us
        var asked: [Int64] = []
        while clock.monotonicUs() < end {
            clock.advance(max(1, min(next.atUs, end) - clock.monotonicUs()))
            next = try XCTUnwrap(a.turn(changed: false))
            asked.append(next.atUs)
        }
        return asked
    }

    func testACommitIsCutAtTheNextTickOfTheSyncGridAndNotBefore() throws {
        let clock = FakeClock()
        var (a, next) = try makeAgent(clock)
        let t0 = clock.monotonicUs()
        let before = a.currentTxid
        XCTAssertLessThanOrEqual(next.atUs, t0 + 1_000_000, "the first wait must end by the first cut")
        XCTAssertTrue(next.wakeOnChange)
        try db.execute("INSERT INTO t VALUES (1)")
        clock.advance(300_000)
        next = try XCTUnwrap(a.turn(changed: true))
        // Until the cut, every wait ends by the cut's time on the grid, and nothing is shipped.
        let asked = try idleTurns(a, clock, &next, forUs: t0 + 1_000_000 - 1 - clock.monotonicUs())
        XCTAssertTrue(asked.dropLast().allSatisfy { $0 <= t0 + 1_000_000 }, "a wait went past the cut: \(asked)")
        usleep(200_000)
        XCTAssertEqual(objects("segments"), [], "a segment was shipped before its sync interval ended")
        clock.advance(t0 + 1_000_000 - clock.monotonicUs())
        next = try XCTUnwrap(a.turn(changed: false))
        XCTAssertEqual(objects("segments", atLeast: 1).count, 1, "the cut at the sync interval shipped no segment")
        XCTAssertEqual(a.currentTxid, before + 1)
    }

    func testAnIdleDatabaseIsLookedAtOnceASecondNotAtEveryTick() throws {
        let clock = FakeClock()
        var (a, next) = try makeAgent(clock, sync: 100_000)
        // Its first turn reads what start() left (the change that setUpWakeups notes).
        next = try XCTUnwrap(a.turn(changed: a.wakeupForScheduling.takeChange()))
        let asked = try idleTurns(a, clock, &next, forUs: 4_000_000)
        // Busy for two seconds after the last change (every 20 ms at most), then idle.
        XCTAssertLessThan(asked.count, 2_000_000 / 20_000 + 2 * 10 + 10, "too many turns for 4 s: \(asked.count)")
        let now = clock.monotonicUs()
        XCTAssertEqual(next.atUs - now, 1_000_000, "an idle database woke more often than once a second")
        XCTAssertTrue(next.wakeOnChange, "an idle database must still wake on a commit")
        XCTAssertEqual(next.toleranceUs, 50_000, "an idle database's look may share a wake-up with others")
        // A commit ends the idle state: the next wait is bounded by the 100 ms grid again.
        try db.execute("INSERT INTO t VALUES (1)")
        next = try XCTUnwrap(a.turn(changed: true))
        XCTAssertLessThanOrEqual(next.atUs - clock.monotonicUs(), 100_000)
        XCTAssertEqual(next.toleranceUs, 0, "a busy database's cut must not be late")
    }

    func testAWallClockStepForwardTakesTheDueSnapshotAndOneBackTakesNone() throws {
        let clock = FakeClock()
        var (a, next) = try makeAgent(clock, snapshotEvery: 3_600_000_000)
        XCTAssertEqual(objects("snapshots", atLeast: 1).count, 1, "a new generation starts with its snapshot")
        try db.execute("INSERT INTO t VALUES (1)")
        next = try XCTUnwrap(a.turn(changed: true))
        // The wall clock steps back a day: nothing is due, and the loop goes on.
        clock.stepWall(-86_400_000_000)
        try idleTurns(a, clock, &next, forUs: 3_000_000)
        usleep(200_000)
        XCTAssertEqual(objects("snapshots").count, 1, "a step back of the wall clock took a snapshot")
        // Two hours forward of the last snapshot: the scheduled one is due, the database changed.
        clock.stepWall(86_400_000_000 + 7_200_000_000)
        try db.execute("INSERT INTO t VALUES (2)")
        next = try XCTUnwrap(a.turn(changed: true))
        try idleTurns(a, clock, &next, forUs: 1_000_000)
        XCTAssertEqual(objects("snapshots", atLeast: 2).count, 2, "the snapshot due after the step forward was not taken")
    }

    func testAStopEndsTheLoopAtTheNextTurnAndShipsWhatIsCommitted() throws {
        let clock = FakeClock()
        let (a, _) = try makeAgent(clock, sync: 60_000_000)
        try db.execute("INSERT INTO t VALUES (1)")
        _ = try a.turn(changed: true)
        a.stop()
        XCTAssertNil(try a.turn(changed: false), "a stopped agent's loop went on")
        try a.endRun()
        agent = nil
        XCTAssertEqual(objects("segments", atLeast: 1).count, 1, "the commit made before the stop was not shipped at shutdown")
    }

    /// An agent that ends without its shutdown (an error in its loop) must leave nothing locked
    /// in the process: a directory's database is retried by a new agent in the same process.
    /// Before, the spool's lock stayed with the dead agent and every retry found it "running".
    func testAnAgentThatEndsOnAnErrorLeavesNothingLockedForTheNextOne() throws {
        let clock = FakeClock()
        do {
            let (a, next) = try makeAgent(clock)
            _ = (a, next)
            agent = nil   // gone as after an error: no endRun
        }
        let (b, _) = try makeAgent(clock)
        try db.execute("INSERT INTO t VALUES (1)")
        XCTAssertNotNil(try b.turn(changed: true))
    }
}
