import CLinux
#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An error from a system call, with errno and what was being done.
public struct SystemError: Error, CustomStringConvertible {
    public let errno: Int32
    public let context: String
    public var description: String {
        var hint = ""
        switch errno {
        case ENOSPC: hint = " (the disk is full: free space or move the spool)"
        case EACCES, EPERM: hint = " (check the owner and mode)"
        default: break
        }
        return "\(context): \(String(cString: strerror(errno)))\(hint)"
    }
    public init(errno: Int32, context: String) { self.errno = errno; self.context = context }
    package static func last(_ context: String) -> SystemError { SystemError(errno: Glibc.errno, context: context) }
}

/// Runs a system call again while it is interrupted by a signal (EINTR), and turns a
/// failure (-1 and errno) into a `SystemError` saying what was being done. The one place
/// where errno is read after a call.
@inlinable
package func valueOrErrno<T: FixedWidthInteger & SignedInteger>(_ context: @autoclosure () -> String, _ call: () -> T) throws -> T {
    while true {
        let r = call()
        if r != -1 { return r }
        let e = Glibc.errno
        if e == EINTR { continue }
        throw SystemError(errno: e, context: context())
    }
}

/// The same without the error: -1 (errno set) when the call failed for another reason than
/// EINTR, for callers that handle errno themselves (EAGAIN, ENOENT).
@inlinable
package func retryingEINTR<T: FixedWidthInteger & SignedInteger>(_ call: () -> T) -> T {
    while true {
        let r = call()
        if r != -1 || Glibc.errno != EINTR { return r }
    }
}

public func nowMicroseconds() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_REALTIME, &ts)
    return Int64(ts.tv_sec) * 1_000_000 + Int64(ts.tv_nsec) / 1000
}

public func monotonicMicroseconds() -> Int64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return Int64(ts.tv_sec) * 1_000_000 + Int64(ts.tv_nsec) / 1000
}

/// The time an agent's loop schedules by: the system's clocks, or a test's own, which moves
/// only when the test moves it (see `Agent.turn`).
public protocol LoopClock: Sendable {
    /// Microseconds on a clock that never steps (`CLOCK_MONOTONIC`): intervals and timers.
    func monotonicUs() -> Int64
    /// Microseconds since the epoch (`CLOCK_REALTIME`, which may step): what is due by date.
    func wallUs() -> Int64
}

public struct SystemClock: LoopClock {
    public init() {}
    public func monotonicUs() -> Int64 { monotonicMicroseconds() }
    public func wallUs() -> Int64 { nowMicroseconds() }
}

/// An open file descriptor with positioned I/O; closed on release.
public final class RawFile {
    public let fd: Int32
    public let path: String

    public init(path: String, flags: Int32, mode: mode_t = 0o600) throws {
        self.fd = try valueOrErrno("open \(path)") { open(path, flags | O_CLOEXEC, mode) }
        self.path = path
    }

    public static func openIfExists(_ path: String, flags: Int32 = O_RDONLY) throws -> RawFile? {
        let f = open(path, flags | O_CLOEXEC)
        if f < 0 {
            if Glibc.errno == ENOENT { return nil }
            throw SystemError.last("open \(path)")
        }
        return RawFile(fd: f, path: path)
    }

    private init(fd: Int32, path: String) { self.fd = fd; self.path = path }

    /// A file with no name, in memory, gone once closed; `label` names it in errors.
    public static func anonymous(label: String) throws -> RawFile {
        let f = walship_anonymous_file(label)
        guard f >= 0 else { throw SystemError.last("create an in-memory file") }
        return RawFile(fd: f, path: "(\(label), in memory)")
    }
    deinit { close(fd) }

