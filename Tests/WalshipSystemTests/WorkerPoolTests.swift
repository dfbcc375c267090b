import XCTest
#if canImport(Glibc)
import Glibc
#endif
@testable import WalshipSystem

/// The pool that runs every agent: threads bounded by its size, steps in order, one at a time
/// per job, and parked jobs woken by their timer, a change they asked for, or a stop.
final class WorkerPoolTests: XCTestCase {
    /// A job's counters, shared with the test thread.
    private final class Counter: @unchecked Sendable {
        let m = Mutex()
        var steps = 0
        var inside = 0
        var overlaps = 0
        var stepTimes: [Int64] = []
        var done = false
    }

    private func waitUntil(_ what: String, timeoutUs: Int64 = 10_000_000, _ cond: () -> Bool) {
        let deadline = monotonicMicroseconds() + timeoutUs
        while !cond() {
            if monotonicMicroseconds() > deadline { XCTFail("timed out waiting for: \(what)"); return }
            usleep(1_000)
        }
    }

    func testManyJobsRunOnAFewThreadsOneStepAtATimeEach() throws {
        let pool = WorkerPool(threads: 3, hub: nil)
        var counters: [Counter] = []
        for _ in 0..<300 {
            let c = Counter()
            counters.append(c)
            try pool.add(wakeup: Wakeup()) {
                c.m.locked { c.inside += 1; if c.inside > 1 { c.overlaps += 1 } }
                usleep(100)
                return c.m.locked {
                    c.inside -= 1
                    c.steps += 1
                    if c.steps == 5 { c.done = true; return .done }
                    return .again(WorkerPool.Next(atUs: monotonicMicroseconds() + 2_000, wakeOnChange: true))
                }
            }
        }
        waitUntil("every job's five steps") { counters.allSatisfy { c in c.m.locked { c.done } } }
        XCTAssertLessThanOrEqual(pool.threadCount, 3, "300 jobs took more threads than the pool's size")
        XCTAssertEqual(counters.map { c in c.m.locked { c.overlaps } }.reduce(0, +), 0, "a job ran on two threads at once")
        XCTAssertEqual(counters.map { c in c.m.locked { c.steps } }, Array(repeating: 5, count: 300))
        waitUntil("jobs counted done") { pool.jobCount == 0 }
    }

    func testOneJobTakesOneThread() throws {
        let pool = WorkerPool(threads: 8, hub: nil)
        let c = Counter()
        try pool.add(wakeup: Wakeup()) {
            c.m.locked { c.steps += 1; if c.steps == 20 { c.done = true } }
            return c.m.locked { c.done } ? .done : .again(WorkerPool.Next(atUs: monotonicMicroseconds() + 1_000, wakeOnChange: true))
        }
        waitUntil("twenty steps") { c.m.locked { c.done } }
        XCTAssertEqual(pool.threadCount, 1)
    }

    func testAParkedJobWakesOnAChangeItAskedForAndOnAStopAlways() throws {
        let pool = WorkerPool(threads: 2, hub: nil)
        let w = Wakeup()
        let c = Counter()
        try pool.add(wakeup: w) {
            let n: Int = c.m.locked { c.steps += 1; return c.steps }
            if w.stopped { c.m.locked { c.done = true }; return .done }
            _ = w.takeChange()
            // `inside` now says which step has taken its change (the pool parks it right after:
            // a change from here on either finds it parked or is seen by the pool as it parks).
            c.m.locked { c.inside = n }
            // Step 1 parks for news; step 2 parks deaf to changes; both for a minute.
            return .again(WorkerPool.Next(atUs: monotonicMicroseconds() + 60_000_000, wakeOnChange: n == 1))
        }
        waitUntil("the first step") { c.m.locked { c.inside } == 1 }
        w.notifyChange()
        waitUntil("a step on the change") { c.m.locked { c.inside } == 2 }
        w.notifyChange()
        usleep(100_000)
        XCTAssertEqual(c.m.locked { c.steps }, 2, "a change woke a job parked without wake-on-change")
        XCTAssertTrue(w.hasChange, "the change must stay for the job's next step")
        w.stop()
        waitUntil("the step on the stop") { c.m.locked { c.done } }
    }

