import CLinux
#if canImport(Glibc)
import Glibc
#endif

/// What wakes one agent: a change to its database or WAL, a stop request, or its timeout.
/// Waits run on the monotonic clock. Any thread may call `stop()` and `notifyChange()`.
public final class Wakeup: @unchecked Sendable {
    private let cond = MonotonicCondition()
    private var changed = false
    private var stopFlag = false
    private var lost = false
    /// The hub it is subscribed to (its waits are counted there: see `ChangeHub.rest`).
    private var hub: ChangeHub?
    /// Told after each change, stop or lost watch, outside this lock (a `WorkerPool` that
    /// runs the agent on its threads instead of one of its own).
    private var listener: (@Sendable () -> Void)?

    public init() {}

    func setHub(_ h: ChangeHub?) { cond.locked { hub = h } }

    package func setListener(_ l: (@Sendable () -> Void)?) { cond.locked { listener = l } }

    /// A stop was asked (or SIGTERM/SIGINT came, even before the hub's thread passed it on).
    public var stopped: Bool { SignalPipe.signalled != 0 || cond.locked { stopFlag } }

    /// Its watch is gone (the directory was removed or unmounted, or the hub's reader failed):
    /// changes no longer wake it, and the agent polls on its timeouts.
    public var unwatched: Bool { cond.locked { lost } }

    /// Whether a change came that no wait has taken yet.
    package var hasChange: Bool { cond.locked { changed } }

    /// Marks it as without a watch from the start (its subscription failed).
    package func loseWatchForever() { cond.locked { lost = true } }

    func loseWatch() { tell(cond.locked { lost = true; changed = true; cond.signal(); return listener }) }

    public func stop() { tell(cond.locked { stopFlag = true; cond.signal(); return listener }) }

    package func notifyChange() { tell(cond.locked { changed = true; cond.signal(); return listener }) }

    private func tell(_ l: (@Sendable () -> Void)?) { l?() }

    /// Takes the pending change without waiting: whether one came since the last take or wait.
    public func takeChange() -> Bool { cond.locked { defer { changed = false }; return changed } }

    /// Waits at most `timeoutUs` for a change or a stop. Returns whether a change came (and
    /// clears it); a stop returns at once, with whatever change was pending.
    public func wait(timeoutUs: Int64) -> Bool {
        // A wait that may block is counted by the hub (outside this lock: the hub's lock is
        // never taken under a wake-up's), so that it never rests while someone waits for news.
        let counted: ChangeHub? = cond.locked { !changed && !stopFlag && timeoutUs > 0 ? hub : nil }
        counted?.waiterArrives()
        defer { counted?.waiterLeaves() }
        return cond.locked {
            if !changed && !stopFlag && timeoutUs > 0 {
                let deadline = monotonicMicroseconds() + timeoutUs
                while !changed && !stopFlag {
                    let left = deadline - monotonicMicroseconds()
                    if left <= 0 { break }
                    cond.wait(timeoutUs: left)
                }
            }
            // Signals normally arrive through the hub's thread; this covers a hub without one.
            if SignalPipe.signalled != 0 { stopFlag = true }
            defer { changed = false }
            return changed
        }
    }

    /// Sleeps `timeoutUs`, or until a stop; a change neither ends it nor is taken by it.
    public func sleep(timeoutUs: Int64) {
        cond.locked {
            let deadline = monotonicMicroseconds() + timeoutUs
            while !stopFlag && SignalPipe.signalled == 0 {
                let left = deadline - monotonicMicroseconds()
                if left <= 0 { break }
                cond.wait(timeoutUs: left)
            }
        }
    }
}

/// One inotify instance and one thread for the whole process. Each agent subscribes with its
/// database's directory and file names; an event wakes only the agents whose names it carries,
/// so a write to one database no longer wakes every agent watching the same directory.
/// SIGTERM and SIGINT stop every subscriber, however many there are.
public final class ChangeHub: @unchecked Sendable {
    public static let shared = ChangeHub()

    private struct Watch {
        var wd: Int32
        var byName: [String: [ObjectIdentifier: Wakeup]] = [:]
        /// Subscribers of the directory's entries, with the names each ignores.
        var entries: [ObjectIdentifier: (wakeup: Wakeup, ignoring: Set<String>, hidden: Bool)] = [:]
        var count = 0
    }

