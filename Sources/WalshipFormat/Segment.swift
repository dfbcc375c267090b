// Segment payload: whole transactions in txid order, each with its commit time, the database
// size after it, the whole-database checksum after it, and the last version of each page it
// wrote. Encoded as plain bytes here; the caller compresses them into an LZ4 frame.

public enum SegmentCodec {
    public static let headerMagic: UInt32 = 0x4745_5357   // "WSEG"
    public static let txnMagic: UInt32 = 0x214E_5854      // "TXN!"
    public static let trailerMagic: UInt32 = 0x444E_4557  // "WEND"
    /// A compacted range of transactions squashed into one record (restore point at its end).
    public static let squashedMagic: UInt32 = 0x2153_5854 // "TXS!"
    public static let squashedHeaderSize = 48
    public static let version: UInt32 = 1
    public static let headerSize = 16
    public static let transactionHeaderSize = 32
    public static let trailerSize = 24

    public static func header(pageSize: Int) -> [UInt8] {
        var w = ByteWriter(); w.u32(headerMagic); w.u32(version); w.u32(UInt32(pageSize)); w.u32(0)
        return w.bytes
    }

    public static func transactionHeader(_ t: TransactionHeader) -> [UInt8] {
        var w = ByteWriter(capacity: transactionHeaderSize)
        w.u32(txnMagic); w.u32(t.pageCount); w.u64(t.txid); w.i64(t.commitTimeUs)
        w.u32(t.dbPages); w.u32(0)
        return w.bytes
    }

    /// Header of a squashed range: pages are the last version of each page the range wrote;
    /// applying it means truncating to `truncateFirstTo` pages, writing the pages, then
    /// truncating to `dbPages`.
    public static func squashedHeader(_ t: TransactionHeader) -> [UInt8] {
        var w = ByteWriter(capacity: squashedHeaderSize)
        w.u32(squashedMagic); w.u32(t.pageCount); w.u64(t.txid); w.u64(t.lastTxid); w.i64(t.commitTimeUs)
        w.u32(t.dbPages); w.u32(t.truncateFirstTo ?? t.dbPages); w.u64(0)
        return w.bytes
    }

    /// Follows a transaction's pages: the whole-database checksum after the transaction.
    public static func transactionChecksum(_ sum: UInt64) -> [UInt8] {
        var w = ByteWriter(capacity: 8); w.u64(sum); return w.bytes
    }

    public static func pageRecordPrefix(_ pageNumber: UInt32) -> [UInt8] {
        var w = ByteWriter(capacity: 4); w.u32(pageNumber); return w.bytes
    }

    public static func trailer(transactionCount: UInt32, lastTxid: UInt64, dbChecksum: UInt64) -> [UInt8] {
        var w = ByteWriter(); w.u32(trailerMagic); w.u32(transactionCount); w.u64(lastTxid); w.u64(dbChecksum)
        return w.bytes
    }
}

public struct TransactionHeader: Equatable, Sendable {
    /// The first (for a single transaction, the only) txid the record covers.
    public var txid: UInt64
    /// The last txid it covers: `txid` unless the record is a squashed range.
    public var lastTxid: UInt64
    public var commitTimeUs: Int64
    public var dbPages: UInt32
    public var pageCount: UInt32
    /// Squashed ranges only: the smallest database size inside the range.
    public var truncateFirstTo: UInt32?
    public init(txid: UInt64, commitTimeUs: Int64, dbPages: UInt32, pageCount: UInt32) {
        self.txid = txid; self.lastTxid = txid; self.commitTimeUs = commitTimeUs; self.dbPages = dbPages; self.pageCount = pageCount
    }
    public init(squashing first: UInt64, through last: UInt64, commitTimeUs: Int64, dbPages: UInt32, pageCount: UInt32, truncateFirstTo: UInt32) {
        self.txid = first; self.lastTxid = last; self.commitTimeUs = commitTimeUs; self.dbPages = dbPages
        self.pageCount = pageCount; self.truncateFirstTo = truncateFirstTo
    }
    public var isSquashed: Bool { truncateFirstTo != nil }
}

/// Streaming decoder for a segment payload, fed in arbitrary chunks; buffers at most one page.
public struct SegmentDecoder {
    public enum Event {
        case begin(pageSize: Int)
        case transaction(TransactionHeader)
        case page(UInt32, UnsafeRawBufferPointer)
        /// The transaction's pages are done; the whole-database checksum after it.
        case commit(dbChecksum: UInt64)
        case end(transactionCount: UInt32, lastTxid: UInt64, dbChecksum: UInt64)
    }

    enum Expect { case header, txnOrTrailer, page, txnChecksum, done }
    private var expect: Expect = .header
    private var buffer: [UInt8] = []
    private var pageSize = 0
    private var pagesLeft: UInt32 = 0
    private var txnCount: UInt32 = 0
    private var lastTxid: UInt64 = 0
    private var checksum: UInt64 = 0
    public let name: String

    public init(name: String = "segment") { self.name = name }
    public var finished: Bool { expect == .done }

    private var want: Int {
        switch expect {
        case .header: return SegmentCodec.headerSize
        case .txnOrTrailer: return 4
        case .page: return 4 + pageSize
        case .txnChecksum: return 8
        case .done: return 0
        }
    }

