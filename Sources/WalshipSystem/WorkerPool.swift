#if canImport(Glibc)
import Glibc
#endif

/// A few threads that run many jobs, one step at a time: `walship replicate` runs every
/// database's agent on it, so the number of threads follows the cores, not the databases.
///
/// A job is a step function and the `Wakeup` of what it serves. Each step says when the job
/// wants its next one: at a time (monotonic), and also at once on a change when it asks for
/// that. Between steps the job is parked in a timer heap; a change or a stop on its wake-up
/// makes it ready at once. A job never runs on two threads at a time, and its steps follow
/// each other in order. A job that is ready waits for a free thread in the order it became
/// ready.
///
/// One idle thread at a time keeps the timers (it sleeps until the earliest); the other idle
/// threads sleep until there is work, so a timer wakes one thread, not all of them. Jobs whose
/// timers tolerate a delay share wake-ups (see `Next.toleranceUs`).
///
/// Threads start as they are needed (one job uses one thread) up to the limit, and live as
/// long as the process.
public final class WorkerPool: @unchecked Sendable {
    /// When a parked job runs again.
    public struct Next: Sendable, Equatable {
        /// Monotonic microseconds.
        public var atUs: Int64
        /// Whether a change before then runs it at once (a stop always does).
        public var wakeOnChange: Bool
        /// How much later than `atUs` it may run: the pool rounds the time up to a multiple of
        /// it, so that jobs that do not mind share one wake-up of a thread.
        public var toleranceUs: Int64
        public init(atUs: Int64, wakeOnChange: Bool, toleranceUs: Int64 = 0) {
            self.atUs = atUs
            self.wakeOnChange = wakeOnChange
            self.toleranceUs = toleranceUs
        }

        /// `atUs` rounded up to a multiple of the tolerance.
        var dueUs: Int64 {
            guard toleranceUs > 1 else { return atUs }
            let r = atUs % toleranceUs
            return r == 0 ? atUs : atUs + (toleranceUs - (r < 0 ? r + toleranceUs : r))
        }
    }

    public enum Step: Sendable {
        case again(Next)
        case done
    }

    private final class Job: @unchecked Sendable {
        enum State { case ready, running, parked, done }
        let wakeup: Wakeup
        /// Dropped once the job is done, on its thread and outside the pool's lock: what it
        /// holds (an agent) goes then, and never under the lock (a stale timer or queue slot
        /// may keep the job itself a while).
        var body: (() -> Step)?
        var state = State.ready
        var next = Next(atUs: 0, wakeOnChange: false)
        /// Bumped at each park: a heap entry of an earlier park is stale.
        var serial = 0
        init(wakeup: Wakeup, body: @escaping () -> Step) {
            self.wakeup = wakeup
            self.body = body
        }
    }

    private struct Timer {
        var atUs: Int64
        var serial: Int
        var job: Job
    }

    /// The default size: four threads per core (a step may block on a disk or a lock for a
    /// while), at least 4 and at most 64.
    public static func defaultThreads(cores: Int) -> Int { min(64, max(4, 4 * cores)) }

    private let cond = MonotonicCondition()
    private var ready: [Job?] = []
    private var readyHead = 0
    private var heap: [Timer] = []
    private var threads: [JoinableThread] = []
    /// Idle threads waiting for work (`.first`), and whether one keeps the timers (`.second`).
    private var followers = 0
    private var keeperWaiting = false
    private let limit: Int
    private var live = 0
    private let hub: ChangeHub?
    /// Jobs parked that a change would wake: while there is one, the pool counts with the hub
    /// as one subscriber that waits for news.
    private var parkedForNews = 0

    /// `hub`: the hub whose subscribers these jobs are. While some job is parked for news the
    /// pool counts there as one subscriber that waits (see `ChangeHub.rest`): the hub takes its
    /// short rests then, and its long one while every job is running or letting commits land.
    /// (Lock order: the pool's lock, then the hub's; the hub never calls into the pool while it
    /// holds its own.)
    public init(threads: Int, hub: ChangeHub? = .shared) {
        self.limit = max(1, threads)
        self.hub = hub
    }

    /// Threads started so far.
    public var threadCount: Int { cond.locked { threads.count } }

    /// Jobs not done yet.
    public var jobCount: Int { cond.locked { live } }

    /// Adds a job whose first step runs as soon as a thread is free. Throws only when no
    /// thread could be started at all.
    public func add(wakeup: Wakeup, _ body: @escaping () -> Step) throws {
        let job = Job(wakeup: wakeup, body: body)
        // Before the job can park: a change that comes after its park must find the listener.
        // (Until its first step is over, a call finds it ready or running and does nothing.)
        wakeup.setListener { [weak self, weak job] in
            guard let self, let job else { return }
            self.wake(job)
        }
        try cond.locked {
            live += 1
            makeReady(job)   // (starts the first thread)
            if threads.isEmpty {
                live -= 1
                ready.removeLast()
                wakeup.setListener(nil)
                throw startError ?? SystemError(errno: EAGAIN, context: "start a worker thread")
            }
        }
    }

    /// Called under the lock: the job waits for a thread, and an idle one is woken.
    private func makeReady(_ job: Job) {
        job.state = .ready
        ready.append(job)
        wakeSomeone()
    }