    private let mutex = Mutex()
    private var inotifyFD: Int32 = -1
    private var watches: [String: Watch] = [:]      // by directory
    private var directoryOf: [Int32: String] = [:]  // by watch descriptor
    private var everyone: [ObjectIdentifier: Wakeup] = [:]
    /// The `watches` key each subscriber was filed under (none when it has no watch).
    private var directoryKey: [ObjectIdentifier: String] = [:]
    private var started = false
    private var thread: JoinableThread?
    private var stopAll = false
    /// Subscribers blocked in `Wakeup.wait` (see `rest`).
    private var waiters = 0
    /// The reader rests until a subscriber starts waiting; that subscriber writes to `pokeFD`.
    private var restingForWaiter = false
    private var poked = false
    private var pokeFDs: [Int32] = [-1, -1]
    /// Reads of the inotify queue so far (tests: how often the reader woke for events).
    private var reads = 0
    var readCount: Int { mutex.locked { reads } }

    private init() {}

    /// A stop request (SIGTERM, SIGINT) came: nothing new should start.
    public var stopping: Bool { SignalPipe.signalled != 0 || mutex.locked { stopAll } }

    /// Registers `wakeup` for changes to `names` in `directory`. Returns false when changes
    /// cannot be watched there (no inotify, or the limit on watches is reached): the caller
    /// then relies on its timeout alone. Stop requests reach it either way.
    @discardableResult
    public func subscribe(_ wakeup: Wakeup, directory: String, names: [String]) -> Bool {
        // No names: stop requests only, no watch.
        register(wakeup, directory: names.isEmpty ? nil : directory) { w, id in
            for n in names { w.byName[n, default: [:]][id] = wakeup }
        }
    }

    /// Registers `wakeup` for the entries of `directory`: a name that appears or goes, and a
    /// change to a file that no other subscriber names (a database being created there, not yet
    /// replicated), except the names in `ignoring`, and names that start with a dot when
    /// `ignoringHidden`. A change to a file that agents watch wakes only them. Returns false
    /// when the directory cannot be watched.
    @discardableResult
    public func subscribeToEntries(_ wakeup: Wakeup, directory: String, ignoring: Set<String> = [], ignoringHidden: Bool = false) -> Bool {
        register(wakeup, directory: directory) { w, id in w.entries[id] = (wakeup, ignoring, ignoringHidden) }
    }

    /// Both kinds of subscription: `wakeup` hears of stop requests and its waits count (see
    /// `rest`); with a directory, `file` files it in that directory's watch (under the mutex).
    private func register(_ wakeup: Wakeup, directory: String?, _ file: (inout Watch, ObjectIdentifier) -> Void) -> Bool {
        if mutex.locked({ everyone[ObjectIdentifier(wakeup)] != nil }) { unsubscribe(wakeup) }
        var stopNow = false
        // (Stopped outside the mutex: a wake-up's listener may take other locks.)
        defer { if stopNow { wakeup.stop() } }
        return mutex.locked {
            startIfNeeded()
            let id = ObjectIdentifier(wakeup)
            everyone[id] = wakeup
            stopNow = stopAll
            wakeup.setHub(self)
            guard inotifyFD >= 0 else { return false }
            guard let directory else { return true }
            guard let key = watchKey(directory) else { return false }
            watches[key]!.count += 1
            file(&watches[key]!, id)
            directoryKey[id] = key
            return true
        }
    }

    /// The `watches` key for `directory`, its watch added when it has none (under the mutex).
    private func watchKey(_ directory: String) -> String? {
        if watches[directory] != nil { return directory }
        let mask = UInt32(IN_MODIFY | IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_CLOSE_WRITE | IN_MOVED_FROM)
        let wd = inotify_add_watch(inotifyFD, directory, mask)
        if wd < 0 { return nil }
        // The same directory under another path gives the same descriptor.
        if let other = directoryOf[wd], watches[other] != nil { return other }
        watches[directory] = Watch(wd: wd)
        directoryOf[wd] = directory
        return directory
    }

    /// Forgets `wakeup`; the directory's watch goes when its last subscriber does.
    public func unsubscribe(_ wakeup: Wakeup) {
        mutex.locked {
            let id = ObjectIdentifier(wakeup)
            guard everyone.removeValue(forKey: id) != nil else { return }
            wakeup.setHub(nil)
            // A watch dropped since (IN_IGNORED), or made again for a later subscriber, no
            // longer files this one: only a watch that holds it counts it.
            guard let dir = directoryKey.removeValue(forKey: id), var w = watches[dir] else { return }
            var had = w.entries.removeValue(forKey: id) != nil
            for (n, var subs) in w.byName where subs[id] != nil {
                subs[id] = nil
                w.byName[n] = subs.isEmpty ? nil : subs
                had = true
            }
            guard had else { return }
            w.count -= 1
            if w.count <= 0 {
                _ = inotify_rm_watch(inotifyFD, w.wd)
                directoryOf[w.wd] = nil
                watches[dir] = nil
            } else {
                watches[dir] = w
            }
        }
    }

