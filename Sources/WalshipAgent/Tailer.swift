#if canImport(Glibc)
import Glibc
#endif
import WalshipFormat
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// A committed transaction found in the WAL: where each page's last version lives.
struct CommittedTransaction {
    var frames: [(pageNumber: UInt32, frameIndex: Int)]
    var commitSize: UInt32
    var header: WalHeader
    /// Index of the commit frame (what SQLite's wal-index mxFrame reaches when it is visible).
    var commitFrame: Int = 0
    /// The pages' bytes, in `frames` order, when the transaction was small enough to keep
    /// them from the read that validated it (saves reading them again).
    var pages: [[UInt8]]?
}

/// Where the tailer stands: the WAL header and the frames consumed up to the last commit.
struct WalPosition: Codable, Equatable {
    var header: WalHeader?
    var frames: Int
    var checksum: WalChecksum
}

/// Follows a WAL file: validates new frames against the checksum chain and returns whole
/// committed transactions. It never returns frames of a transaction whose commit frame it has
/// not validated (G1). It keeps, for snapshots, the newest committed frame of every page in
/// the current WAL.
final class WalTailer {
    let walPath: String
    private var file: RawFile?
    private(set) var header: WalHeader?
    private var validator: WalFrameValidator?
    /// Position after the last commit frame.
    private(set) var committedFrames = 0
    private(set) var committedChecksum = WalChecksum.zero
    private var pending: [UInt32: Int] = [:]
    private var pendingOrder: [UInt32] = []
    /// Page bytes of the pending transaction while it stays under `keepLimit` bytes.
    private var pendingBytes: [UInt32: [UInt8]]? = [:]
    private let keepLimit = 1 << 20
    /// Newest committed frame of each page in the current WAL.
    private(set) var pageFrames: [UInt32: Int] = [:]
    /// Database size after the last commit in the current WAL, 0 if the WAL has no commit.
    private(set) var lastCommitSize: UInt32 = 0
    private var readBuffer = [UInt8]()
    private var lastPollFrames = 0
    /// True when the last poll stopped early to bound memory; poll again right away.
    private(set) var hasMore = false
    private let pollByteBudget = 512 * 1024

    init(walPath: String) { self.walPath = walPath }

    var position: WalPosition { WalPosition(header: header, frames: committedFrames, checksum: committedChecksum) }

    enum Observation {
        case transactions([CommittedTransaction])
        /// The WAL header changed: SQLite restarted the log (or something replaced it).
        case headerChanged(old: WalHeader?, new: WalHeader)
    }

    private func openFile() throws -> RawFile? {
        if let f = file { return f }
        file = try RawFile.openIfExists(walPath)
        return file
    }

    func readHeader() throws -> WalHeader? {
        guard let f = try openFile() else { return nil }
        let b = try f.read(at: 0, count: walHeaderSize)
        return WalHeader.parse(b)
    }

    /// Starts following a new log from its first frame (after a restart of the WAL).
    func adopt(_ h: WalHeader?) {
        header = h
        validator = h.map { WalFrameValidator(header: $0) }
        committedFrames = 0
        committedChecksum = h?.checksum ?? .zero
        clearPending()
        pageFrames.removeAll()
        lastCommitSize = 0
    }

    /// SQLite's wal-index header, when it can be read (set by the owner of the -shm file).
    var walIndex: (() -> WalIndexHeader?)?

    /// Reads what is new. Call repeatedly; returns at most one header change per call, before
    /// any transaction of the new log.
    func poll() throws -> Observation {
        guard let f = try openFile() else { return .transactions([]) }
        guard let h = header else {
            if let fresh = try readHeader() { return .headerChanged(old: nil, new: fresh) }
            return .transactions([])
        }
        var out: [CommittedTransaction] = []
        hasMore = false
        let startFrames = validator!.validFrames
        defer { lastPollFrames = min(1024, validator.map { $0.validFrames - startFrames } ?? 0) }
        if try readFrames(f, header: h, into: &out), !hasMore, let index = walIndex?(), index.describes(h),
           Int(index.mxFrame) > committedFrames {
            // The chain broke after frames past the last commit, and SQLite has committed
            // beyond it: a transaction rolled back and the next one was written over its
            // frames from the frame after that commit, reaching further than they did. Read
            // again from the commit in this same poll: a caller holding the write lock takes
            // what it gets as SQLite's last commit.
            _ = try readFrames(f, header: h, into: &out)
        }
        // Frames past the last commit belong to a transaction still open, or to one rolled
        // back. After a rollback SQLite writes the next transaction over them from the frame
        // after the last commit, with the same salts: a commit can then appear inside frames
        // already taken as uncommitted, and nothing new ever appears where the chain stopped.
        // The wal-index tells: a commit at or before the frames read means they were rewritten.
        if !hasMore, let v = validator, v.validFrames > committedFrames, let index = walIndex?(), index.describes(h),
           Int(index.mxFrame) > committedFrames, Int(index.mxFrame) <= v.validFrames {
            validator = WalFrameValidator(header: h, resumeAfter: committedFrames, checksum: committedChecksum)
            clearPending()
            try readFrames(f, header: h, into: &out)
        }
        // A restart rewrites the header and then frames from 1 with new salts, so it shows as
        // no new commit at our position: only then is the header read again.
        if out.isEmpty, let current = try readHeader(), current != h {
            return .headerChanged(old: h, new: current)
        }
        return .transactions(out)
    }

