import XCTest
#if canImport(Glibc)
import Glibc
#endif
@testable import WalshipSystem

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

    /// Creates the files before anyone subscribes, so that a later `touch` is one event.
    private func create(_ names: String...) {
        for n in names {
            let fd = open(dir + "/" + n, O_WRONLY | O_CREAT, 0o600)
            XCTAssertGreaterThanOrEqual(fd, 0)
            close(fd)
        }
    }

    /// One IN_MODIFY event: a truncate by path opens and closes nothing.
    private var length: Int = 0
    private func touch(_ name: String) {
        length += 1
        XCTAssertEqual(truncate(dir + "/" + name, off_t(length)), 0)
    }

    func testAWriteToOneDatabaseWakesItsAgentAndNoOther() {
        create("a.db", "a.db-wal", "a.db-shm", "b.db", "notes.txt")
        let a = Wakeup(), b = Wakeup()
        XCTAssertTrue(ChangeHub.shared.subscribe(a, directory: dir, names: ["a.db", "a.db-wal"]))
        XCTAssertTrue(ChangeHub.shared.subscribe(b, directory: dir, names: ["b.db", "b.db-wal"]))
        defer { ChangeHub.shared.unsubscribe(a); ChangeHub.shared.unsubscribe(b) }
        touch("a.db-wal")
        XCTAssertTrue(a.wait(timeoutUs: 5_000_000), "the write to a.db-wal did not wake a.db's agent")
        XCTAssertFalse(b.wait(timeoutUs: 300_000), "a write to a.db-wal woke b.db's agent")
        // Files that are neither database nor WAL (the spool, the -shm) wake nobody.
        touch("a.db-shm")
        touch("notes.txt")
        XCTAssertFalse(a.wait(timeoutUs: 300_000))
        touch("b.db")
        XCTAssertTrue(b.wait(timeoutUs: 5_000_000))
        XCTAssertFalse(a.wait(timeoutUs: 100_000))
    }

    /// The directory watcher's subscription: a file that comes or goes, or a write to one that
    /// no agent watches (a database being created), wakes it; a write to a replicated
    /// database's own files, or to a name it ignores (the process's status file), does not. An
    /// idle directory then costs no listing.
    func testADirectorysEntriesWakeItsWatcherAndTheAgentsOwnWritesDoNot() {
        create("a.db", "a.db-wal", "status.json")
        let agent = Wakeup(), watcher = Wakeup()
        XCTAssertTrue(ChangeHub.shared.subscribe(agent, directory: dir, names: ["a.db", "a.db-wal"]))
        XCTAssertTrue(ChangeHub.shared.subscribeToEntries(watcher, directory: dir, ignoring: ["status.json"]))
        defer { ChangeHub.shared.unsubscribe(agent); ChangeHub.shared.unsubscribe(watcher) }
        touch("a.db-wal")
        XCTAssertTrue(agent.wait(timeoutUs: 5_000_000))
        XCTAssertFalse(watcher.wait(timeoutUs: 300_000), "a write to a replicated database's WAL woke the watcher")
        touch("status.json")
        XCTAssertFalse(watcher.wait(timeoutUs: 300_000), "a write to an ignored name woke the watcher")
        create("new.db")
        XCTAssertTrue(watcher.wait(timeoutUs: 5_000_000), "a new file did not wake the watcher")
        usleep(50_000)
        _ = watcher.takeChange()
        touch("new.db")
        XCTAssertTrue(watcher.wait(timeoutUs: 5_000_000), "a write to a file no agent watches did not wake the watcher")
        XCTAssertEqual(unlink(dir + "/a.db-wal"), 0)
        XCTAssertTrue(watcher.wait(timeoutUs: 5_000_000), "a file that went did not wake the watcher")
        XCTAssertTrue(agent.wait(timeoutUs: 5_000_000), "the WAL's agent must hear of its deletion too")
    }

    /// A database written to while its agent is busy (not waiting) costs the reader one
    /// wake-up, not one per write: its events stay queued, merged by the kernel, until the
    /// agent waits again, and then that wait returns at once. (It may be news the agent has
    /// read already: the events carry no position, so the agent looks once more.)
    func testWritesWhileTheAgentIsBusyWakeTheReaderOnceAndReachTheNextWait() {
        create("a.db-wal")
        let a = Wakeup()
        XCTAssertTrue(ChangeHub.shared.subscribe(a, directory: dir, names: ["a.db-wal"]))
        defer { ChangeHub.shared.unsubscribe(a) }
        touch("a.db-wal")
        XCTAssertTrue(a.wait(timeoutUs: 5_000_000))
        usleep(50_000)   // (any short rest begun meanwhile is over)
        let before = ChangeHub.shared.readCount
        for _ in 0..<200 {
            touch("a.db-wal")
            usleep(200)
        }
        usleep(50_000)
        let reads = ChangeHub.shared.readCount - before
        XCTAssertLessThanOrEqual(reads, 2, "200 writes while nobody waited woke the reader \(reads) times")
        XCTAssertGreaterThanOrEqual(reads, 1, "the first write was not read")
        let t0 = monotonicMicroseconds()
        XCTAssertTrue(a.wait(timeoutUs: 5_000_000), "the writes made while busy did not reach the next wait")
        XCTAssertLessThan(monotonicMicroseconds() - t0, 1_000_000)
    }

    /// A write made while the agent is busy and the reader rests still reaches the agent when
    /// it starts to wait: it does not sleep through it.
    func testAWriteDuringTheRestWakesTheNextWait() {
        create("a.db-wal")
        let a = Wakeup()
        XCTAssertTrue(ChangeHub.shared.subscribe(a, directory: dir, names: ["a.db-wal"]))
        defer { ChangeHub.shared.unsubscribe(a) }
        touch("a.db-wal")
        XCTAssertTrue(a.wait(timeoutUs: 5_000_000))
        touch("a.db-wal")          // read at once: a change is pending, the reader rests
        XCTAssertTrue(a.wait(timeoutUs: 5_000_000))
        usleep(20_000)
        touch("a.db-wal")          // queued while the reader rests for a waiter
        usleep(20_000)
        XCTAssertTrue(a.wait(timeoutUs: 5_000_000), "a write made while the reader rested never woke the agent")
    }

    func testAnUnsubscribedAgentIsNoLongerWokenAndTheOthersStillAre() {
        create("a.db-wal", "b.db-wal")
        let a = Wakeup(), b = Wakeup()
        ChangeHub.shared.subscribe(a, directory: dir, names: ["a.db-wal"])
        ChangeHub.shared.subscribe(b, directory: dir, names: ["b.db-wal"])
        ChangeHub.shared.unsubscribe(a)
        defer { ChangeHub.shared.unsubscribe(b) }
        touch("a.db-wal")
        XCTAssertFalse(a.wait(timeoutUs: 300_000))
        touch("b.db-wal")
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
        create("c.db-wal")
        let w = Wakeup()
        ChangeHub.shared.subscribe(w, directory: dir, names: ["c.db-wal"])
        defer { ChangeHub.shared.unsubscribe(w) }
        touch("c.db-wal")
        usleep(200_000)   // the event arrives while nobody waits
        XCTAssertTrue(w.wait(timeoutUs: 5_000_000))
        XCTAssertFalse(w.wait(timeoutUs: 0), "one change was reported twice")
    }

    func testSubscribingTwiceThenOnceUnsubscribedLeavesNoWatchBehind() {
        create("d.db-wal")
        let w = Wakeup(), other = Wakeup()
        ChangeHub.shared.subscribe(w, directory: dir, names: ["d.db-wal"])
        ChangeHub.shared.subscribe(w, directory: dir, names: ["d.db-wal"])
        ChangeHub.shared.unsubscribe(w)
        touch("d.db-wal")
        XCTAssertFalse(w.wait(timeoutUs: 300_000), "a second subscription outlived the unsubscribe")
        // The directory can be watched again from scratch.
        XCTAssertTrue(ChangeHub.shared.subscribe(other, directory: dir, names: ["d.db-wal"]))
        defer { ChangeHub.shared.unsubscribe(other) }
        touch("d.db-wal")
        XCTAssertTrue(other.wait(timeoutUs: 5_000_000))
    }

    func testARemovedDirectoryWakesItsAgentsAndLeavesThemPolling() {
        let sub = dir + "/gone"
        XCTAssertEqual(mkdir(sub, 0o700), 0)
        let w = Wakeup()
        XCTAssertTrue(ChangeHub.shared.subscribe(w, directory: sub, names: ["e.db", "e.db-wal"]))
        defer { ChangeHub.shared.unsubscribe(w) }
        XCTAssertFalse(w.unwatched)
        XCTAssertEqual(rmdir(sub), 0)
        XCTAssertTrue(w.wait(timeoutUs: 5_000_000), "the removal did not wake the agent")
        XCTAssertTrue(w.unwatched, "an agent whose directory went away still counts on events")
    }
}