    /// Starts the reader thread and the signal handlers (under the mutex).
    private func startIfNeeded() {
        guard !started else { return }
        started = true
        inotifyFD = inotify_init1(Int32(IN_CLOEXEC))
        SignalPipe.install()
        // Without the pipe the hub never rests for a waiter (only the short rests).
        if walship_pipe_nonblocking(&pokeFDs) != 0 { pokeFDs = [-1, -1] }
        thread = try? JoinableThread { [self] in run() }
        if thread == nil {
            // Without the reader no change and no signal would arrive: every subscriber
            // polls on its timeout, and signals still set the flag it checks.
            if inotifyFD >= 0 { close(inotifyFD); inotifyFD = -1 }
        }
    }

    private func run() {
        var buf = [UInt8](repeating: 0, count: 64 * 1024)
        while true {
            var fds = [pollfd(fd: inotifyFD, events: Int16(POLLIN), revents: 0),
                       pollfd(fd: SignalPipe.readFD, events: Int16(POLLIN), revents: 0)]
            let r = retryingEINTR { poll(&fds, nfds_t(fds.count), -1) }
            if r < 0 {
                abandon()
                return
            }
            if fds[1].revents != 0 {
                SignalPipe.drain()
                let all = mutex.locked { stopAll = true; return Array(everyone.values) }
                for w in all { w.stop() }
            }
            if inotifyFD >= 0 && fds[0].revents != 0 {
                let n = retryingEINTR { buf.withUnsafeMutableBytes { read(inotifyFD, $0.baseAddress, $0.count) } }
                if n < 0 {
                    if errno == EAGAIN { continue }
                    abandon()
                    return
                }
                dispatch(buf, count: n)
                rest()
            }
        }
    }

    /// After delivering events the reader rests before it reads again, and the kernel merges
    /// the repeated events queued meanwhile for the same file. Reading each write of a busy
    /// WAL as it came cost a thread switch per write: a point of CPU, and a longer commit for
    /// the writer, at 500 commits a second.
    /// - While no subscriber is blocked waiting (each is busy reading its WAL, or has a change
    ///   pending), nobody needs news: the rest lasts until one starts to wait, and a busy
    ///   database wakes this thread about once per pass of its agent.
    /// - While some subscriber waits, the rest is short (`restUs`, the sampling period that
    ///   dates commits anyway): a change to a waiting database is delivered that late at most.
    /// A signal ends any rest at once.
    /// (In a process with many databases some agent is nearly always waiting, so the short
    /// rest is the usual one there; the long one is for a process whose databases are all busy.)
    private func rest() {
        let untilWaiter: Bool = mutex.locked {
            guard waiters == 0, pokeFDs[0] >= 0 else { return false }
            restingForWaiter = true
            poked = false
            return true
        }
        var fds = [pollfd(fd: SignalPipe.readFD, events: Int16(POLLIN), revents: 0),
                   pollfd(fd: untilWaiter ? pokeFDs[0] : -1, events: Int16(POLLIN), revents: 0)]
        let deadline = monotonicMicroseconds() + Self.restUs
        while true {
            // The long rest also looks once a second whether someone waits: a poke that could
            // not be written must not leave a waiter without news.
            var ms: Int32 = 1_000
            if !untilWaiter {
                let left = deadline - monotonicMicroseconds()
                if left <= 0 { break }
                ms = Int32((left + 999) / 1000)
            }
            let r = retryingEINTR { poll(&fds, nfds_t(fds.count), ms) }
            if r == 0 {
                if untilWaiter && mutex.locked({ waiters == 0 }) { continue }
                if !untilWaiter { continue }   // (re-check the deadline)
            }
            break
        }
        if untilWaiter {
            // Only this thread clears the flag, and before draining: a poke written while it
            // was set is drained here, and none is written once it is clear.
            mutex.locked { restingForWaiter = false }
            var b = [UInt8](repeating: 0, count: 64)
            while b.withUnsafeMutableBytes({ read(pokeFDs[0], $0.baseAddress, $0.count) }) > 0 {}
        }
    }

