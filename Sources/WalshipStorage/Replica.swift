#if canImport(Glibc)
import Glibc
#endif
import WalshipFormat
import WalshipSystem

/// Errors of the replica domain: where objects live and how they are reached.
public enum ReplicaError: Error, CustomStringConvertible {
    case badURL(String, String)
    case notAReplica(String, String)
    case missingObject(String, String)
    case unsupported(String)
    case io(String, String)
    case generationVanished(String, String)

    public var description: String {
        switch self {
        case .badURL(let u, let why): return "bad replica URL '\(Redact.url(u))': \(why)"
        case .notAReplica(let where_, let why): return "\(where_) is not a walship replica: \(why)"
        case .missingObject(let replica, let key): return "object '\(key)' is missing from replica \(replica)"
        case .unsupported(let s): return s
        case .io(let replica, let s): return "replica \(replica): \(s)"
        case .generationVanished(let replica, let g):
            return "replica \(replica) no longer holds generation \(g) (its directory was deleted?): nothing more can be added to it"
        }
    }
}

/// An error of a backend that tells an outage (the replica is down or unreachable, and
/// waiting may cure it) from a fault the operator must fix (credentials, a missing bucket).
public protocol ReplicaOutageTelling: Error {
    var isOutage: Bool { get }
}

/// Where objects are stored. Keys are relative paths like "generations/<gen>/snapshots/x".
public protocol Replica: AnyObject {
    /// A display form of the URL, without credentials.
    var displayURL: String { get }
    /// Checks the replica can be written by walship (creating it if new), before replication.
    func prepareForWriting() throws
    /// Checks the location holds a walship replica, before reading.
    func checkReadable() throws
    /// True when the location answers and holds nothing at all (a replica never written to);
    /// false when it holds a walship replica. Anything else throws: an error reaching it, a
    /// location that does not exist, or one that holds something that is not walship's.
    func isEmpty() throws -> Bool
    func put(key: String, fromFile path: String) throws
    func put(key: String, bytes: [UInt8]) throws
    /// Streams an object's bytes to `handle` in chunks.
    func get(key: String, _ handle: (UnsafeRawBufferPointer) throws -> Void) throws
    /// Every key under `prefix`, sorted.
    func list(prefix: String) throws -> [String]
    func delete(keys: [String]) throws
    /// Whether the object is stored (one HEAD request on S3).
    func contains(key: String) throws -> Bool
    /// Requests (or file operations) made, by type: PUT, GET, LIST, DELETE, HEAD.
    var requestCounts: Counters { get }
    /// Whether a restore should download objects ahead, several at once (each request waits on
    /// a network), rather than read them in turn.
    var readsAhead: Bool { get }
    /// Another handle on the same replica, for a reader on another thread.
    func anotherHandle() throws -> Replica
    /// Makes each request give up after a failed retry or two rather than keep retrying, for
    /// a caller with a backoff of its own (the agent's shippers) that must see failures soon.
    func failFast()
}

extension Replica {
    public var readsAhead: Bool { false }
    /// A backend that reads ahead must give each reader its own handle.
    public func anotherHandle() throws -> Replica { throw ReplicaError.unsupported("another handle on \(displayURL)") }
    public func failFast() {}
}

/// Named counters shared between threads.
public final class Counters: @unchecked Sendable {
    private let mutex = Mutex()
    private var values: [String: UInt64] = [:]
    public init() {}
    public func add(_ name: String, _ n: UInt64 = 1) { mutex.locked { values[name, default: 0] += n } }
    public var snapshot: [String: UInt64] { mutex.locked { values } }
}

public let replicaMarkerKey = "walship-replica.json"

/// A kind of replica, reached through URLs of one scheme. Each backend module registers its
/// own at start-up (`ReplicaBackends.register`); the agent, restore and the configuration
/// only ever go through the registry, so they never name a backend.
public struct ReplicaBackend: Sendable {
    /// The URL scheme, without "://": "file", "s3".
    public let scheme: String
    /// The URL's form, for error messages: "s3://bucket/prefix?endpoint=URL".
    public let usage: String
    /// Whether a configuration may give this replica credentials of its own (access-key-id,
    /// secret-access-key, session-token, region), passed to it as environment variables.
    public let takesCredentials: Bool
    /// Checks a URL (and the credentials it would use) without reaching the replica, so a
    /// typo fails at start-up.
    public let validate: @Sendable (_ url: String, _ environment: [String: String]) throws -> Void
    /// Opens a handle on the replica (no request is made yet).
    public let open: @Sendable (_ url: String, _ environment: [String: String]) throws -> Replica

