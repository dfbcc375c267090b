#if canImport(Glibc)
import Glibc
#endif
import Dispatch

/// Downloads a restore plan's segments ahead of the apply step: `parallel` downloads at once,
/// at most `window` finished or running ahead, each into a temporary file. Apply then reads
/// local files while the next downloads run: pipelined, with bounded memory and disk.
final class SegmentPrefetcher {
    private let keys: [String]
    private let dir: String
    private let slots: DispatchSemaphore
    private var done: [DispatchSemaphore]
    private var errors: [Error?]
    private let mutex = Mutex()
    private var next = 0
    private var cancelled = false
    private var workers: [JoinableThread] = []

    init(keys: [String], dir: String, parallel: Int = 4, window: Int = 8, makeReplica: @escaping () throws -> Replica) throws {
        self.keys = keys
        self.dir = dir
        self.slots = DispatchSemaphore(value: window)
        self.done = keys.map { _ in DispatchSemaphore(value: 0) }
        self.errors = Array(repeating: nil, count: keys.count)
        try FS.makeDirectories(dir, mode: 0o700)
        do {
            for _ in 0..<min(parallel, max(1, keys.count)) {
                let replica = try makeReplica()
                workers.append(try JoinableThread { [weak self] in self?.work(replica) })
            }
        } catch {
            finish()   // the workers already started stop before the error goes up
            throw error
        }
    }

    func localPath(_ i: Int) -> String { dir + "/\(i).obj" }

    private func work(_ replica: Replica) {
        while true {
            slots.wait()
            let i: Int? = mutex.locked {
                if cancelled || next >= keys.count { return nil }
                defer { next += 1 }
                return next
            }
            guard let idx = i else { slots.signal(); return }
            do {
                let f = try RawFile(path: localPath(idx), flags: O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode: 0o600)
                try replica.get(key: keys[idx]) { try f.append($0) }
            } catch {
                mutex.locked { errors[idx] = error }
            }
            done[idx].signal()
        }
    }

    /// Waits for segment `i`; returns its local path or throws its download error.
    func wait(_ i: Int) throws -> String {
        done[i].wait()
        if let e = mutex.locked({ errors[i] }) { throw e }
        return localPath(i)
    }

    /// Frees segment `i`'s file and its place in the window.
    func release(_ i: Int) {
        try? FS.remove(localPath(i))
        slots.signal()
    }

    /// Wakes every wait for a download that will now never start (they throw StopStreaming);
    /// downloads under way finish. Called when the restore stops early, so that a reader
    /// waiting ahead of it is not left waiting for a window place that never frees.
    func abandon() {
        let unclaimed: Range<Int> = mutex.locked {
            cancelled = true
            let r = next..<keys.count
            for i in r { errors[i] = StopStreaming() }
            next = keys.count
            return r
        }
        for i in unclaimed { done[i].signal() }
    }

    /// Stops the workers and removes every file.
    func finish() {
        mutex.locked { cancelled = true }
        for _ in 0..<workers.count { slots.signal() }
        workers.forEach { $0.join() }
        FS.removeTree(dir)
    }
}

/// Serves prefetched objects from local files under their original key and replica name, so
/// every error still names the object as stored.
final class PrefetchedObject: Replica {
    let original: Replica
    let key: String
    let path: String
    init(original: Replica, key: String, path: String) { self.original = original; self.key = key; self.path = path }
    var displayURL: String { original.displayURL }
    var requestCounts: Counters { original.requestCounts }
    func prepareForWriting() throws {}
    func checkReadable() throws {}
    func isEmpty() throws -> Bool { false }
    func put(key: String, fromFile path: String) throws { throw ReplicaError.unsupported("read-only") }
    func put(key: String, bytes: [UInt8]) throws { throw ReplicaError.unsupported("read-only") }
    func list(prefix: String) throws -> [String] { [key] }
    func contains(key: String) throws -> Bool { key == self.key }
    func delete(keys: [String]) throws {}
    func get(key: String, _ handle: (UnsafeRawBufferPointer) throws -> Void) throws {
        try FileReplica(root: FS.dirname(path)).get(key: FS.basename(path), handle)
    }
}