    func testTimersFireInOrderOfTheirTimes() throws {
        let pool = WorkerPool(threads: 1, hub: nil)
        let order = Counter()
        var seen: [Int] = []
        // Added latest first; each first step only parks, and all of them run long before the
        // earliest timer (half a second later) on the pool's one thread.
        let start = monotonicMicroseconds()
        for i in (0..<10).reversed() {
            var first = true
            try pool.add(wakeup: Wakeup()) {
                if first {
                    first = false
                    return .again(WorkerPool.Next(atUs: start + 500_000 + Int64(i) * 10_000, wakeOnChange: false))
                }
                order.m.locked { seen.append(i) }
                return .done
            }
        }
        waitUntil("ten timers") { order.m.locked { seen.count } == 10 }
        XCTAssertEqual(order.m.locked { seen }, Array(0..<10))
        XCTAssertGreaterThanOrEqual(monotonicMicroseconds() - start, 590_000, "a timer fired before its time")
    }

    func testTimesAreRoundedUpToTheirToleranceSoJobsShareWakeUps() {
        XCTAssertEqual(WorkerPool.Next(atUs: 1_000_001, wakeOnChange: true, toleranceUs: 50_000).dueUs, 1_050_000)
        XCTAssertEqual(WorkerPool.Next(atUs: 1_050_000, wakeOnChange: true, toleranceUs: 50_000).dueUs, 1_050_000)
        XCTAssertEqual(WorkerPool.Next(atUs: 1_000_001, wakeOnChange: true).dueUs, 1_000_001)
    }

    func testWhileOneJobBlocksTheOthersTimersStillFire() throws {
        let pool = WorkerPool(threads: 4, hub: nil)
        let gate = Counter()   // `done`: the test lets the blocked step end
        let blocked = Counter()
        try pool.add(wakeup: Wakeup()) {
            // A step that blocks (a snapshot, a checkpoint waiting for the application).
            while !gate.m.locked({ gate.done }) { usleep(1_000) }
            blocked.m.locked { blocked.done = true }
            return .done
        }
        let c = Counter()
        try pool.add(wakeup: Wakeup()) {
            let n: Int = c.m.locked { c.steps += 1; return c.steps }
            return n >= 10 ? .done : .again(WorkerPool.Next(atUs: monotonicMicroseconds() + 10_000, wakeOnChange: false))
        }
        waitUntil("ten timed steps of another job while one step blocks") { c.m.locked { c.steps } >= 10 }
        XCTAssertFalse(blocked.m.locked { blocked.done })
        gate.m.locked { gate.done = true }
        waitUntil("the blocked step's end") { blocked.m.locked { blocked.done } }
    }

    /// Two parked jobs woken back to back while one thread is blocked: both run while the
    /// blocked step still runs. (A thread signalled but not awake yet still counted as idle,
    /// so the second signal went nowhere and the second job waited for its timer, a minute.)
    func testJobsWokenTogetherAllRunWhileAThreadIsBlocked() throws {
        for _ in 0..<20 {
            let pool = WorkerPool(threads: 3, hub: nil)
            let gate = Counter()
            try pool.add(wakeup: Wakeup()) {
                while !gate.m.locked({ gate.done }) { usleep(1_000) }
                return .done
            }
            var wakeups: [Wakeup] = []
            var counters: [Counter] = []
            for _ in 0..<2 {
                let w = Wakeup(), c = Counter()
                wakeups.append(w)
                counters.append(c)
                try pool.add(wakeup: w) {
                    let n: Int = c.m.locked { c.steps += 1; return c.steps }
                    _ = w.takeChange()
                    if n >= 2 { return .done }
                    c.m.locked { c.inside = 1 }   // parked from here on, for a minute
                    return .again(WorkerPool.Next(atUs: monotonicMicroseconds() + 60_000_000, wakeOnChange: true))
                }
            }
            waitUntil("both jobs parked") { counters.allSatisfy { c in c.m.locked { c.inside } == 1 } }
            usleep(2_000)   // (the threads go idle; either way the jobs must run)
            for w in wakeups { w.notifyChange() }
            waitUntil("both woken jobs ran") { counters.allSatisfy { c in c.m.locked { c.steps } >= 2 } }
            gate.m.locked { gate.done = true }
        }
    }
}
