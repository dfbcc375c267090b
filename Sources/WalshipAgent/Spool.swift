#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import WalshipFormat
import WalshipLZ4
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// What the agent knows durably about its database, written atomically after each cut.
struct AgentState: Codable {
    var version = 1
    var dbPath: String
    var dbDevice: UInt64
    var dbInode: UInt64
    var generation: String
    var pageSize: Int
    var lastTxid: UInt64
    var lastCommitTimeUs: Int64
    var dbPages: UInt32
    var dbChecksum: UInt64
    /// Page-hash table entries are known to be written through this txid.
    var tableTxid: UInt64
    var wal: WalPosition
    var nextSequence: UInt64
    var lastSnapshotTimeUs: Int64
    var lastSnapshotTxid: UInt64
    /// Id of the encryption key the generation's objects are sealed with (nil: not encrypted).
    var keyID: UInt64?
    /// The database's id, recorded in every object (nil in states saved before it existed).
    var databaseID: UInt64?
}

/// The local spool beside the database: state, page-hash table, outbox of objects waiting
/// for every replica, per-replica acknowledgements. Directory 0700, files 0600.
final class Spool {
    let dir: String
    var statePath: String { dir + "/state.json" }
    var tablePath: String { dir + "/pagehash.bin" }
    var outboxDir: String { dir + "/outbox" }
    var acksDir: String { dir + "/acks" }
    var workDir: String { dir + "/work" }
    /// Hard links to the level-0 segments of the open compaction window (see LocalCompactor).
    var compactDir: String { dir + "/compact" }
    var snapshotRequestPath: String { dir + "/snapshot-request" }
    /// A request the agent could not carry out, renamed (a rename needs no free space).
    var snapshotRequestFailedPath: String { dir + "/snapshot-request.failed" }
    private var lockFD: Int32 = -1

    init(dir: String) { self.dir = dir }

    /// `.<name>-walship` beside the database's real file (symlinks resolved), so that every
    /// path naming the same database finds the same spool.
    static func defaultDirectory(forDatabase db: String) -> String {
        let real = FS.resolved(db)
        return FS.dirname(real) + "/." + FS.basename(real) + "-walship"
    }

    func prepare() throws {
        try FS.makeDirectories(dir, mode: 0o700)
        chmod(dir, 0o700)
        for d in [outboxDir, acksDir, workDir, compactDir] { try FS.makeDirectories(d, mode: 0o700) }
    }

    /// Removes half-built objects a crashed agent left. Call only while holding the lock.
    func clearWork() throws {
        for n in try FS.list(workDir) { try FS.remove(workDir + "/" + n) }
    }

    /// Takes the spool's lock so two agents never replicate one database. Returns the pid of
    /// the holder when it is taken.
    func lock() throws -> Int32? {
        let fd = open(dir + "/agent.lock", O_RDWR | O_CREAT | O_CLOEXEC, 0o600)
        guard fd >= 0 else { throw SystemError.last("open \(dir)/agent.lock") }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 {
            defer { close(fd) }
            return Spool.holderPID(fd)
        }
        ftruncate(fd, 0)
        let pid = Array("\(getpid())\n".utf8)
        _ = pid.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        lockFD = fd
        return nil
    }

    /// Gives up the lock (at shutdown, so that a restart in the same process can take it).
    func unlock() {
        guard lockFD >= 0 else { return }
        flock(lockFD, LOCK_UN)
        close(lockFD)
        lockFD = -1
    }

    func isLockedByAnotherProcess() -> Int32? {
        let fd = open(dir + "/agent.lock", O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return nil }
        defer { close(fd) }
        if flock(fd, LOCK_EX | LOCK_NB) != 0 { return Spool.holderPID(fd) }
        flock(fd, LOCK_UN)
        return nil
    }

    /// The pid the lock holder wrote into the lock file (-1 if unreadable).
    private static func holderPID(_ fd: Int32) -> Int32 {
        var buf = [UInt8](repeating: 0, count: 32)
        let n = pread(fd, &buf, 32, 0)
        return Int32(String(decoding: buf.prefix(max(0, n)), as: UTF8.self).trimmingCharacters()) ?? -1
    }

    func loadState() throws -> AgentState? {
        guard FS.exists(statePath) else { return nil }
        let bytes = try FS.readAll(statePath)
        return try? JSONDecoder().decode(AgentState.self, from: Data(bytes))
    }

    func saveState(_ s: AgentState) throws {
        let data = try JSONEncoder().encode(s)
        try FS.writeAtomically(statePath, Array(data))
    }

    // MARK: outbox

    struct OutboxEntry {
        var sequence: UInt64
        var key: String
        var path: String
    }

    func outboxEntries() throws -> [OutboxEntry] {
        try FS.list(outboxDir).compactMap { name in
            guard let sep = name.firstIndex(of: "~"), let seq = UInt64(name[..<sep], radix: 16) else { return nil }
            let key = name[name.index(after: sep)...].replacingAll("~", with: "/")
            return OutboxEntry(sequence: seq, key: key, path: outboxDir + "/" + name)
        }.sorted { $0.sequence < $1.sequence }
    }

