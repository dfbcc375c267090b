#if canImport(Glibc)
import Glibc
#endif
import WalshipFormat

/// When each commit became visible: samples of SQLite's wal-index header (the last committed
/// frame, and the salts of the log it belongs to), each with the wall-clock time it was taken.
/// A transaction's commit time is the first sample that shows it, an upper bound of the real
/// commit that is a few milliseconds late at most.
///
/// The agent's main loop samples while it waits for a burst of commits to land. While it is
/// busy elsewhere (cutting a segment, compacting, checkpointing, comparing the database file),
/// it arms this log's own thread, which samples on its behalf: commits made then are dated as
/// closely as the others.
final class VisibilityLog {
    struct Sample: Equatable { var timeUs: Int64; var salt1: UInt32; var salt2: UInt32; var mxFrame: UInt32 }

    /// At most this many samples are kept; each is one distinct look at a growing log, and
    /// the main loop forgets the ones it has read past.
    static let capacity = 4096

    private let read: () -> WalIndexHeader?
    private let everyUs: Int64
    private let cond = MonotonicCondition()
    private var samples: [Sample] = []
    private var armed = false
    private var stopping = false
    private var thread: JoinableThread?

    /// `read` must be safe to call from another thread (a positioned read of the `-shm` file is).
    init(everyUs: Int64, read: @escaping () -> WalIndexHeader?) {
        self.everyUs = everyUs
        self.read = read
    }

    func start() throws {
        guard thread == nil else { return }
        thread = try JoinableThread { [self] in loop() }
    }

    /// Stops the sampling thread and waits for it.
    func stop() {
        cond.locked { stopping = true; cond.signal() }
        thread?.join()
        thread = nil
    }

    /// The main loop is busy (true) or about to wait for the next change itself (false).
    func setBusy(_ busy: Bool) {
        cond.locked {
            if armed == busy { return }
            armed = busy
            if busy { cond.signal() }
        }
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
        guard let h = read() else { return }
        // The time is taken after the read: the sample never dates a commit before it was visible.
        let s = Sample(timeUs: nowMicroseconds(), salt1: h.salt1, salt2: h.salt2, mxFrame: h.mxFrame)
        if let last = samples.last, last.salt1 == s.salt1, last.salt2 == s.salt2, last.mxFrame == s.mxFrame { return }
        // Full: the earliest looks are the ones that date the next commits; a later commit is
        // then dated when it is read, still an upper bound.
        if samples.count < Self.capacity { samples.append(s) }
    }

    private func loop() {
        cond.locked {
            while !stopping {
                if !armed { cond.wait(); continue }
                takeSample()
                cond.wait(timeoutUs: everyUs)
            }
        }
    }
}
