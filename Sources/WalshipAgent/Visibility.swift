#if canImport(Glibc)
import Glibc
#endif
import WalshipFormat
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// When each commit became visible: samples of SQLite's wal-index header (the last committed
/// frame, and the salts of the log it belongs to), each with the wall-clock time it was taken.
/// A transaction's commit time is the first sample that shows it, an upper bound of the real
/// commit that is a few milliseconds late at most.
///
/// The agent's main loop samples while it waits for a burst of commits to land. While it is
/// busy elsewhere (cutting a segment, compacting, checkpointing, comparing the database file),
/// it arms this log, and the process's one `VisibilitySampler` thread samples on its behalf:
/// commits made then are dated as closely as the others.
final class VisibilityLog {
    struct Sample: Equatable { var timeUs: Int64; var salt1: UInt32; var salt2: UInt32; var mxFrame: UInt32 }

    /// At most this many samples are kept; each is one distinct look at a growing log, and
    /// the main loop forgets the ones it has read past.
    static let capacity = 4096

    /// Dropped at stop(), under the lock: the file it reads is then released on the agent's
    /// thread, never later on the sampler's.
    private var read: (() -> WalIndexHeader?)?
    private let everyUs: Int64
    private let cond = MonotonicCondition()
    private var samples: [Sample] = []
    private var armed = false
    private var stopping = false
    private let sampler: VisibilitySampler

    /// `read` must be safe to call from another thread (a positioned read of the `-shm` file is).
    init(everyUs: Int64, sampler: VisibilitySampler = .shared, read: @escaping () -> WalIndexHeader?) {
        self.everyUs = everyUs
        self.sampler = sampler
        self.read = read
    }

    /// Makes sure the process's sampling thread runs.
    func start() throws { try sampler.start() }

    /// No sample is taken for this log once this returns.
    func stop() {
        cond.locked {
            stopping = true
            armed = false
            read = nil
            sampler.disarm(self)   // (lock order: a log's lock, then the sampler's)
        }
    }

    /// The main loop is busy (true) or about to wait for the next change itself (false).
    func setBusy(_ busy: Bool) {
        cond.locked {
            if armed == busy || stopping { return }
            armed = busy
            // Under the log's lock, so that a stop() can never leave it armed in the sampler.
            if busy { sampler.arm(self, everyUs: everyUs) } else { sampler.disarm(self) }
        }
    }

    /// Called by the sampler's thread.
    func sampleIfArmed() {
        cond.locked { if armed && !stopping { takeSample() } }
    }

    /// Takes one sample now.
    func sample() {
        cond.locked { takeSample() }
    }

    /// The commit time of a transaction that ends at `commitFrame` of the log with these
    /// salts: the first sample that showed it, or nil when none did.
    func firstSeen(salt1: UInt32, salt2: UInt32, commitFrame: Int) -> Int64? {
        cond.locked {
            samples.first { $0.salt1 == salt1 && $0.salt2 == salt2 && Int($0.mxFrame) >= commitFrame }?.timeUs
        }
    }

    /// Forgets every sample up to the last one that shows nothing beyond `frames` of the log
    /// with these salts (the part the tailer has read). Later samples may date commits not
    /// read yet, and stay.
    func forget(readTo frames: Int, salt1: UInt32, salt2: UInt32) {
        cond.locked {
            guard let i = samples.lastIndex(where: { $0.salt1 == salt1 && $0.salt2 == salt2 && Int($0.mxFrame) <= frames }) else { return }
            samples.removeSubrange(...i)
        }
    }

    var count: Int { cond.locked { samples.count } }

    // The mutex is held.
    private func takeSample() {
        guard let h = read?() else { return }
        // The time is taken after the read: the sample never dates a commit before it was visible.
        let s = Sample(timeUs: nowMicroseconds(), salt1: h.salt1, salt2: h.salt2, mxFrame: h.mxFrame)
        if let last = samples.last, last.salt1 == s.salt1, last.salt2 == s.salt2, last.mxFrame == s.mxFrame { return }
        // Full: the earliest looks are the ones that date the next commits; a later commit is
        // then dated when it is read, still an upper bound.
        if samples.count < Self.capacity { samples.append(s) }
    }
}

/// One thread for the whole process: it samples every armed `VisibilityLog` every few
/// milliseconds, and sleeps while none is armed. (One thread per database was 1,000 threads
/// for 1,000 databases, nearly all asleep.) Sweeps run on a fixed schedule from their start,
/// so a sweep's own length does not stretch the interval; a newly armed log is sampled at
/// once, on its own, without a whole sweep.
final class VisibilitySampler: @unchecked Sendable {
    static let shared = VisibilitySampler()

    private let cond = MonotonicCondition()
    private var armed: [ObjectIdentifier: VisibilityLog] = [:]
    private var fresh: [VisibilityLog] = []
    private var everyUs: Int64 = 8_000
    private var thread: JoinableThread?

    func start() throws {
        try cond.locked {
            guard thread == nil else { return }
            thread = try JoinableThread { [self] in loop() }
        }
    }

    /// Lock order: called with the log's lock held; the sampler never takes a log's lock
    /// while it holds its own.
    func arm(_ log: VisibilityLog, everyUs: Int64) {
        cond.locked {
            armed[ObjectIdentifier(log)] = log
            fresh.append(log)
            self.everyUs = max(1_000, min(self.everyUs, everyUs))
            cond.signal()
        }
    }

    func disarm(_ log: VisibilityLog) {
        cond.locked {
            armed[ObjectIdentifier(log)] = nil
            fresh.removeAll { $0 === log }
        }
    }

    var armedCount: Int { cond.locked { armed.count } }

    private func loop() {
        var next = monotonicMicroseconds()
        while true {
            let (sweep, logs): (Bool, [VisibilityLog]) = cond.locked {
                while armed.isEmpty {
                    cond.wait()
                    next = monotonicMicroseconds()
                }
                while fresh.isEmpty {
                    let left = next - monotonicMicroseconds()
                    if left <= 0 { break }
                    cond.wait(timeoutUs: left)
                }
                if monotonicMicroseconds() >= next {
                    fresh = []
                    return (true, Array(armed.values))
                }
                defer { fresh = [] }
                return (false, fresh)
            }
            // Each log takes its sample under its own lock; none is held here meanwhile.
            for log in logs { log.sampleIfArmed() }
            if sweep {
                let interval = cond.locked { everyUs }
                next += interval
                let now = monotonicMicroseconds()
                if next <= now { next = now + interval }   // an overrun sweep: no burst to catch up
            }
        }
    }
}