    public init(scheme: String, usage: String, takesCredentials: Bool,
                validate: @escaping @Sendable (String, [String: String]) throws -> Void,
                open: @escaping @Sendable (String, [String: String]) throws -> Replica) {
        self.scheme = scheme
        self.usage = usage
        self.takesCredentials = takesCredentials
        self.validate = validate
        self.open = open
    }
}

/// The replica backends by URL scheme. The directory backend is always there; others are
/// added by their modules (the executable registers them before it reads any URL).
public enum ReplicaBackends {
    private static let mutex = Mutex()
    nonisolated(unsafe) private static var byScheme: [String: ReplicaBackend] = ["file": FileReplica.backend]

    /// Adds (or replaces) the backend for its scheme.
    public static func register(_ backend: ReplicaBackend) {
        mutex.locked { byScheme[backend.scheme] = backend }
    }

    /// The backend a URL names (an absolute path is a directory), or an error listing the forms
    /// that work.
    public static func backend(for url: String) throws -> ReplicaBackend {
        let all = mutex.locked { byScheme }
        if url.hasPrefix("/") { return all["file"]! }
        let forms = all.values.sorted { $0.scheme < $1.scheme }.map(\.usage).joined(separator: " or ")
        if let r = url.firstRange(of: "://") {
            let scheme = String(url[..<r.lowerBound])
            if let b = all[scheme] { return b }
            if !scheme.isEmpty && scheme.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "+" || $0 == "-" || $0 == "." }) {
                throw ReplicaError.badURL(url, "no backend for \(scheme):// replicas in this build; use \(forms)")
            }
        }
        throw ReplicaError.badURL(url, "use \(forms)")
    }

    /// Opens a replica from its URL; `environment` defaults to the process's.
    public static func open(_ url: String, environment: [String: String]? = nil) throws -> Replica {
        try backend(for: url).open(url, environment ?? ProcessEnvironment.all())
    }

    /// Checks a URL without reaching the replica.
    public static func validate(_ url: String, environment: [String: String]? = nil) throws {
        try backend(for: url).validate(url, environment ?? ProcessEnvironment.all())
    }
}

/// A replica in a local (or mounted) directory. Every write is atomic: temp file, fsync,
/// rename, fsync of the directory.
public final class FileReplica: Replica {
    public let root: String
    public let requestCounts = Counters()
    public init(root: String) { self.root = root }
    public var displayURL: String { "file://" + root }

    /// file:///absolute/path, or a plain absolute path.
    static let backend = ReplicaBackend(
        scheme: "file", usage: "file:///absolute/path", takesCredentials: false,
        validate: { url, _ in _ = try FileReplica.root(of: url) },
        open: { url, _ in FileReplica(root: try FileReplica.root(of: url)) })

    static func root(of url: String) throws -> String {
        if url.hasPrefix("/") { return FS.normalize(url) }
        let path = String(url.dropFirst("file://".count))
        guard url.hasPrefix("file://"), path.hasPrefix("/") else {
            throw ReplicaError.badURL(url, "a file URL needs an absolute path, like file:///var/backups/app-replica")
        }
        return FS.normalize(URIEncoding.decode(path))
    }

    public func prepareForWriting() throws {
        if FS.exists(root) && !FS.isDirectory(root) {
            throw ReplicaError.notAReplica(root, "it is a file, not a directory")
        }
        try FS.makeDirectories(root, mode: 0o700)
        let entries = try FS.list(root)
        let foreign = entries.filter { $0 != "generations" && $0 != replicaMarkerKey && !$0.contains(".tmp-") }
        if !foreign.isEmpty {
            throw ReplicaError.notAReplica(root, "the directory holds other files (\(foreign.prefix(3).joined(separator: ", "))); choose an empty or new directory for the replica")
        }
        if !entries.contains(replicaMarkerKey) {
            try put(key: replicaMarkerKey, bytes: Array("{\"format\":\"walship-replica\",\"version\":1}\n".utf8))
        }
    }

    public func checkReadable() throws {
        guard FS.isDirectory(root) else {
            throw ReplicaError.notAReplica(root, FS.exists(root) ? "it is not a directory" : "no such directory")
        }
        let entries = try FS.list(root)
        guard entries.contains(replicaMarkerKey) || entries.contains("generations") else {
            let what = entries.isEmpty ? "the directory is empty" : "it holds other files (\(entries.prefix(3).joined(separator: ", "))) and no \(replicaMarkerKey)"
            throw ReplicaError.notAReplica(root, what)
        }
    }

    public func isEmpty() throws -> Bool {
        // A directory that does not exist is not "empty": it may be a typo, or a volume that
        // is not mounted. Whoever provisions a directory replica creates it.
        guard FS.isDirectory(root) else {
            throw ReplicaError.notAReplica(root, FS.exists(root) ? "it is not a directory"
                                           : "no such directory (create it when you provision the replica, so that a typo or a missing mount is not taken for an empty replica)")
        }
        if try FS.list(root).isEmpty { return true }
        try checkReadable()
        return false
    }