    public mutating func feed(_ bytes: UnsafeRawBufferPointer, _ handle: (Event) throws -> Void) throws {
        var input = bytes
        while !input.isEmpty {
            if expect == .done { throw FormatError.corrupt("\(name): bytes after the segment trailer") }
            var need = want
            if expect == .txnOrTrailer && buffer.count >= 4 {
                let magic = buffer.withUnsafeBytes { readLE32($0, 0) }
                need = magic == SegmentCodec.trailerMagic ? SegmentCodec.trailerSize
                    : magic == SegmentCodec.squashedMagic ? SegmentCodec.squashedHeaderSize : SegmentCodec.transactionHeaderSize
            }
            if buffer.isEmpty && expect == .page && input.count >= need {
                let unit = UnsafeRawBufferPointer(rebasing: input[0..<need])
                try emitPage(unit, handle)
                input = UnsafeRawBufferPointer(rebasing: input[need...])
                continue
            }
            let take = min(need - buffer.count, input.count)
            buffer.append(contentsOf: UnsafeRawBufferPointer(rebasing: input[0..<take]))
            input = UnsafeRawBufferPointer(rebasing: input[take...])
            if buffer.count == need {
                if expect == .txnOrTrailer && need == 4 { continue }   // now we know which record follows
                let unit = buffer
                buffer.removeAll(keepingCapacity: true)
                try unit.withUnsafeBytes { try consume($0, handle) }
            }
        }
    }

    public mutating func feed(_ bytes: [UInt8], _ handle: (Event) throws -> Void) throws {
        try bytes.withUnsafeBytes { try feed($0, handle) }
    }

    /// Call at end of input: fails unless the trailer was read.
    public func finish() throws {
        guard expect == .done else { throw FormatError.truncated("\(name) ends before its trailer") }
    }

    private mutating func emitPage(_ unit: UnsafeRawBufferPointer, _ handle: (Event) throws -> Void) throws {
        let pgno = readLE32(unit, 0)
        guard pgno != 0 else { throw FormatError.corrupt("\(name): page number 0") }
        try handle(.page(pgno, UnsafeRawBufferPointer(rebasing: unit[4...])))
        pagesLeft -= 1
        if pagesLeft == 0 { expect = .txnChecksum }
    }

    private mutating func consume(_ unit: UnsafeRawBufferPointer, _ handle: (Event) throws -> Void) throws {
        switch expect {
        case .header:
            guard readLE32(unit, 0) == SegmentCodec.headerMagic else { throw FormatError.corrupt("\(name): bad segment header") }
            guard readLE32(unit, 4) == SegmentCodec.version else { throw FormatError.unsupported("\(name): segment version \(readLE32(unit, 4))") }
            pageSize = Int(readLE32(unit, 8))
            guard pageSize >= 512, pageSize <= 65536 else { throw FormatError.corrupt("\(name): page size \(pageSize)") }
            expect = .txnOrTrailer
            try handle(.begin(pageSize: pageSize))
        case .txnOrTrailer:
            let magic = readLE32(unit, 0)
            if magic == SegmentCodec.trailerMagic {
                let count = readLE32(unit, 4), last = readLE64(unit, 8), sum = readLE64(unit, 16)
                guard count == txnCount, count == 0 || last == lastTxid, sum == checksum || count == 0 else {
                    throw FormatError.corrupt("\(name): trailer does not match its transactions")
                }
                expect = .done
                try handle(.end(transactionCount: count, lastTxid: last, dbChecksum: sum))
                return
            }
            let t: TransactionHeader
            if magic == SegmentCodec.squashedMagic {
                t = TransactionHeader(squashing: readLE64(unit, 8), through: readLE64(unit, 16),
                                      commitTimeUs: Int64(bitPattern: readLE64(unit, 24)), dbPages: readLE32(unit, 32),
                                      pageCount: readLE32(unit, 4), truncateFirstTo: readLE32(unit, 36))
                guard t.lastTxid >= t.txid else { throw FormatError.corrupt("\(name): squashed range \(t.txid)-\(t.lastTxid)") }
            } else {
                guard magic == SegmentCodec.txnMagic else { throw FormatError.corrupt("\(name): bad transaction record") }
                t = TransactionHeader(txid: readLE64(unit, 8), commitTimeUs: Int64(bitPattern: readLE64(unit, 16)),
                                      dbPages: readLE32(unit, 24), pageCount: readLE32(unit, 4))
            }
            guard t.lastTxid < UInt64(Int64.max) else { throw FormatError.corrupt("\(name): txid \(t.lastTxid) is out of range") }
            if txnCount > 0 && t.txid != lastTxid + 1 {
                throw FormatError.corrupt("\(name): transaction \(t.txid) follows \(lastTxid)")
            }
            txnCount += 1; lastTxid = t.lastTxid
            try handle(.transaction(t))
            pagesLeft = t.pageCount
            expect = t.pageCount == 0 ? .txnChecksum : .page
        case .page:
            try emitPage(unit, handle)
        case .txnChecksum:
            checksum = readLE64(unit, 0)
            expect = .txnOrTrailer
            try handle(.commit(dbChecksum: checksum))
        case .done:
            throw FormatError.corrupt("\(name): bytes after the trailer")
        }
    }
}
