#if canImport(Glibc)
import Glibc
#endif

/// A joinable POSIX thread running one closure. Creation failures are thrown, not ignored.
package final class JoinableThread {
    private var handle = pthread_t()
    private let body: () -> Void
    private var joined = false

    package init(_ body: @escaping () -> Void) throws {
        self.body = body
        let context = Unmanaged.passRetained(self)
        let rc = pthread_create(&handle, nil, { raw in
            Unmanaged<JoinableThread>.fromOpaque(raw!).takeRetainedValue().body()
            return nil
        }, context.toOpaque())
        if rc != 0 {
            context.release()
            throw SystemError(errno: rc, context: "start a thread")
        }
    }

    /// Waits for the closure to return (once; later calls return at once).
    package func join() {
        if joined { return }
        joined = true
        pthread_join(handle, nil)
    }
}

/// A mutex with two conditions whose timed waits run on the monotonic clock, so a wall-clock
/// step neither stretches nor cuts them short. Most users need one (`.first`); the second lets
/// one waiter be woken apart from the others (the `WorkerPool`'s timer keeper).
package final class MonotonicCondition {
    package enum Waiters { case first, second }
    private var m = pthread_mutex_t()
    private var c = pthread_cond_t()
    private var c2 = pthread_cond_t()

    package init() {
        pthread_mutex_init(&m, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&c, &attr)
        pthread_cond_init(&c2, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(&c)
        pthread_cond_destroy(&c2)
        pthread_mutex_destroy(&m)
    }

    package func locked<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&m); defer { pthread_mutex_unlock(&m) }
        return try body()
    }

    /// Waits (the mutex held by the caller, inside `locked`) until signalled, or for at most
    /// `timeoutUs` microseconds when it is given. Spurious wake-ups happen: callers re-check.
    package func wait(timeoutUs: Int64? = nil, _ waiters: Waiters = .first) {
        guard let t = timeoutUs else {
            if waiters == .first { pthread_cond_wait(&c, &m) } else { pthread_cond_wait(&c2, &m) }
            return
        }
        var ts = timespec()
        clock_gettime(CLOCK_MONOTONIC, &ts)
        let ns = Int64(ts.tv_nsec) + max(0, t) * 1000
        ts.tv_sec += Int(ns / 1_000_000_000)
        ts.tv_nsec = Int(ns % 1_000_000_000)
        if waiters == .first { pthread_cond_timedwait(&c, &m, &ts) } else { pthread_cond_timedwait(&c2, &m, &ts) }
    }

    /// Wakes every waiter of `waiters`.
    package func signal(_ waiters: Waiters = .first) {
        if waiters == .first { pthread_cond_broadcast(&c) } else { pthread_cond_broadcast(&c2) }
    }

    /// Wakes one waiter (any) of `waiters`: for waiters that are all alike, where waking all
    /// is a herd.
    package func signalOne(_ waiters: Waiters = .first) {
        if waiters == .first { pthread_cond_signal(&c) } else { pthread_cond_signal(&c2) }
    }
}

/// A plain mutex (pthread), for small state shared between threads.
package final class Mutex: @unchecked Sendable {
    private var m = pthread_mutex_t()
    package init() { pthread_mutex_init(&m, nil) }
    deinit { pthread_mutex_destroy(&m) }
    package func locked<T>(_ body: () throws -> T) rethrows -> T {
        pthread_mutex_lock(&m); defer { pthread_mutex_unlock(&m) }
        return try body()
    }
}

/// A flag shared between threads.
package final class AtomicFlag: @unchecked Sendable {
    private let mutex = Mutex()
    private var value = false
    package init() {}
    /// Sets the flag; false if it was already set.
    package func testAndSet() -> Bool { mutex.locked { if value { return false }; value = true; return true } }
    package func clear() { mutex.locked { value = false } }
}