    public func size() throws -> Int {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError.last("stat \(path)") }
        return Int(st.st_size)
    }

    /// Reads up to `count` bytes at `offset`; fewer only at end of file.
    public func read(at offset: Int, into buf: UnsafeMutableRawBufferPointer) throws -> Int {
        var done = 0
        while done < buf.count {
            let n = try valueOrErrno("read \(path)") { pread(fd, buf.baseAddress! + done, buf.count - done, off_t(offset + done)) }
            if n == 0 { break }
            done += n
        }
        return done
    }

    public func read(at offset: Int, count: Int) throws -> [UInt8] {
        var b = [UInt8](repeating: 0, count: count)
        let n = try b.withUnsafeMutableBytes { try read(at: offset, into: $0) }
        if n < count { b.removeLast(count - n) }
        return b
    }

    public func write(at offset: Int, _ data: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < data.count {
            let n = try valueOrErrno("write \(path)") { pwrite(fd, data.baseAddress! + done, data.count - done, off_t(offset + done)) }
            done += n
        }
    }

    public func append(_ data: UnsafeRawBufferPointer) throws {
        var done = 0
        while done < data.count {
            let n = try valueOrErrno("write \(path)") { Glibc.write(fd, data.baseAddress! + done, data.count - done) }
            done += n
        }
    }

    public func append(_ data: [UInt8]) throws { try data.withUnsafeBytes { try append($0) } }

    /// Hands the whole file to `handle` from its start, 1 MiB at a time.
    public func readAll(_ handle: (UnsafeRawBufferPointer) throws -> Void) throws {
        var buf = [UInt8](repeating: 0, count: 1 << 20)
        var off = 0
        while true {
            let n = try buf.withUnsafeMutableBytes { try read(at: off, into: $0) }
            if n == 0 { break }
            try buf.withUnsafeBytes { try handle(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            off += n
        }
    }

    public func truncate(to size: Int) throws {
        _ = try valueOrErrno("truncate \(path)") { ftruncate(fd, off_t(size)) }
    }

    public func sync() throws {
        _ = try valueOrErrno("fsync \(path)") { fsync(fd) }
    }

    public func inode() throws -> (dev: UInt64, ino: UInt64) {
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw SystemError.last("stat \(path)") }
        return (UInt64(st.st_dev), UInt64(st.st_ino))
    }
}

extension RawFile {
    private static let keptMutex = Mutex()
    nonisolated(unsafe) private static var kept: [RawFile] = []

    /// Keeps this descriptor open for the life of the process. For a file whose POSIX locks
    /// another part of this process may hold (a database an agent replicates): closing any
    /// descriptor of a file drops every such lock the process holds on it.
    package func keepOpenForLife() { RawFile.keptMutex.locked { RawFile.kept.append(self) } }
}

/// Whether another process holds a POSIX record lock on one byte of an open file (F_GETLK:
/// asks without taking anything, and never reports this process's own locks).
public func byteLockedByAnotherProcess(_ fd: Int32, at offset: Int) -> Bool {
    var fl = flock()
    fl.l_type = Int16(F_WRLCK)
    fl.l_whence = Int16(SEEK_SET)
    fl.l_start = off_t(offset)
    fl.l_len = 1
    let rc = withUnsafeMutablePointer(to: &fl) { fcntl(fd, F_GETLK, UnsafeMutableRawPointer($0)) }
    return rc == 0 && fl.l_type != Int16(F_UNLCK)
}

private let direntNameOffset = MemoryLayout<dirent>.offset(of: \dirent.d_name)!

public enum FS {
    public static func exists(_ path: String) -> Bool { access(path, F_OK) == 0 }

    public static func isDirectory(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFDIR
    }

    public static func isRegularFile(_ path: String) -> Bool {
        var st = stat()
        return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
    }

    /// Whether `path` itself is a regular file: a symbolic link is not followed, and is not one.
    public static func isRegularFileNotLink(_ path: String) -> Bool {
        var st = stat()
        return lstat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
    }

    public static func fileSize(_ path: String) -> Int? {
        var st = stat()
        guard stat(path, &st) == 0 else { return nil }
        return Int(st.st_size)
    }

    /// Bytes free to unprivileged writers, and the size, of the filesystem holding `path`.
    public static func space(of path: String) -> (available: Int64, total: Int64)? {
        var s = statvfs()
        guard statvfs(path, &s) == 0 else { return nil }
        return (Int64(s.f_bavail) * Int64(s.f_frsize), Int64(s.f_blocks) * Int64(s.f_frsize))
    }

    public static func makeDirectories(_ path: String, mode: mode_t = 0o755) throws {
        if isDirectory(path) { return }
        let parent = dirname(path)
        if parent != path && !parent.isEmpty { try makeDirectories(parent, mode: mode) }
        if mkdir(path, mode) != 0 && Glibc.errno != EEXIST { throw SystemError.last("mkdir \(path)") }
    }