    /// Validates frames from where the chain stands, appending each transaction as its commit
    /// frame is found, until the valid log ends or enough is in hand (`hasMore`). True when
    /// the chain broke after frames past the last commit, which were then dropped (the
    /// validator stands at the last commit again).
    @discardableResult
    private func readFrames(_ f: RawFile, header h: WalHeader, into out: inout [CommittedTransaction]) throws -> Bool {
        var v = validator!
        let frameSize = h.frameSize
        let fileSize = try f.size()
        var invalid = false
        var keptBytes = out.reduce(0) { $0 + ($1.pages?.count ?? 0) * frameSize + 64 }
        // Start with about as many frames as the last poll found: the file often holds stale
        // frames past the valid end (the WAL is reused after a restart), not worth copying.
        var batchFrames = max(2, lastPollFrames + 2)
        while !invalid {
            let offset = h.frameOffset(v.validFrames + 1)
            let available = (fileSize - offset) / frameSize
            if available <= 0 { break }
            let n = min(available, batchFrames)
            batchFrames = min(batchFrames * 4, max(1, (1 << 20) / frameSize))
            if readBuffer.count < n * frameSize { readBuffer = [UInt8](repeating: 0, count: n * frameSize) }
            let got = try readBuffer.withUnsafeMutableBytes {
                try f.read(at: offset, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<n * frameSize]))
            }
            let whole = got / frameSize
            if whole == 0 { break }
            readBuffer.withUnsafeBytes { buf in
                for i in 0..<whole {
                    let unit = UnsafeRawBufferPointer(rebasing: buf[i * frameSize..<(i + 1) * frameSize])
                    guard let fr = v.validate(unit) else { invalid = true; break }
                    if let t = take(fr, header: h, keepPages: true) {
                        keptBytes += (t.pages?.count ?? 0) * frameSize + 64
                        out.append(t)
                        if keptBytes >= pollByteBudget && i + 1 < whole {
                            // Enough in hand: resume after this commit on the next poll.
                            v = WalFrameValidator(header: h, resumeAfter: committedFrames, checksum: committedChecksum)
                            hasMore = true
                            break
                        }
                    }
                }
            }
            if hasMore || keptBytes >= pollByteBudget { hasMore = true; break }
            if whole < n { break }
        }
        var dropped = false
        if invalid {
            // The first invalid frame ends the valid log. Frames after the last commit may be
            // rewritten (rollback, in-place rewrite before commit): start again from the commit.
            dropped = v.validFrames > committedFrames
            v = WalFrameValidator(header: h, resumeAfter: committedFrames, checksum: committedChecksum)
            clearPending()
        }
        validator = v
        if readBuffer.count > (8 << 20) { readBuffer = [] }
        return dropped
    }

    /// Adds a validated frame to the transaction in progress. On its commit frame, closes the
    /// transaction, moves the committed position past it and returns it (with its pages when
    /// `keepPages` and the transaction stayed small).
    private func take(_ fr: WalFrame, header h: WalHeader, keepPages: Bool) -> CommittedTransaction? {
        if pending[fr.pageNumber] == nil { pendingOrder.append(fr.pageNumber) }
        pending[fr.pageNumber] = fr.index
        if keepPages, pendingBytes != nil {
            if pending.count * h.frameSize > keepLimit { pendingBytes = nil } else { pendingBytes![fr.pageNumber] = Array(fr.page) }
        }
        guard fr.isCommit else { return nil }
        let kept = keepPages ? pendingBytes.map { b in pendingOrder.map { b[$0]! } } : nil
        let t = CommittedTransaction(frames: pendingOrder.map { ($0, pending[$0]!) }, commitSize: fr.commitSize,
                                     header: h, commitFrame: fr.index, pages: kept)
        for (pg, idx) in pending { pageFrames[pg] = idx }
        clearPending()
        lastCommitSize = fr.commitSize
        committedFrames = fr.index
        committedChecksum = fr.checksum
        return t
    }

    private func clearPending() {
        pending.removeAll(keepingCapacity: true)
        pendingOrder.removeAll(keepingCapacity: true)
        pendingBytes = [:]
    }

    /// Re-validates the current WAL from frame 1 and checks that the chain reaches `position`
    /// exactly; on success the tailer stands at `position` with its page map rebuilt.
    func resume(at position: WalPosition) throws -> Bool {
        guard let h = try readHeader(), let want = position.header, h == want, let f = try openFile() else { return false }
        adopt(h)
        var v = validator!
        var buf = [UInt8](repeating: 0, count: h.frameSize)
        // Frame by frame, never past the recorded position.
        while v.validFrames < position.frames {
            let got = try buf.withUnsafeMutableBytes { try f.read(at: h.frameOffset(v.validFrames + 1), into: $0) }
            guard got == h.frameSize else { break }
            let valid: Bool = buf.withUnsafeBytes { b in
                guard let fr = v.validate(b) else { return false }
                _ = take(fr, header: h, keepPages: false)
                return true
            }
            if !valid { break }
        }
        validator = v
        return committedFrames == position.frames && committedChecksum == position.checksum
    }

    /// What stands in the WAL file right after the last commit the tailer read, for error
    /// messages: whether that frame has the log's salts, whether its checksum continues the
    /// chain, and whether it continues the checksum stored in the frame before it.
    func describeFrameAfterCommit() -> String {
        guard let f = try? openFile(), let h = header else { return "no WAL header" }
        let index = committedFrames + 1
        guard let b = try? f.read(at: h.frameOffset(index), count: h.frameSize), b.count == h.frameSize else {
            return "frame \(index) is past the end of the file"
        }
        return b.withUnsafeBytes { raw in
            let salts = bigEndian32(raw, at: 8) == h.salt1 && bigEndian32(raw, at: 12) == h.salt2
            var v = WalFrameValidator(header: h, resumeAfter: committedFrames, checksum: committedChecksum)
            let chains = v.validate(raw) != nil
            var storedPrev = "n/a"
            if index > 1, let p = try? f.read(at: h.frameOffset(index - 1) + 16, count: 8), p.count == 8 {
                let prev = p.withUnsafeBytes { WalChecksum(bigEndian32($0, at: 0), bigEndian32($0, at: 4)) }
                var w = WalFrameValidator(header: h, resumeAfter: committedFrames, checksum: prev)
                storedPrev = w.validate(raw) != nil ? "yes" : "no"
            }
            return "frame \(index): page \(bigEndian32(raw, at: 0)), commit size \(bigEndian32(raw, at: 4)), salts \(salts ? "match" : "differ"), chains from the last commit: \(chains ? "yes" : "no"), from the previous frame's stored checksum: \(storedPrev)"
        }
    }

    /// Reads one page image out of a committed frame.
    func readPage(frameIndex: Int, into buf: UnsafeMutableRawBufferPointer) throws {
        guard let f = try openFile(), let h = header else { throw SystemError(errno: EIO, context: "WAL \(walPath) vanished") }
        let n = try f.read(at: h.frameOffset(frameIndex) + walFrameHeaderSize, into: buf)
        guard n == h.pageSize else { throw SystemError(errno: EIO, context: "short read of frame \(frameIndex) in \(walPath)") }
    }

    /// Reads a page for a snapshot: the frame's page, then re-reads the frame header to make
    /// sure the log was not restarted underneath (then the caller uses the database file).
    func readPageIfStillValid(frameIndex: Int, into buf: UnsafeMutableRawBufferPointer) throws -> Bool {
        guard let f = try openFile(), let h = header else { return false }
        let off = h.frameOffset(frameIndex)
        let n = try f.read(at: off + walFrameHeaderSize, into: buf)
        guard n == h.pageSize else { return false }
        let fh = try f.read(at: off, count: walFrameHeaderSize)
        guard fh.count == walFrameHeaderSize else { return false }
        return fh.withUnsafeBytes { bigEndian32($0, at: 8) == h.salt1 && bigEndian32($0, at: 12) == h.salt2 }
    }

    /// Frames in the current log after the last commit we consumed (how big the WAL is).
    var framesInLog: Int { committedFrames }
}
