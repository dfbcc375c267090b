// Writes a version-2 segment payload: records in order, each page whole the first time the
// object holds it, later versions as deltas while the page stays in the window. The bytes go
// to `sink` (the caller compresses them).

public final class SegmentEncoder {
    public typealias Sink = (UnsafeRawBufferPointer) throws -> Void
    public let pageSize: Int
    private let sink: Sink
    private var window: PageWindow
    private var delta: [UInt8] = []
    private var record = [UInt8](repeating: 0, count: 8)
    /// Page records written whole and as deltas, and the deltas' bytes (before compression).
    public private(set) var wholePages = 0
    public private(set) var deltaPages = 0
    public private(set) var deltaBytes = 0

    public init(pageSize: Int, windowPages: Int? = nil, sink: @escaping Sink) throws {
        let pages = windowPages ?? SegmentCodec.defaultWindowPages(pageSize: pageSize)
        precondition(pages >= 1 && pages <= SegmentCodec.maxWindowBytes / pageSize)
        self.pageSize = pageSize
        self.sink = sink
        self.window = PageWindow(capacity: pages, pageSize: pageSize)
        delta.reserveCapacity(pageSize)
        try write(SegmentCodec.header(pageSize: pageSize, windowPages: pages))
    }

    private func write(_ bytes: [UInt8]) throws { try bytes.withUnsafeBytes { try sink($0) } }

    /// A transaction's header, or a squashed range's.
    public func transaction(_ t: TransactionHeader) throws {
        try write(t.isSquashed ? SegmentCodec.squashedHeader(t) : SegmentCodec.transactionHeader(t))
    }

    public func page(_ pageNumber: UInt32, _ bytes: UnsafeRawBufferPointer) throws {
        precondition(bytes.count == pageSize)
        if let slot = window.slot(of: pageNumber) {
            delta.removeAll(keepingCapacity: true)
            // Worth it only when clearly smaller than the page.
            let smaller = window.withSlot(slot) { PageDelta.encode(from: $0, to: bytes, limit: pageSize - 64, into: &delta) }
            if smaller {
                try header(pageNumber, UInt32(delta.count))
                if !delta.isEmpty { try write(delta) }
                window.withMutableSlot(slot) { $0.copyMemory(from: bytes) }
                _ = window.admit(pageNumber)
                deltaPages += 1; deltaBytes += delta.count
                return
            }
        }
        try header(pageNumber, SegmentCodec.wholePage)
        try sink(bytes)
        let slot = window.admit(pageNumber)
        window.withMutableSlot(slot) { $0.copyMemory(from: bytes) }
        wholePages += 1
    }

    private func header(_ pageNumber: UInt32, _ length: UInt32) throws {
        for i in 0..<4 {
            record[i] = UInt8(truncatingIfNeeded: pageNumber >> (8 * UInt32(i)))
            record[4 + i] = UInt8(truncatingIfNeeded: length >> (8 * UInt32(i)))
        }
        try write(record)
    }

    /// Ends a transaction (or squashed range): the whole-database checksum after it.
    public func commit(checksum: UInt64) throws { try write(SegmentCodec.transactionChecksum(checksum)) }

    public func finish(transactionCount: UInt32, lastTxid: UInt64, dbChecksum: UInt64) throws {
        try write(SegmentCodec.trailer(transactionCount: transactionCount, lastTxid: lastTxid, dbChecksum: dbChecksum))
    }
}
