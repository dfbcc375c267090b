// SQLite write-ahead-log format (https://www.sqlite.org/fileformat2.html#the_write_ahead_log).
// Pure parsing and checksum validation; callers feed bytes they read themselves.

public let walHeaderSize = 32
public let walFrameHeaderSize = 24

/// The running checksum pair of a WAL: each frame's stored checksum is this value after it.
public struct WalChecksum: Equatable, Hashable, Codable, Sendable {
    public var s0: UInt32
    public var s1: UInt32
    public init(_ s0: UInt32, _ s1: UInt32) { self.s0 = s0; self.s1 = s1 }
    public static let zero = WalChecksum(0, 0)

    /// Continues the checksum over `bytes` (a multiple of 8 bytes). `bigEndianWords` is the
    /// low bit of the WAL magic: it says how 32-bit words are read for the sum.
    public func updated(with bytes: UnsafeRawBufferPointer, bigEndianWords: Bool) -> WalChecksum {
        precondition(bytes.count % 8 == 0, "WAL checksums run over 8-byte chunks")
        var a = s0, b = s1
        var i = 0
        let n = bytes.count
        if bigEndianWords {
            while i < n {
                let x0 = UInt32(bigEndian: bytes.loadUnaligned(fromByteOffset: i, as: UInt32.self))
                let x1 = UInt32(bigEndian: bytes.loadUnaligned(fromByteOffset: i + 4, as: UInt32.self))
                a = a &+ x0 &+ b
                b = b &+ x1 &+ a
                i += 8
            }
        } else {
            while i < n {
                let x0 = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: i, as: UInt32.self))
                let x1 = UInt32(littleEndian: bytes.loadUnaligned(fromByteOffset: i + 4, as: UInt32.self))
                a = a &+ x0 &+ b
                b = b &+ x1 &+ a
                i += 8
            }
        }
        return WalChecksum(a, b)
    }
}

public struct WalHeader: Equatable, Codable, Sendable {
    public static let magicLittle: UInt32 = 0x377f_0682
    public static let magicBig: UInt32 = 0x377f_0683
    public var magic: UInt32
    public var formatVersion: UInt32
    public var pageSize: Int
    public var checkpointSequence: UInt32
    public var salt1: UInt32
    public var salt2: UInt32
    public var checksum: WalChecksum

    public var bigEndianChecksum: Bool { magic & 1 == 1 }

    /// Parses and validates a 32-byte WAL header. Returns nil when the bytes are not a valid
    /// header (wrong magic or version, bad page size, checksum mismatch): SQLite itself then
    /// treats the log as empty.
    public static func parse(_ b: UnsafeRawBufferPointer) -> WalHeader? {
        guard b.count >= walHeaderSize else { return nil }
        let magic = readBE32(b, 0)
        guard magic == magicLittle || magic == magicBig else { return nil }
        let version = readBE32(b, 4)
        guard version == 3_007_000 else { return nil }
        let rawPageSize = Int(readBE32(b, 8))
        guard rawPageSize >= 512, rawPageSize <= 65536, rawPageSize & (rawPageSize - 1) == 0 else { return nil }
        let stored = WalChecksum(readBE32(b, 24), readBE32(b, 28))
        let computed = WalChecksum.zero.updated(with: UnsafeRawBufferPointer(rebasing: b[0..<24]),
                                                 bigEndianWords: magic & 1 == 1)
        guard stored == computed else { return nil }
        return WalHeader(magic: magic, formatVersion: version, pageSize: rawPageSize,
                         checkpointSequence: readBE32(b, 12), salt1: readBE32(b, 16),
                         salt2: readBE32(b, 20), checksum: stored)
    }

    public static func parse(_ bytes: [UInt8]) -> WalHeader? { bytes.withUnsafeBytes { parse($0) } }

    public var frameSize: Int { walFrameHeaderSize + pageSize }

    /// Byte offset in the WAL file of frame `index` (1-based, as SQLite counts).
    public func frameOffset(_ index: Int) -> Int { walHeaderSize + (index - 1) * frameSize }

    /// True when `next` can be a restart of this log by SQLite: same page size, new salts.
    /// The checkpoint sequence and salt-1 do not prove anything: SQLite writes the restarting
    /// connection's own checkpoint counter (often 1), and a connection whose counter is 0
    /// picks random salts (sqlite3WalFrames). Continuity across a restart comes from the
    /// agent's pin instead (see docs/ARCHITECTURE.md).
    public func couldRestart(to next: WalHeader) -> Bool {
        next.pageSize == pageSize && (next.salt1 != salt1 || next.salt2 != salt2)
    }
}

