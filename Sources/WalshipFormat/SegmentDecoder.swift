// Streaming decoder for segment payloads of versions 1 and 2, fed in arbitrary chunks. Every
// page comes out whole: version 2's deltas are applied against the page window here, so
// restore, verify and compaction see the same events for both versions.

public struct SegmentDecoder {
    public enum Event {
        case begin(pageSize: Int)
        case transaction(TransactionHeader)
        case page(UInt32, UnsafeRawBufferPointer)
        /// The transaction's pages are done; the whole-database checksum after it.
        case commit(dbChecksum: UInt64)
        case end(transactionCount: UInt32, lastTxid: UInt64, dbChecksum: UInt64)
    }

    enum Expect { case header, txnOrTrailer, page, pageHead, pageBody, txnChecksum, done }
    private var expect: Expect = .header
    private var buffer: [UInt8] = []
    private var version: UInt32 = 0
    private var pageSize = 0
    private var pagesLeft: UInt32 = 0
    private var txnCount: UInt32 = 0
    private var lastTxid: UInt64 = 0
    private var checksum: UInt64 = 0
    // Version 2: the page whose record is being read, its body length (nil: whole), the window.
    private var pageNumber: UInt32 = 0
    private var deltaLength: Int?
    private var window: PageWindow?
    private var previous: [UInt8] = []
    public let name: String

    public init(name: String = "segment") { self.name = name }
    public var finished: Bool { expect == .done }
    /// The payload's version, once its header has been read.
    public var payloadVersion: UInt32 { version }

    private var want: Int {
        switch expect {
        case .header: return SegmentCodec.headerSize
        case .txnOrTrailer: return 4
        case .page: return 4 + pageSize
        case .pageHead: return 8
        case .pageBody: return deltaLength ?? pageSize
        case .txnChecksum: return 8
        case .done: return 0
        }
    }

    private static func recordSize(magic: UInt32) -> Int {
        magic == SegmentCodec.trailerMagic ? SegmentCodec.trailerSize
            : magic == SegmentCodec.squashedMagic ? SegmentCodec.squashedHeaderSize : SegmentCodec.transactionHeaderSize
    }

    public mutating func feed(_ bytes: UnsafeRawBufferPointer, _ handle: (Event) throws -> Void) throws {
        var input = bytes
        while !input.isEmpty {
            if expect == .done { throw FormatError.corrupt("\(name): bytes after the segment trailer") }
            var need = want
            if expect == .txnOrTrailer {
                if buffer.count >= 4 {
                    need = Self.recordSize(magic: buffer.withUnsafeBytes { readLE32($0, 0) })
                } else if buffer.isEmpty && input.count >= 4 {
                    need = Self.recordSize(magic: readLE32(input, 0))
                }
            }
            if buffer.isEmpty && input.count >= need {
                // The whole unit is in the input: no copy.
                try consume(UnsafeRawBufferPointer(rebasing: input[0..<need]), handle)
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

    private mutating func pageDone() {
        pagesLeft -= 1
        expect = pagesLeft == 0 ? .txnChecksum : (version == 1 ? .page : .pageHead)
    }

    /// Version 2: a page's body (whole, or a delta against its previous version), given out
    /// from the window, where the next record of the same page finds it.
    private mutating func emitBody(_ body: UnsafeRawBufferPointer, _ handle: (Event) throws -> Void) throws {
        let pg = pageNumber
        if deltaLength == nil {
            let slot = window!.admit(pg)
            window!.withMutableSlot(slot) { $0.copyMemory(from: body) }
        } else {
            guard let slot = window!.slot(of: pg) else {
                throw FormatError.corrupt("\(name): a delta for page \(pg), which is not in the object's page window")
            }
            let n = name
            // Copy runs read the previous version as it was: keep it aside first.
            window!.withSlot(slot) { old in previous.withUnsafeMutableBytes { $0.copyMemory(from: old) } }
            try previous.withUnsafeBytes { old in
                try window!.withMutableSlot(slot) { try PageDelta.apply(body, to: $0, previous: old, name: n) }
            }
            _ = window!.admit(pg)
        }
        let slot = window!.slot(of: pg)!
        try window!.withSlot(slot) { try handle(.page(pg, $0)) }
        pageDone()
    }

    private mutating func consume(_ unit: UnsafeRawBufferPointer, _ handle: (Event) throws -> Void) throws {
        switch expect {
        case .header:
            guard readLE32(unit, 0) == SegmentCodec.headerMagic else { throw FormatError.corrupt("\(name): bad segment header") }
            version = readLE32(unit, 4)
            guard SegmentCodec.readableVersions.contains(version) else {
                throw FormatError.unsupported("\(name): segment version \(version); this walship reads versions \(SegmentCodec.readableVersions.lowerBound)-\(SegmentCodec.readableVersions.upperBound)")
            }
            pageSize = Int(readLE32(unit, 8))
            guard pageSize >= 512, pageSize <= 65536, pageSize & (pageSize - 1) == 0 else { throw FormatError.corrupt("\(name): page size \(pageSize)") }
            if version >= 2 {
                let pages = Int(readLE32(unit, 12))
                guard pages >= 1, pages <= SegmentCodec.maxWindowBytes / pageSize else {
                    throw FormatError.corrupt("\(name): a page window of \(pages) pages of \(pageSize) bytes (at most \(SegmentCodec.maxWindowBytes >> 20) MiB is read)")
                }
                window = PageWindow(capacity: pages, pageSize: pageSize)
                previous = [UInt8](repeating: 0, count: pageSize)
            }
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
            expect = t.pageCount == 0 ? .txnChecksum : (version == 1 ? .page : .pageHead)
        case .page:
            let pgno = readLE32(unit, 0)
            guard pgno != 0 else { throw FormatError.corrupt("\(name): page number 0") }
            try handle(.page(pgno, UnsafeRawBufferPointer(rebasing: unit[4...])))
            pageDone()
        case .pageHead:
            pageNumber = readLE32(unit, 0)
            guard pageNumber != 0 else { throw FormatError.corrupt("\(name): page number 0") }
            let length = readLE32(unit, 4)
            if length == SegmentCodec.wholePage {
                deltaLength = nil
            } else {
                guard Int(length) < pageSize else {
                    throw FormatError.corrupt("\(name): a delta of \(length) bytes for a page of \(pageSize)")
                }
                guard window!.slot(of: pageNumber) != nil else {
                    throw FormatError.corrupt("\(name): a delta for page \(pageNumber), which is not in the object's page window")
                }
                deltaLength = Int(length)
                if length == 0 { try emitBody(UnsafeRawBufferPointer(start: nil, count: 0), handle); return }
            }
            expect = .pageBody
        case .pageBody:
            try emitBody(unit, handle)
        case .txnChecksum:
            checksum = readLE64(unit, 0)
            expect = .txnOrTrailer
            try handle(.commit(dbChecksum: checksum))
        case .done:
            throw FormatError.corrupt("\(name): bytes after the trailer")
        }
    }
}