    static let restUs: Int64 = 8_000

    /// A subscriber is about to block in `Wakeup.wait`.
    func waiterArrives() {
        mutex.locked {
            waiters += 1
            if restingForWaiter && !poked {
                poked = true
                var b: UInt8 = 1
                _ = write(pokeFDs[1], &b, 1)   // (a failed write: the hub looks within a second)
            }
        }
    }

    func waiterLeaves() { mutex.locked { waiters -= 1 } }

    /// Wakes the subscribers named by the events in `buf[0..<count]`. A queue overflow, or a
    /// watched directory that went away, wakes every subscriber of it (they look for themselves).
    private func dispatch(_ buf: [UInt8], count: Int) {
        var toWake: [ObjectIdentifier: Wakeup] = [:]
        var lostWatch: [Wakeup] = []
        mutex.locked {
            reads += 1
            var off = 0
            let header = MemoryLayout<inotify_event>.size
            while off + header <= count {
                let (wd, mask, len) = buf.withUnsafeBytes { raw -> (Int32, UInt32, Int) in
                    let e = raw.loadUnaligned(fromByteOffset: off, as: inotify_event.self)
                    return (e.wd, e.mask, Int(e.len))
                }
                // The kernel never writes a partial event; guard anyway before slicing.
                guard len >= 0, off + header + len <= count else { break }
                let nameBytes = buf[(off + header)..<(off + header + len)].prefix { $0 != 0 }
                let name = String(decoding: nameBytes, as: UTF8.self)
                off += header + len
                if mask & UInt32(IN_Q_OVERFLOW) != 0 {
                    for (k, v) in everyone { toWake[k] = v }
                    continue
                }
                guard let dir = directoryOf[wd], let w = watches[dir] else { continue }
                if mask & UInt32(IN_IGNORED) != 0 {
                    // The watch is gone (directory removed, or unmounted): its subscribers
                    // poll from now on, and a later subscriber there gets a new watch.
                    for subs in w.byName.values { for v in subs.values { lostWatch.append(v) } }
                    for e in w.entries.values { lostWatch.append(e.wakeup) }
                    watches[dir] = nil
                    directoryOf[wd] = nil
                    continue
                }
                let named = w.byName[name]
                if let subs = named { for (k, v) in subs { toWake[k] = v } }
                if !w.entries.isEmpty {
                    let comesOrGoes = mask & UInt32(IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM) != 0
                    if comesOrGoes || named == nil {
                        for (k, e) in w.entries where !e.ignoring.contains(name) && !(e.hidden && name.hasPrefix(".")) {
                            toWake[k] = e.wakeup
                        }
                    }
                }
            }
        }
        for w in toWake.values { w.notifyChange() }
        for w in lostWatch { w.loseWatch() }
    }

    /// The reader cannot go on (poll or read failed for good): every subscriber polls from
    /// now on, and later subscribers are told that changes cannot be watched. Stop requests
    /// still reach them through the flag the signal handler sets.
    private func abandon() {
        let all: [Wakeup] = mutex.locked {
            if inotifyFD >= 0 { close(inotifyFD); inotifyFD = -1 }
            watches = [:]
            directoryOf = [:]
            directoryKey = [:]
            return Array(everyone.values)
        }
        for w in all { w.loseWatch() }
    }
}

/// SIGTERM and SIGINT, turned into a byte on a pipe (all a signal handler may safely do)
/// and a flag.
enum SignalPipe {
    nonisolated(unsafe) static var readFD: Int32 = -1
    nonisolated(unsafe) static var writeFD: Int32 = -1
    nonisolated(unsafe) static var signalled: sig_atomic_t = 0

    static func install() {
        guard readFD < 0 else { return }
        var p: [Int32] = [-1, -1]
        guard pipe(&p) == 0 else { return }
        for fd in p {
            _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
            _ = fcntl(fd, F_SETFL, O_NONBLOCK)
        }
        readFD = p[0]; writeFD = p[1]
        let handler: @convention(c) (Int32) -> Void = { _ in
            SignalPipe.signalled = 1
            var b: UInt8 = 1
            let saved = errno
            _ = Glibc.write(SignalPipe.writeFD, &b, 1)
            errno = saved
        }
        signal(SIGTERM, handler)
        signal(SIGINT, handler)
    }

    static func drain() {
        var b = [UInt8](repeating: 0, count: 64)
        while b.withUnsafeMutableBytes({ read(readFD, $0.baseAddress, $0.count) }) > 0 {}
    }
}