    /// Moves a finished file into the outbox under the next sequence number; returns its path.
    @discardableResult
    func enqueue(file: String, key: String, sequence: UInt64) throws -> String {
        let name = hex16(sequence) + "~" + key.replacingAll("/", with: "~")
        try FS.rename(file, outboxDir + "/" + name)
        try FS.syncDirectory(outboxDir)
        return outboxDir + "/" + name
    }

    /// Outbox keys under this prefix are not uploaded: the file lists replica keys (one a
    /// line) to delete once everything before it is in the replica.
    static let deletionPrefix = "walship-delete/"

    func ackPath(_ replicaID: String) -> String { acksDir + "/" + replicaID }
    /// The generation whose backlog was dropped for a replica, kept across restarts so that the
    /// replica still gets a new generation (not a chain with a hole) when it answers again.
    func droppedPath(_ replicaID: String) -> String { acksDir + "/" + replicaID + ".dropped" }
    func loadDropped(_ replicaID: String) -> String? {
        guard let b = try? FS.readAll(droppedPath(replicaID)) else { return nil }
        let g = String(decoding: b, as: UTF8.self).trimmingCharacters()
        return GenerationID.isValid(g) ? g : nil
    }
    func saveDropped(_ replicaID: String, _ generation: String?) {
        if let g = generation { try? FS.writeAtomically(droppedPath(replicaID), Array("\(g)\n".utf8)) }
        else { try? FS.remove(droppedPath(replicaID)) }
    }

    /// The replicas of the last run (display URLs, no credentials); nil before any run
    /// recorded them.
    var replicasPath: String { dir + "/replicas.json" }
    func loadReplicaURLs() throws -> [String]? {
        guard FS.exists(replicasPath) else { return nil }
        do { return try JSONDecoder().decode([String].self, from: Data(try FS.readAll(replicasPath))) } catch {
            throw SystemError(errno: EINVAL, context: "read \(replicasPath) (remove it if it is damaged: \(error))")
        }
    }
    func saveReplicaURLs(_ urls: [String]) throws {
        try FS.writeAtomically(replicasPath, Array(try JSONEncoder().encode(urls)))
    }

    func loadAck(_ replicaID: String) -> UInt64 {
        guard let b = try? FS.readAll(ackPath(replicaID)) else { return 0 }
        return UInt64(String(decoding: b, as: UTF8.self).trimmingCharacters()) ?? 0
    }

    func saveAck(_ replicaID: String, _ seq: UInt64) throws {
        try FS.writeAtomically(ackPath(replicaID), Array("\(seq)\n".utf8))
    }

    /// Disk the spool's objects hold: the outbox, the segment being built, and the compaction
    /// links to level-0 segments that have left the outbox (a file linked twice counts once).
    var heldBytes: Int64 {
        var seen = Set<[UInt64]>()
        var total: Int64 = 0
        for d in [outboxDir, compactDir, workDir] {
            for name in (try? FS.list(d)) ?? [] {
                var st = stat()
                guard stat(d + "/" + name, &st) == 0, seen.insert([UInt64(st.st_dev), UInt64(st.st_ino)]).inserted else { continue }
                total += Int64(st.st_blocks) * 512
            }
        }
        return total
    }
}

extension String {
    func trimmingCharacters() -> String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\n" || c == "\t" || c == "\0" { s = s.dropFirst() }
        while let c = s.last, c == " " || c == "\n" || c == "\t" || c == "\0" { s = s.dropLast() }
        return String(s)
    }
}

/// page number → XXH64 of the page, on disk (8 bytes a page) with an in-memory overlay of the
/// changes not yet written. Lets the whole-database checksum be updated per transaction
/// without holding the database in memory.
final class PageHashTable {
    let file: RawFile
    private var overlay: [UInt32: UInt64] = [:]
    init(path: String) throws {
        file = try RawFile(path: path, flags: O_RDWR | O_CREAT, mode: 0o600)
    }

    /// Recently read or written entries, so hot pages cost no read; bounded.
    private var cache: [UInt32: UInt64] = [:]
    private let cacheLimit = 32 * 1024

    func get(_ pg: UInt32) throws -> UInt64 {
        if let v = overlay[pg] { return v }
        if let v = cache[pg] { return v }
        var v: UInt64 = 0
        let n = try withUnsafeMutableBytes(of: &v) { try file.read(at: Int(pg - 1) * 8, into: $0) }
        let value = n == 8 ? UInt64(littleEndian: v) : 0
        remember(pg, value)
        return value
    }

    private func remember(_ pg: UInt32, _ v: UInt64) {
        if cache.count >= cacheLimit { cache.removeAll(keepingCapacity: true) }
        cache[pg] = v
    }