    private func path(_ key: String) -> String { root + "/" + key }

    /// A snapshot or segment goes only into a generation whose `generation.json` is there
    /// (it is always stored first): a replica directory deleted or wiped under the agent must
    /// not be recreated piece by piece into a chain without its base.
    private func requireGeneration(of key: String) throws {
        guard let object = ObjectKey.parse(key) else { return }
        if case .generationInfo = object { return }
        guard try present(path("generations/\(object.generation)/generation.json")) else {
            throw ReplicaError.generationVanished(displayURL, object.generation)
        }
    }

    public func contains(key: String) throws -> Bool {
        requestCounts.add("HEAD")
        return try present(path(key))
    }

    /// Whether a file is there; an error that cannot tell (permission, I/O, a stale NFS
    /// handle, something other than a directory where the replica should be) is thrown, never
    /// taken for "gone" (that would drop a generation).
    private func present(_ p: String) throws -> Bool {
        var st = stat()
        if stat(p, &st) == 0 { return true }
        let err = errno
        guard err == ENOENT || err == ENOTDIR else {
            throw ReplicaError.io(displayURL, "cannot look up \(p): \(String(cString: strerror(err)))")
        }
        // Gone only if the replica itself is still there as a directory, or is not there at
        // all (deleted). Anything else standing at its path is an outage: retried.
        var rs = stat()
        if lstat(root, &rs) != 0 {
            if errno == ENOENT { return false }
            throw ReplicaError.io(displayURL, "cannot look up \(root): \(String(cString: strerror(errno)))")
        }
        if FS.isDirectory(root) { return false }
        throw ReplicaError.io(displayURL, "\(root) is not a directory")
    }

    public func put(key: String, fromFile src: String) throws {
        let dst = path(key)
        requestCounts.add("PUT")
        try requireGeneration(of: key)
        try FS.makeDirectories(FS.dirname(dst), mode: 0o700)
        try FS.copyAtomically(from: src, to: dst, mode: 0o600)
    }

    public func put(key: String, bytes: [UInt8]) throws {
        let dst = path(key)
        requestCounts.add("PUT")
        try requireGeneration(of: key)
        try FS.makeDirectories(FS.dirname(dst), mode: 0o700)
        try FS.writeAtomically(dst, bytes, mode: 0o600)
    }

    public func get(key: String, _ handle: (UnsafeRawBufferPointer) throws -> Void) throws {
        requestCounts.add("GET")
        guard let f = try RawFile.openIfExists(path(key)) else { throw ReplicaError.missingObject(displayURL, key) }
        try f.readAll(handle)
    }

    public func list(prefix: String) throws -> [String] {
        requestCounts.add("LIST")
        var keys: [String] = []
        func walk(_ rel: String) throws {
            let full = rel.isEmpty ? root : path(rel)
            for name in try FS.list(full) where !name.contains(".tmp-") {
                let r = rel.isEmpty ? name : rel + "/" + name
                if FS.isDirectory(path(r)) { try walk(r) } else { keys.append(r) }
            }
        }
        var start = prefix
        while start.hasSuffix("/") { start.removeLast() }
        if start.isEmpty || FS.isDirectory(path(start)) { try walk(start) }
        return keys.sorted()
    }

    public func delete(keys: [String]) throws {
        requestCounts.add("DELETE", UInt64(keys.count))
        for k in keys {
            try FS.remove(path(k))
            // Empty directories left behind (a deleted generation) go too; errors don't matter.
            var dir = FS.dirname(path(k))
            while dir.count > root.count + "/generations".count, rmdir(dir) == 0 { dir = FS.dirname(dir) }
        }
    }
}

/// Reads the replica's generations, snapshots and segments from a LIST.
public func listGenerations(_ replica: Replica) throws -> [GenerationListing] {
    var byGen: [String: (snaps: [SnapshotName], segs: [SegmentName], hasMeta: Bool)] = [:]
    for key in try replica.list(prefix: "generations/") {
        guard let object = ObjectKey.parse(key) else { continue }
        var entry = byGen[object.generation] ?? ([], [], false)
        switch object {
        case .generationInfo: entry.hasMeta = true
        case .snapshot(let s): entry.snaps.append(s)
        case .segment(let s): entry.segs.append(s)
        }
        byGen[object.generation] = entry
    }
    return byGen.map { GenerationListing(id: $0.key, snapshots: $0.value.snaps, segments: $0.value.segs) }
        .sorted { $0.id < $1.id }
}