/// One frame that passed salt and checksum validation.
public struct WalFrame {
    public var index: Int            // 1-based frame number
    public var pageNumber: UInt32
    public var commitSize: UInt32    // database size in pages after commit; 0 if not a commit frame
    public var page: UnsafeRawBufferPointer
    /// The running checksum after this frame (what a resume after it starts from).
    public var checksum: WalChecksum
    public var isCommit: Bool { commitSize != 0 }
}

/// Validates frames one after another against a header and the running checksum.
public struct WalFrameValidator: Sendable {
    public let header: WalHeader
    public private(set) var checksum: WalChecksum
    /// Number of frames validated so far (the next frame is `validFrames + 1`).
    public private(set) var validFrames: Int

    public init(header: WalHeader) {
        self.header = header
        self.checksum = header.checksum
        self.validFrames = 0
    }

    /// Resumes after `frames` frames whose running checksum was `checksum`.
    public init(header: WalHeader, resumeAfter frames: Int, checksum: WalChecksum) {
        self.header = header
        self.checksum = checksum
        self.validFrames = frames
    }

    /// Checks one whole frame (24-byte header then the page). On success advances and returns
    /// the frame; on failure returns nil and leaves the validator where it was.
    public mutating func validate(_ frame: UnsafeRawBufferPointer) -> WalFrame? {
        guard frame.count == header.frameSize else { return nil }
        guard readBE32(frame, 8) == header.salt1, readBE32(frame, 12) == header.salt2 else { return nil }
        let pgno = readBE32(frame, 0)
        guard pgno != 0 else { return nil }
        var c = checksum.updated(with: UnsafeRawBufferPointer(rebasing: frame[0..<8]), bigEndianWords: header.bigEndianChecksum)
        c = c.updated(with: UnsafeRawBufferPointer(rebasing: frame[walFrameHeaderSize...]), bigEndianWords: header.bigEndianChecksum)
        guard c == WalChecksum(readBE32(frame, 16), readBE32(frame, 20)) else { return nil }
        checksum = c
        validFrames += 1
        return WalFrame(index: validFrames, pageNumber: pgno, commitSize: readBE32(frame, 4),
                        page: UnsafeRawBufferPointer(rebasing: frame[walFrameHeaderSize...]), checksum: c)
    }
}

/// Parses a WAL delivered in arbitrary chunks. Emits the header, then every valid frame; stops
/// for good at the first invalid frame (the end of the valid log). Only a frame's bytes are
/// buffered, never a transaction.
public struct WalStreamParser {
    public enum State: Equatable { case needHeader, frames, ended }
    public private(set) var state: State = .needHeader
    public private(set) var validator: WalFrameValidator?
    /// Total bytes consumed, i.e. the file offset of the next byte to feed.
    public private(set) var offset: Int = 0
    private var partial: [UInt8] = []

    public init() {}

    /// Resumes parsing at the frame after `frames` valid frames.
    public init(header: WalHeader, resumeAfter frames: Int, checksum: WalChecksum) {
        validator = WalFrameValidator(header: header, resumeAfter: frames, checksum: checksum)
        state = .frames
        offset = header.frameOffset(frames + 1)
    }

    public var header: WalHeader? { validator?.header }

    public enum Event {
        case header(WalHeader)
        case frame(WalFrame)
    }

    /// Feeds bytes that start at `offset`. Calls `handle` for each event in order.
    public mutating func feed(_ bytes: UnsafeRawBufferPointer, _ handle: (Event) throws -> Void) rethrows {
        var input = bytes
        while !input.isEmpty && state != .ended {
            let want = state == .needHeader ? walHeaderSize : validator!.header.frameSize
            // Fast path: a whole unit available in the caller's buffer and nothing partial.
            if partial.isEmpty && input.count >= want {
                let unit = UnsafeRawBufferPointer(rebasing: input[0..<want])
                try consume(unit, handle)
                if state != .ended { offset += want }
                input = UnsafeRawBufferPointer(rebasing: input[want...])
                continue
            }
            let take = min(want - partial.count, input.count)
            partial.append(contentsOf: UnsafeRawBufferPointer(rebasing: input[0..<take]))
            input = UnsafeRawBufferPointer(rebasing: input[take...])
            if partial.count == want {
                let unit = partial
                partial.removeAll(keepingCapacity: true)
                try unit.withUnsafeBytes { try consume($0, handle) }
                if state != .ended { offset += want }
            }
        }
    }