    func set(_ pg: UInt32, _ h: UInt64) { overlay[pg] = h }

    var hasPending: Bool { !overlay.isEmpty }

    /// Writes the overlay to the file.
    func flush() throws {
        for (pg, h) in overlay.sorted(by: { $0.key < $1.key }) {
            var v = h.littleEndian
            try withUnsafeBytes(of: &v) { try file.write(at: Int(pg - 1) * 8, $0) }
            remember(pg, h)
        }
        overlay.removeAll(keepingCapacity: true)
    }

    func discardPending() { overlay.removeAll(); cache.removeAll() }

    /// Rewrites the whole table (after a snapshot), streaming from `entries`.
    func rewrite(pages: UInt32, _ hashAt: (UInt32) throws -> UInt64) throws {
        overlay.removeAll(); cache.removeAll()
        try file.truncate(to: 0)
        var buf = [UInt8](); buf.reserveCapacity(64 * 1024)
        var off = 0
        for pg in stride(from: UInt32(1), through: pages, by: 1) {
            var v = try hashAt(pg).littleEndian
            withUnsafeBytes(of: &v) { buf.append(contentsOf: $0) }
            if buf.count >= 64 * 1024 { try buf.withUnsafeBytes { try file.write(at: off, $0) }; off += buf.count; buf.removeAll(keepingCapacity: true) }
        }
        if !buf.isEmpty { try buf.withUnsafeBytes { try file.write(at: off, $0) } }
    }
}

/// Builds one object file in the spool's work directory: a metadata placeholder, then an LZ4
/// frame streamed to disk (sealed chunk by chunk when a key is given); `finish` fills in the
/// metadata and fsyncs.
final class ObjectBuilder {
    let path: String
    private let file: RawFile
    private var compressor: LZ4FrameCompressor!
    private var sealer: SealedStreamWriter?
    private let key: EncryptionKey?

    /// LZ4's high-compression level for segments of light writers: their payload (pages as
    /// deltas) is small and shipped many times a day, so a fifth fewer bytes is worth the CPU,
    /// and decoding costs the same. It compresses about 90 MB/s on one core, so it is used only
    /// while the payload comes slower than `compressedRateLimit`: a heavy writer's segments,
    /// snapshots (the database's size) and merges of large windows use the fast level.
    static let segmentLevel: Int32 = 3
    static let compressedRateLimit = 1 << 20   // payload bytes per second
    /// Merges of at most this many input bytes use `segmentLevel`.
    static let compressedMergeLimit = 32 << 20
    /// A segment at `segmentLevel` that grows past this faster than `compressedRateLimit` is
    /// cut early: a writer that fast gets the fast level from its next segment on.
    static let compressedPayloadLimit = 4 << 20

    static func segmentLevel(payloadBytesPerSecond rate: Double) -> Int32 {
        rate <= Double(compressedRateLimit) ? segmentLevel : 0
    }

    /// The level of a level-1 merge of `inputBytes` (stored) over commits spanning `spanMs`.
    /// A merge re-uploads every transaction of its window, so for a light writer it is worth
    /// `segmentLevel` too: up to `compressedMergeLimit`, or while its inputs came at most half
    /// of `compressedRateLimit` a second (a few seconds of one core per window at most).
    static func mergeLevel(inputBytes: Int64, spanMs: Int64) -> Int32 {
        if inputBytes <= Int64(compressedMergeLimit) { return segmentLevel }
        let seconds = max(Int64(1), spanMs / 1000)
        return inputBytes / seconds <= Int64(compressedRateLimit / 2) ? segmentLevel : 0
    }

    let level: Int32

    init(path: String, key: EncryptionKey? = nil, level: Int32 = 0) throws {
        self.path = path
        self.level = level
        self.key = key
        file = try RawFile(path: path, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600)
        try file.append([UInt8](repeating: 0, count: ObjectMetadata.encodedSize))
        let f = file
        if let k = key {
            let s = try k.sealer { chunk in try f.append(chunk) }
            sealer = s
            compressor = try LZ4FrameCompressor(level: level) { chunk in try s.write(chunk) }
        } else {
            compressor = try LZ4FrameCompressor(level: level) { chunk in try f.append(chunk) }
        }
    }

    func write(_ bytes: UnsafeRawBufferPointer) throws { try compressor.write(bytes) }
    func write(_ bytes: [UInt8]) throws { try compressor.write(bytes) }
    var payloadBytes: UInt64 { compressor.bytesIn }

    func finish(_ meta: ObjectMetadata) throws {
        try compressor.finish()
        var m = meta
        m.payloadBytes = compressor.bytesIn
        if let k = key {
            m.flags |= ObjectMetadata.flagEncrypted
            m.keyID = k.id
        }
        let header = m.encoded()
        try sealer?.finish(metadata: header)
        try header.withUnsafeBytes { try file.write(at: 0, $0) }
        try file.sync()
    }

    func abandon() { try? FS.remove(path) }
}
