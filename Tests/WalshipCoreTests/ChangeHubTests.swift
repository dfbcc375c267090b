import XCTest
#if canImport(Glibc)
import Glibc
#endif
@testable import WalshipCore

/// One inotify instance for the process: a change wakes the agent of that database only.
final class ChangeHubTests: XCTestCase {
    private var dir = ""

    override func setUpWithError() throws {
        var template = Array("/tmp/walship-hub-XXXXXX".utf8CString)
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) }
        XCTAssertNotNil(made)
        dir = String(cString: template)
    }

    override func tearDown() {
        for f in (try? FS.list(dir)) ?? [] { unlink(dir + "/" + f) }
        rmdir(dir)
    }

    private func append(_ name: String) {
        let fd = open(dir + "/" + name, O_WRONLY | O_CREAT | O_APPEND, 0o600)
        XCTAssertGreaterThanOrEqual(fd, 0)
        var b: UInt8 = 7
        XCTAssertEqual(write(fd, &b, 1), 1)
        close(fd)
    }

    func testAWriteToOneDatabaseWakesItsAgentAndNoOther() {
        let a = Wakeup(), b = Wakeup()
        XCTAssertTrue(ChangeHub.shared.subscribe(a, directory: dir, names: ["a.db", "a.db-wal"]))
        XCTAssertTrue(ChangeHub.shared.subscribe(b, directory: dir, names: ["b.db", "b.db-wal"]))
        defer { ChangeHub.shared.unsubscribe(a); ChangeHub.shared.unsubscribe(b) }
        append("a.db-wal")
        XCTAssertTrue(a.wait(timeoutUs: 5_000_000), "the write to a.db-wal did not wake a.db's agent")
        XCTAssertFalse(b.wait(timeoutUs: 300_000), "a write to a.db-wal woke b.db's agent")
        // Files that are neither database nor WAL (the spool, the -shm) wake nobody.
        append("a.db-shm")
        append("notes.txt")
        XCTAssertFalse(a.wait(timeoutUs: 300_000))
        append("b.db")
        XCTAssertTrue(b.wait(timeoutUs: 5_000_000))
        XCTAssertFalse(a.wait(timeoutUs: 100_000))
    }

    func testAnUnsubscribedAgentIsNoLongerWokenAndTheOthersStillAre() {
        let a = Wakeup(), b = Wakeup()
        ChangeHub.shared.subscribe(a, directory: dir, names: ["a.db-wal"])
        ChangeHub.shared.subscribe(b, directory: dir, names: ["b.db-wal"])
        ChangeHub.shared.unsubscribe(a)
        defer { ChangeHub.shared.unsubscribe(b) }
        append("a.db-wal")
        XCTAssertFalse(a.wait(timeoutUs: 300_000))
        append("b.db-wal")
        XCTAssertTrue(b.wait(timeoutUs: 5_000_000), "removing one subscriber dropped the directory's watch")
    }

    func testStopEndsAWaitAtOnceAndStaysStopped() {
        let w = Wakeup()
        let start = monotonicMicroseconds()
        DispatchQueue.global().asyncAfter(deadline: .now() + 0.1) { w.stop() }
        XCTAssertFalse(w.wait(timeoutUs: 30_000_000))
        XCTAssertLessThan(monotonicMicroseconds() - start, 20_000_000, "stop did not end the wait")
        XCTAssertTrue(w.stopped)
        XCTAssertFalse(w.wait(timeoutUs: 30_000_000))   // returns at once once stopped
    }

    func testAChangeBeforeTheWaitIsNotLost() {
        let w = Wakeup()
        ChangeHub.shared.subscribe(w, directory: dir, names: ["c.db-wal"])
        defer { ChangeHub.shared.unsubscribe(w) }
        append("c.db-wal")
        usleep(200_000)   // the event arrives while nobody waits
        XCTAssertTrue(w.wait(timeoutUs: 5_000_000))
        XCTAssertFalse(w.wait(timeoutUs: 0), "one change was reported twice")
    }
}
