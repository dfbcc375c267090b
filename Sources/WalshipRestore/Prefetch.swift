#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import CLinux
import WalshipStorage
import WalshipSystem

/// Downloads a restore plan's segments ahead of the apply step: `parallel` downloads at once,
/// at most `window` finished or running ahead. Apply then reads local copies while the next
/// downloads run: pipelined, with bounded memory and disk.
///
/// A copy is kept in memory, in 1 MiB pieces reused from one download to the next, while the
/// copies hold less than `memoryBudget` bytes; past that, the copy moves to a temporary file in
/// `dir`. Writing every copy through the page cache and deleting it cost the kernel more CPU
/// than the rest of the restore.
final class SegmentPrefetcher {
    private let keys: [String]
    private let dir: String
    private let slots: DispatchSemaphore
    private var done: [DispatchSemaphore]
    private var errors: [Error?]
    private var copies: [LocalCopy?]
    private var spare: [[UInt8]] = []
    private var memoryBytes = 0
    private let memoryBudget: Int
    static let piece = 1 << 20
    private let mutex = MonotonicCondition()
    /// Segments below this one were applied and released.
    private var releasedUpTo = 0
    private var next = 0
    private var cancelled = false
    private var workers: [JoinableThread] = []

    init(keys: [String], dir: String, parallel: Int = 4, window: Int = 8, memoryBudget: Int = 128 << 20,
         makeReplica: @escaping () throws -> Replica) throws {
        self.keys = keys
        self.dir = dir
        self.memoryBudget = memoryBudget
        self.copies = Array(repeating: nil, count: keys.count)
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

    /// A piece of memory for a copy, or nil when the copies are at the budget.
    fileprivate func takePiece() -> [UInt8]? {
        mutex.locked {
            guard memoryBytes + Self.piece <= memoryBudget else { return nil }
            memoryBytes += Self.piece
            var b = spare.popLast() ?? []
            b.removeAll(keepingCapacity: true)
            b.reserveCapacity(Self.piece)
            return b
        }
    }

    fileprivate func givePieces(_ pieces: [[UInt8]]) {
        guard !pieces.isEmpty else { return }
        mutex.locked {
            memoryBytes -= pieces.count * Self.piece
            spare += pieces.prefix(max(0, memoryBudget / Self.piece - spare.count))
            mutex.signal()
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
            // A download ahead of the one the restore needs next starts only while the copies
            // hold less than half the budget: several large objects downloading at once would
            // otherwise all move to disk. The next one needed always starts.
            let go: Bool = mutex.locked {
                while !cancelled && idx > releasedUpTo && memoryBytes >= memoryBudget / 2 { mutex.wait() }
                return !cancelled
            }
            if !go {
                mutex.locked { errors[idx] = StopStreaming() }
                done[idx].signal()
                continue
            }
            let copy = LocalCopy(owner: self, diskPath: localPath(idx))
            mutex.locked { copies[idx] = copy }
            do {
                try replica.get(key: keys[idx]) { try copy.append($0) }
            } catch {
                mutex.locked { errors[idx] = error }
            }
            done[idx].signal()
        }
    }

    /// Waits for segment `i`; returns its local copy or throws its download error.
    fileprivate func wait(_ i: Int) throws -> LocalCopy {
        done[i].wait()
        return try mutex.locked {
            if let e = errors[i] { throw e }
            return copies[i]!
        }
    }

    /// Frees segment `i`'s copy and its place in the window.
    func release(_ i: Int) {
        let copy: LocalCopy? = mutex.locked {
            defer { copies[i] = nil }
            releasedUpTo = max(releasedUpTo, i + 1)
            mutex.signal()
            return copies[i]
        }
        copy?.discard()
        slots.signal()
    }

    /// A reader of segment `i` for the restore, once it is here.
    func object(_ i: Int, original: Replica) throws -> Replica {
        PrefetchedObject(original: original, key: keys[i], copy: try wait(i))
    }

    /// Wakes every wait for a download that will now never start (they throw StopStreaming);
    /// downloads under way finish. Called when the restore stops early, so that a reader
    /// waiting ahead of it is not left waiting for a window place that never frees.
    func abandon() {
        let unclaimed: Range<Int> = mutex.locked {
            cancelled = true
            mutex.signal()
            let r = next..<keys.count
            for i in r { errors[i] = StopStreaming() }
            next = keys.count
            return r
        }
        for i in unclaimed { done[i].signal() }
    }

    /// Stops the workers and removes every file.
    func finish() {
        mutex.locked { cancelled = true; mutex.signal() }
        for _ in 0..<workers.count { slots.signal() }
        workers.forEach { $0.join() }
        let left: [LocalCopy] = mutex.locked {
            defer { copies = copies.map { _ in nil } }
            return copies.compactMap { $0 }
        }
        left.forEach { $0.discard() }
        FS.removeTree(dir)
    }
}

/// One downloaded object: pieces of memory, or a temporary file once memory ran out (the
/// pieces so far are written to it first). Written by one download thread, then read by the
/// restore's reader after the download is done.
final class LocalCopy {
    private weak var owner: SegmentPrefetcher?
    private let diskPath: String
    private var pieces: [[UInt8]] = []
    private var file: RawFile?
    private var discarded = false

    fileprivate init(owner: SegmentPrefetcher, diskPath: String) {
        self.owner = owner
        self.diskPath = diskPath
    }

    fileprivate func append(_ bytes: UnsafeRawBufferPointer) throws {
        var rest = bytes
        while !rest.isEmpty {
            if let f = file { try f.append(rest); return }
            if pieces.isEmpty || pieces[pieces.count - 1].count == SegmentPrefetcher.piece {
                guard let p = owner?.takePiece() else { try spill(); continue }
                pieces.append(p)
            }
            let n = min(rest.count, SegmentPrefetcher.piece - pieces[pieces.count - 1].count)
            pieces[pieces.count - 1].append(contentsOf: UnsafeRawBufferPointer(rebasing: rest[..<n]))
            rest = UnsafeRawBufferPointer(rebasing: rest[n...])
        }
    }

    /// Moves the copy to a new temporary file (never an existing path or a link).
    private func spill() throws {
        let f = try RawFile(path: diskPath, flags: O_RDWR | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode: 0o600)
        for p in pieces { try f.append(p) }
        owner?.givePieces(pieces)
        pieces = []
        file = f
    }

    func read(_ handle: (UnsafeRawBufferPointer) throws -> Void) throws {
        if let f = file {
            try f.readAll(handle)
        } else {
            for p in pieces { try p.withUnsafeBytes { try handle($0) } }
        }
    }

    /// Gives the memory back and removes the file. Called once its reader is done or gone.
    fileprivate func discard() {
        guard !discarded else { return }
        discarded = true
        owner?.givePieces(pieces)
        pieces = []
        if file != nil {
            file = nil
            try? FS.remove(diskPath)
        }
    }
}

/// Serves a prefetched object from its local copy under its original key and replica name,
/// so every error still names the object as stored.
final class PrefetchedObject: Replica {
    let original: Replica
    let key: String
    let copy: LocalCopy
    init(original: Replica, key: String, copy: LocalCopy) { self.original = original; self.key = key; self.copy = copy }
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
    func get(key: String, _ handle: (UnsafeRawBufferPointer) throws -> Void) throws { try copy.read(handle) }
}