    public static func list(_ path: String) throws -> [String] {
        guard let d = opendir(path) else {
            if Glibc.errno == ENOENT { return [] }
            throw SystemError.last("list \(path)")
        }
        defer { closedir(d) }
        var names: [String] = []
        while let e = readdir(d) {
            // A dirent is variable-length: its name is NUL-terminated inside the record, which
            // can be shorter than the declared 256-byte `d_name`. Read the name in place, up to
            // its NUL, never copying the declared field (that reads past glibc's buffer).
            let name = String(cString: UnsafeRawPointer(e).advanced(by: direntNameOffset).assumingMemoryBound(to: CChar.self))
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }

    public static func remove(_ path: String) throws {
        if unlink(path) != 0 && Glibc.errno != ENOENT { throw SystemError.last("remove \(path)") }
    }

    /// Removes a file, or a directory and everything in it. A symlink is removed itself, never
    /// followed, and the walk goes through directory descriptors opened with O_NOFOLLOW
    /// (openat/unlinkat), so a directory swapped for a link midway cannot point the removal
    /// elsewhere. Best effort: what cannot be removed stays.
    public static func removeTree(_ path: String) {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
        guard fd >= 0 else { unlink(path); return }   // a file or a symlink: itself only
        removeContents(of: fd, depth: 0)
        rmdir(path)
    }

    /// Empties the directory open at `fd` and closes it. Deeper than 64 levels is left alone
    /// (a tree planted to exhaust descriptors or the stack).
    private static func removeContents(of fd: Int32, depth: Int) {
        guard depth < 64, let d = fdopendir(fd) else { close(fd); return }
        defer { closedir(d) }   // closes fd too
        var names: [String] = []
        while let e = readdir(d) {
            let name = String(cString: UnsafeRawPointer(e).advanced(by: direntNameOffset).assumingMemoryBound(to: CChar.self))
            if name != "." && name != ".." { names.append(name) }
        }
        for n in names {
            if unlinkat(fd, n, 0) == 0 { continue }
            let sub = openat(fd, n, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC)
            guard sub >= 0 else { continue }
            removeContents(of: sub, depth: depth + 1)
            unlinkat(fd, n, AT_REMOVEDIR)
        }
    }

    /// A new directory beside `path` (on its filesystem, so a rename out of it is atomic) under
    /// a name nobody could guess, mode 0700: scratch files inside it cannot be planted or
    /// swapped by another local user, even when `path`'s directory is shared.
    public static func makePrivateDirectory(beside path: String) throws -> String {
        var template = Array((path + ".walship-XXXXXX").utf8CString)   // NUL-terminated
        let made = template.withUnsafeMutableBufferPointer { mkdtemp($0.baseAddress!) != nil }
        guard made else { throw SystemError.last("create a private directory beside \(path)") }
        return template.withUnsafeBufferPointer { String(cString: $0.baseAddress!) }
    }

    public static func rename(_ from: String, _ to: String) throws {
        guard Glibc.rename(from, to) == 0 else { throw SystemError.last("rename \(from) to \(to)") }
    }

    public static func syncDirectory(_ path: String) throws {
        let fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        guard fd >= 0 else { throw SystemError.last("open directory \(path)") }
        defer { close(fd) }
        guard fsync(fd) == 0 else { throw SystemError.last("fsync directory \(path)") }
    }

    /// A new scratch file beside `path`, under a name nobody could guess, created with
    /// O_EXCL|O_NOFOLLOW: in a directory others can write, a planted file or symlink is never
    /// opened instead.
    package static func createScratch(beside path: String, mode: mode_t) throws -> (file: RawFile, path: String) {
        var attempt = 0
        while true {
            let tmp = path + ".tmp-\(getpid())-\(String(UInt64.random(in: 0...UInt64.max), radix: 16))"
            do {
                return (try RawFile(path: tmp, flags: O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, mode: mode), tmp)
            } catch let e as SystemError where e.errno == EEXIST && attempt < 8 {
                attempt += 1
            }
        }
    }

    /// Writes a whole file atomically: temp file beside it, fsync, rename, fsync directory.
    public static func writeAtomically(_ path: String, _ data: [UInt8], mode: mode_t = 0o600) throws {
        let (f, tmp) = try createScratch(beside: path, mode: mode)
        do {
            try f.append(data)
            try f.sync()
        } catch {
            try? remove(tmp)
            throw error
        }
        try rename(tmp, path)
        try syncDirectory(dirname(path))
    }

    public static func readAll(_ path: String) throws -> [UInt8] {
        let f = try RawFile(path: path, flags: O_RDONLY)
        return try f.read(at: 0, count: try f.size())
    }

    public static func dirname(_ path: String) -> String {
        guard let i = path.lastIndex(of: "/") else { return "." }
        if i == path.startIndex { return "/" }
        return String(path[..<i])
    }

    public static func basename(_ path: String) -> String {
        guard let i = path.lastIndex(of: "/") else { return path }
        return String(path[path.index(after: i)...])
    }

    public static func absolute(_ path: String) -> String {
        if path.hasPrefix("/") { return normalize(path) }
        var buf = [CChar](repeating: 0, count: 4096)
        guard getcwd(&buf, buf.count) != nil else { return path }
        let cwd = String(decoding: buf.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        return normalize(cwd + "/" + path)
    }

    /// The absolute path with every symlink resolved, as SQLite's unix VFS resolves a
    /// database's path before naming its `-wal` and `-shm` files. Falls back to `absolute`
    /// when the file does not exist.
    public static func resolved(_ path: String) -> String {
        guard let p = realpath(path, nil) else { return absolute(path) }
        defer { free(p) }
        return String(cString: p)
    }

    package static func normalize(_ path: String) -> String {
        var out: [Substring] = []
        for part in path.split(separator: "/") {
            if part == "." { continue }
            if part == ".." { _ = out.popLast(); continue }
            out.append(part)
        }
        return "/" + out.joined(separator: "/")
    }

    /// Copies a file through a bounded buffer into an atomic destination.
    public static func copyAtomically(from src: String, to dst: String, mode: mode_t = 0o600) throws {
        let input = try RawFile(path: src, flags: O_RDONLY)
        let (out, tmp) = try createScratch(beside: dst, mode: mode)
        do {
            var buf = [UInt8](repeating: 0, count: 1 << 20)
            var off = 0
            while true {
                let n = try buf.withUnsafeMutableBytes { try input.read(at: off, into: $0) }
                if n == 0 { break }
                try buf.withUnsafeBytes { try out.append(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
                off += n
            }
            try out.sync()
        } catch {
            try? remove(tmp)
            throw error
        }
        try rename(tmp, dst)
        try syncDirectory(dirname(dst))
    }
}

/// A file's identity: its device and inode.
public struct FileIdentity: Hashable, Sendable {
    public var device: UInt64
    public var inode: UInt64
    public init(_ st: stat) { device = UInt64(st.st_dev); inode = UInt64(st.st_ino) }

    /// The identity of the file at `path` (a symbolic link is followed), nil when it is gone.
    public static func of(_ path: String) -> FileIdentity? {
        var st = stat()
        return stat(path, &st) == 0 ? FileIdentity(st) : nil
    }
}

/// The files whose POSIX locks some agent of this process holds (a database, its -wal and its
/// -shm), counted by holder. Closing any descriptor of one of them would drop those locks:
/// code that opens files in a shared directory checks here before it closes one.
public enum HeldFiles {
    private static let mutex = Mutex()
    nonisolated(unsafe) private static var counts: [FileIdentity: Int] = [:]

    public static func hold(_ id: FileIdentity) { mutex.locked { counts[id, default: 0] += 1 } }
    public static func release(_ id: FileIdentity) {
        mutex.locked {
            guard let n = counts[id] else { return }
            counts[id] = n > 1 ? n - 1 : nil
        }
    }
    public static func contains(_ id: FileIdentity) -> Bool { mutex.locked { counts[id] != nil } }
    public static var all: Set<FileIdentity> { mutex.locked { Set(counts.keys) } }
}

extension RawFile {
    /// The identity of the open file.
    package func identity() throws -> FileIdentity {
        var st = stat()
        _ = try valueOrErrno("stat \(path)") { fstat(fd, &st) }
        return FileIdentity(st)
    }

    /// For a descriptor opened in a shared directory that turned out to name another file than
    /// expected: kept open for the process's life when that file is one whose locks an agent
    /// holds (closing it would drop them), closed otherwise. So the kept descriptors stay as
    /// few as the races won against live databases.
    package func keepOpenIfHeld() {
        // A file that cannot even be identified may be a held one: kept, never closed.
        guard let id = try? identity() else { keepOpenForLife(); return }
        if HeldFiles.contains(id) { keepOpenForLife() }
    }
}
