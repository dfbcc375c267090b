// Segment payload: whole transactions in txid order, each with its commit time, the database
// size after it, the whole-database checksum after it, and the last version of each page it
// wrote. Encoded as plain bytes here; the caller compresses them into an LZ4 frame.
// Version 1 stores every page whole. Version 2 (written today) stores a page whole the first
// time the object holds it and, while it stays in the object's page window, later versions as
// deltas against the previous one (PageWindow.swift).

public enum SegmentCodec {
    public static let headerMagic: UInt32 = 0x4745_5357   // "WSEG"
    public static let txnMagic: UInt32 = 0x214E_5854      // "TXN!"
    public static let trailerMagic: UInt32 = 0x444E_4557  // "WEND"
    /// A compacted range of transactions squashed into one record (restore point at its end).
    public static let squashedMagic: UInt32 = 0x2153_5854 // "TXS!"
    public static let squashedHeaderSize = 48
    /// The version written; both 1 and 2 are read.
    public static let version: UInt32 = 2
    public static let readableVersions: ClosedRange<UInt32> = 1...2
    /// Version 2: the page window writers use, and the most a reader accepts (memory it keeps).
    public static let defaultWindowBytes = 4 << 20
    public static let maxWindowBytes = 64 << 20
    /// Version 2 page record: page number u32, then this length word for a whole page, or the
    /// delta's length in bytes (less than the page size).
    public static let wholePage: UInt32 = 0xFFFF_FFFF
    public static func defaultWindowPages(pageSize: Int) -> Int { max(16, defaultWindowBytes / pageSize) }
    public static let headerSize = 16
    public static let transactionHeaderSize = 32
    public static let trailerSize = 24

    /// A version-2 header: the last word is the page window, in pages.
    public static func header(pageSize: Int, windowPages: Int) -> [UInt8] {
        var w = ByteWriter(); w.u32(headerMagic); w.u32(version); w.u32(UInt32(pageSize)); w.u32(UInt32(windowPages))
        return w.bytes
    }

    /// A version-1 header (tests and fixtures only: walship writes version 2).
    public static func headerVersion1(pageSize: Int) -> [UInt8] {
        var w = ByteWriter(); w.u32(headerMagic); w.u32(1); w.u32(UInt32(pageSize)); w.u32(0)
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

    /// Version 1's page record prefix (tests and fixtures only).
    public static func pageRecordPrefixVersion1(_ pageNumber: UInt32) -> [UInt8] {
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