    public mutating func feed(_ bytes: [UInt8], _ handle: (Event) throws -> Void) rethrows {
        try bytes.withUnsafeBytes { try feed($0, handle) }
    }

    /// Bytes held back because they do not yet form a whole header or frame.
    public var bufferedBytes: Int { partial.count }

    private mutating func consume(_ unit: UnsafeRawBufferPointer, _ handle: (Event) throws -> Void) rethrows {
        if state == .needHeader {
            guard let h = WalHeader.parse(unit) else { state = .ended; return }
            validator = WalFrameValidator(header: h)
            state = .frames
            try handle(.header(h))
            return
        }
        guard let f = validator!.validate(unit) else { state = .ended; return }
        try handle(.frame(f))
    }
}

/// A committed transaction as read from a WAL: the last version of each page it wrote.
public struct WalTransaction {
    public var commitSize: UInt32
    public var pages: [(pageNumber: UInt32, page: [UInt8])]
}

/// Reads every committed transaction out of a whole WAL image (for tests and tools: it keeps
/// pages in memory). Frames after the last valid commit frame are not returned.
public func committedTransactions(ofWal bytes: [UInt8], chunkSize: Int = .max) -> (WalHeader?, [WalTransaction]) {
    var parser = WalStreamParser()
    var header: WalHeader?
    var txns: [WalTransaction] = []
    var pending: [UInt32: [UInt8]] = [:]
    var order: [UInt32] = []
    var start = 0
    while start < bytes.count {
        let end = min(bytes.count, start + max(1, min(chunkSize, bytes.count)))
        bytes[start..<end].withUnsafeBytes { chunk in
            parser.feed(chunk) { event in
                switch event {
                case .header(let h): header = h
                case .frame(let f):
                    if pending[f.pageNumber] == nil { order.append(f.pageNumber) }
                    pending[f.pageNumber] = Array(f.page)
                    if f.isCommit {
                        txns.append(WalTransaction(commitSize: f.commitSize, pages: order.map { ($0, pending[$0]!) }))
                        pending.removeAll(); order.removeAll()
                    }
                }
            }
        }
        start = end
    }
    return (header, txns)
}

/// The header of SQLite's wal-index (the `-shm` file): how far the log is committed
/// (`mxFrame`) and for which salts. SQLite keeps two copies of the 48-byte header, written in
/// host byte order except the salts, which are copied from the WAL header as they are. A
/// reader without SQLite's locks accepts the header only when both copies agree and it is
/// initialised; otherwise it is being written and must be read again later.
public struct WalIndexHeader: Equatable, Sendable {
    /// The two header copies and the first field after them: the checkpoint's `nBackfill`.
    public static let size = 100
    public var mxFrame: UInt32
    public var salt1: UInt32
    public var salt2: UInt32
    /// Frames already copied back into the database. Checkpoints change it without the
    /// header's protection: only a hint, unless the caller holds the writer lock.
    public var nBackfill: UInt32

    public init(mxFrame: UInt32, salt1: UInt32, salt2: UInt32, nBackfill: UInt32 = 0) {
        self.mxFrame = mxFrame; self.salt1 = salt1; self.salt2 = salt2; self.nBackfill = nBackfill
    }

    public static func parse(_ b: UnsafeRawBufferPointer) -> WalIndexHeader? {
        guard b.count >= size, b[12] != 0 else { return nil }
        for i in 0..<48 where b[i] != b[48 + i] { return nil }
        return WalIndexHeader(mxFrame: littleEndian32(b, at: 16), salt1: bigEndian32(b, at: 32), salt2: bigEndian32(b, at: 36),
                              nBackfill: littleEndian32(b, at: 96))
    }

    /// The same log at the same last commit (the backfill count aside).
    public func samePosition(as other: WalIndexHeader) -> Bool {
        mxFrame == other.mxFrame && salt1 == other.salt1 && salt2 == other.salt2
    }

    /// Byte offsets in the `-shm` file of SQLite's WAL locks (POSIX record locks, one byte
    /// each): the writer lock, the checkpointer lock, then the read locks.
    public static let writeLockByte: Int = 120
    public static let checkpointLockByte: Int = 121

    /// True when this index describes the log that `header` starts.
    public func describes(_ header: WalHeader) -> Bool { salt1 == header.salt1 && salt2 == header.salt2 }
}
