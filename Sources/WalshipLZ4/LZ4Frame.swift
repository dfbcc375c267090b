import CLZ4

/// Errors from liblz4's frame API, with its own error name.
public struct LZ4Error: Error, CustomStringConvertible {
    public let code: Int
    public let message: String
    public let context: String
    public var description: String { "\(context): LZ4 error \(message) (the object is corrupt or truncated)" }

    static func check(_ r: Int, _ context: String) throws -> Int {
        if LZ4F_isError(r) != 0 {
            throw LZ4Error(code: r, message: String(cString: LZ4F_getErrorName(r)), context: context)
        }
        return r
    }
}

/// Streams bytes into one standard LZ4 frame (content checksum on, 256 KiB blocks) and hands
/// the compressed bytes to `sink` as they are produced. Memory is bounded by one block.
public final class LZ4FrameCompressor {
    private var ctx: OpaquePointer?
    private var prefs = LZ4F_preferences_t()
    private var out: [UInt8]
    private let chunk = 256 * 1024
    private let sink: (UnsafeRawBufferPointer) throws -> Void
    public private(set) var bytesIn: UInt64 = 0
    public private(set) var bytesOut: UInt64 = 0
    private var finished = false

    public init(level: Int32 = 0, sink: @escaping (UnsafeRawBufferPointer) throws -> Void) throws {
        self.sink = sink
        var c: OpaquePointer?
        _ = try LZ4Error.check(LZ4F_createCompressionContext(&c, UInt32(LZ4F_VERSION)), "lz4 init")
        ctx = c
        prefs.frameInfo.blockSizeID = LZ4F_max256KB
        prefs.frameInfo.blockMode = LZ4F_blockLinked
        prefs.frameInfo.contentChecksumFlag = LZ4F_contentChecksumEnabled
        prefs.compressionLevel = level
        prefs.autoFlush = 0
        out = [UInt8](repeating: 0, count: LZ4F_compressBound(256 * 1024, &prefs) + 64)
        let n = try out.withUnsafeMutableBytes { o in
            try LZ4Error.check(LZ4F_compressBegin(ctx, o.baseAddress, o.count, &prefs), "lz4 begin")
        }
        try emit(n)
    }

    deinit { LZ4F_freeCompressionContext(ctx) }

    private func emit(_ n: Int) throws {
        guard n > 0 else { return }
        bytesOut += UInt64(n)
        try out.withUnsafeBytes { try sink(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
    }

    public func write(_ data: UnsafeRawBufferPointer) throws {
        precondition(!finished)
        var rest = data
        while !rest.isEmpty {
            let piece = UnsafeRawBufferPointer(rebasing: rest[0..<min(chunk, rest.count)])
            let n = try out.withUnsafeMutableBytes { o in
                try LZ4Error.check(LZ4F_compressUpdate(ctx, o.baseAddress, o.count, piece.baseAddress, piece.count, nil), "lz4 compress")
            }
            bytesIn += UInt64(piece.count)
            try emit(n)
            rest = UnsafeRawBufferPointer(rebasing: rest[piece.count...])
        }
    }

    public func write(_ data: [UInt8]) throws { try data.withUnsafeBytes { try write($0) } }

    /// Ends the frame (writes the end mark and content checksum).
    public func finish() throws {
        guard !finished else { return }
        finished = true
        let n = try out.withUnsafeMutableBytes { o in
            try LZ4Error.check(LZ4F_compressEnd(ctx, o.baseAddress, o.count, nil), "lz4 end")
        }
        try emit(n)
    }
}

/// Decodes one LZ4 frame fed in arbitrary chunks, verifying its content checksum, and hands
/// decompressed bytes to the handler. `finish()` fails if the frame did not end.
public final class LZ4FrameDecompressor {
    private var ctx: OpaquePointer?
    private var out = [UInt8](repeating: 0, count: 256 * 1024)
    private var done = false
    private let name: String
    public private(set) var bytesOut: UInt64 = 0

    public init(name: String) throws {
        self.name = name
        var c: OpaquePointer?
        _ = try LZ4Error.check(LZ4F_createDecompressionContext(&c, UInt32(LZ4F_VERSION)), name)
        ctx = c
    }

    deinit { LZ4F_freeDecompressionContext(ctx) }

    public var isFinished: Bool { done }

    public func feed(_ input: UnsafeRawBufferPointer, _ handle: (UnsafeRawBufferPointer) throws -> Void) throws {
        var rest = input
        while !rest.isEmpty || !done {
            if done {
                throw LZ4Error(code: 0, message: "data after the end of the frame", context: name)
            }
            var srcSize = rest.count
            var dstSize = out.count
            let hint = try out.withUnsafeMutableBytes { o in
                try LZ4Error.check(LZ4F_decompress(ctx, o.baseAddress, &dstSize, rest.baseAddress, &srcSize, nil), name)
            }
            if dstSize > 0 {
                bytesOut += UInt64(dstSize)
                try out.withUnsafeBytes { try handle(UnsafeRawBufferPointer(rebasing: $0[0..<dstSize])) }
            }
            rest = UnsafeRawBufferPointer(rebasing: rest[srcSize...])
            if hint == 0 { done = true; if rest.isEmpty { break } }
            if rest.isEmpty && dstSize == 0 { break }
            if rest.isEmpty && dstSize < out.count { break }
        }
    }

    public func finish() throws {
        guard done else {
            throw LZ4Error(code: 0, message: "the frame ends early", context: name)
        }
    }
}