    /// Called under the lock while a job waits: wakes an idle thread, the keeper if no other
    /// is idle, or starts one more. (A thread signalled but not awake yet still counts as
    /// idle, so a signal may go to a thread already woken: whoever takes a job wakes someone
    /// again while more wait, so no job waits with a thread idle.)
    private func wakeSomeone() {
        if followers > 0 {
            cond.signalOne(.first)
        } else if keeperWaiting {
            cond.signal(.second)
        } else {
            try? startThreadIfNeeded()   // (none could start: the busy ones take it in turn)
        }
    }

    /// Called under the lock. A thread more when every thread is busy and a job waits, or a
    /// timer has nobody to keep it.
    private func startThreadIfNeeded() throws {
        guard followers == 0, !keeperWaiting, starting == 0, threads.count < limit, readyHead < ready.count || !heap.isEmpty else { return }
        do {
            threads.append(try JoinableThread { [self] in work() })
            starting += 1
        } catch {
            // The others take the job in turn; with none at all, the caller hears of it.
            startError = error
            if threads.isEmpty { throw error }
        }
    }

    /// Threads started that have not looked for work yet: they will, so none more is started
    /// for the same work meanwhile (one more starts when one of them finds more work waiting).
    private var starting = 0
    private var startError: Error?

    /// A change, stop or lost watch on the job's wake-up.
    private func wake(_ job: Job) {
        cond.locked {
            guard job.state == .parked else { return }   // running: it looks after its step
            if job.wakeup.stopped || (job.next.wakeOnChange && job.wakeup.hasChange) {
                unpark(job)
                makeReady(job)
            }
        }
    }

    private func work() {
        cond.locked { starting -= 1 }
        while true {
            let job: Job = cond.locked {
                while true {
                    // Due timers join the queue first, behind what is ready already: a stream
                    // of ready jobs never holds a due one back for long.
                    let now = monotonicMicroseconds()
                    while let top = heap.first, top.atUs <= now {
                        popTimer()
                        if top.job.state == .parked && top.job.serial == top.serial {
                            unpark(top.job)
                            top.job.state = .ready
                            ready.append(top.job)
                        }
                    }
                    if readyHead < ready.count {
                        let j = ready[readyHead]!
                        ready[readyHead] = nil
                        readyHead += 1
                        if readyHead > 1024 && readyHead * 2 > ready.count {
                            ready.removeFirst(readyHead)
                            readyHead = 0
                        }
                        j.state = .running
                        // While this thread runs the step, another keeps the timers, and one
                        // more helps when jobs are still waiting.
                        if readyHead < ready.count {
                            wakeSomeone()
                        } else if !keeperWaiting && !heap.isEmpty {
                            if followers > 0 { cond.signalOne(.first) } else { try? startThreadIfNeeded() }
                        }
                        return j
                    }
                    if !keeperWaiting {
                        keeperWaiting = true
                        cond.wait(timeoutUs: heap.first.map { $0.atUs - now }, .second)
                        keeperWaiting = false
                    } else {
                        followers += 1
                        cond.wait(.first)
                        followers -= 1
                    }
                }
            }
            let step = job.body!()
            if case .done = step { job.body = nil }   // (only this thread touches it now)
            cond.locked { after(job, step) }
        }
    }

    /// Called under the lock, after a step.
    private func after(_ job: Job, _ step: Step) {
        switch step {
        case .done:
            job.state = .done
            job.wakeup.setListener(nil)
            live -= 1
        case .again(let next):
            job.next = next
            let due = next.dueUs
            if job.wakeup.stopped || (next.wakeOnChange && job.wakeup.hasChange) || due <= monotonicMicroseconds() {
                // (This thread takes it next, unless another is idle.)
                job.state = .ready
                ready.append(job)
                return
            }
            job.state = .parked
            if next.wakeOnChange {
                parkedForNews += 1
                if parkedForNews == 1 { hub?.waiterArrives() }
            }
            job.serial += 1
            let earliest = heap.first.map { due < $0.atUs } ?? true
            pushTimer(Timer(atUs: due, serial: job.serial, job: job))
            // The keeper, asleep until a later timer, must look again; with no keeper, an
            // idle thread becomes it.
            if earliest {
                if keeperWaiting { cond.signal(.second) } else if followers > 0 { cond.signalOne(.first) }
            }
        }
    }

    /// Called under the lock when a parked job leaves its park.
    private func unpark(_ job: Job) {
        guard job.next.wakeOnChange else { return }
        parkedForNews -= 1
        if parkedForNews == 0 { hub?.waiterLeaves() }
    }

    // A binary min-heap on `atUs`.

    private func pushTimer(_ t: Timer) {
        heap.append(t)
        var i = heap.count - 1
        while i > 0 {
            let parent = (i - 1) / 2
            if heap[parent].atUs <= heap[i].atUs { break }
            heap.swapAt(parent, i)
            i = parent
        }
    }

    private func popTimer() {
        let last = heap.removeLast()
        guard !heap.isEmpty else { return }
        heap[0] = last
        var i = 0
        while true {
            let l = 2 * i + 1, r = l + 1
            var m = i
            if l < heap.count && heap[l].atUs < heap[m].atUs { m = l }
            if r < heap.count && heap[r].atUs < heap[m].atUs { m = r }
            if m == i { break }
            heap.swapAt(i, m)
            i = m
        }
    }
}
