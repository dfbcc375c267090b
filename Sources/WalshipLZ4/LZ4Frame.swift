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
///
/// The content checksum is checked here, with the shim's XXH32, not by liblz4 (see the shim):
/// liblz4 decompresses with its checks off, this hashes what comes out and compares the hash
/// with the frame's last four bytes when the frame ends. A frame must carry a content checksum.
public final class LZ4FrameDecompressor {
    private var ctx: OpaquePointer?
    private var out = [UInt8](repeating: 0, count: 256 * 1024)
    private var done = false
    private let name: String
    private var options = LZ4F_decompressOptions_t()
    private var hash = walship_xxh32_state()
    /// The frame's first five bytes (magic and FLG), then the last four bytes consumed.
    private var head: [UInt8] = []
    private var tail: (UInt8, UInt8, UInt8, UInt8) = (0, 0, 0, 0)
    public private(set) var bytesOut: UInt64 = 0

    public init(name: String) throws {
        self.name = name
        var c: OpaquePointer?
        _ = try LZ4Error.check(LZ4F_createDecompressionContext(&c, UInt32(LZ4F_VERSION)), name)
        ctx = c
        options.skipChecksums = 1
        walship_xxh32_init(&hash, 0)
    }

    deinit { LZ4F_freeDecompressionContext(ctx) }

    public var isFinished: Bool { done }

    private func consumed(_ bytes: UnsafeRawBufferPointer) throws {
        for b in bytes.suffix(4) { tail = (tail.1, tail.2, tail.3, b) }
        guard head.count < 5 else { return }
        head.append(contentsOf: bytes.prefix(5 - head.count))
        guard head.count == 5 else { return }
        // An LZ4 frame (liblz4 would also take a skippable frame, holding nothing), with FLG's
        // bit 2 set: content checksum present. liblz4 checks the header's own checksum.
        if head[0..<4] != [0x04, 0x22, 0x4D, 0x18] {
            throw LZ4Error(code: 0, message: "not an LZ4 frame", context: name)
        }
        if head[4] & 0x04 == 0 {
            throw LZ4Error(code: 0, message: "the frame has no content checksum", context: name)
        }
    }

    private func checkContent() throws {
        let stored = UInt32(tail.0) | UInt32(tail.1) << 8 | UInt32(tail.2) << 16 | UInt32(tail.3) << 24
        let actual = walship_xxh32_digest(&hash)
        guard stored == actual else {
            throw LZ4Error(code: 0, message: "content checksum mismatch (the frame says \(hex8(stored)), its content hashes to \(hex8(actual)))", context: name)
        }
    }

    public func feed(_ input: UnsafeRawBufferPointer, _ handle: (UnsafeRawBufferPointer) throws -> Void) throws {
        var rest = input
        while !rest.isEmpty || !done {
            if done {
                throw LZ4Error(code: 0, message: "data after the end of the frame", context: name)
            }
            var srcSize = rest.count
            var dstSize = out.count
            let hint = try out.withUnsafeMutableBytes { o in
                try LZ4Error.check(LZ4F_decompress(ctx, o.baseAddress, &dstSize, rest.baseAddress, &srcSize, &options), name)
            }
            try consumed(UnsafeRawBufferPointer(rebasing: rest[..<srcSize]))
            if dstSize > 0 {
                bytesOut += UInt64(dstSize)
                try out.withUnsafeBytes { o in
                    walship_xxh32_update(&hash, o.baseAddress, dstSize)
                    try handle(UnsafeRawBufferPointer(rebasing: o[0..<dstSize]))
                }
            }
            rest = UnsafeRawBufferPointer(rebasing: rest[srcSize...])
            if hint == 0 {
                try checkContent()
                done = true
                if rest.isEmpty { break }
            }
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

func hex8(_ v: UInt32) -> String {
    let s = String(v, radix: 16)
    return String(repeating: "0", count: 8 - s.count) + s
}
