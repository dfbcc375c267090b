// Encryption at rest, as a byte format (docs/FORMAT.md, "Encrypted objects"). An encrypted
// object keeps its metadata header in the clear (with the encrypted flag and the key id) and
// replaces the LZ4 frame by a sealed stream of the same bytes:
//
//   "WSE1" | salt (16 bytes) | chunk* (the last one has the final bit)
//   chunk = word (u32 LE: plaintext length | 0x8000_0000 when final) | ciphertext | tag (16)
//
// Each object has its own key, HMAC-SHA256(master key, "walship-object-key-v1" | salt), so
// nonces (the chunk index) never repeat under one key. The final chunk's associated data
// also covers the object's metadata, so neither the header nor the length can be altered.

/// AES-256-GCM as the format needs it; implemented over a crypto library outside this module.
public protocol AuthenticatedCipher {
    func seal(nonce: [UInt8], aad: [UInt8], plain: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) throws -> [UInt8]
    func open(nonce: [UInt8], aad: [UInt8], cipher: UnsafeRawBufferPointer, tag: [UInt8], into out: UnsafeMutableRawBufferPointer) throws -> Bool
}

public enum HMACSHA256 {
    public static func mac(key: [UInt8], _ message: [UInt8]) -> [UInt8] {
        var k = key
        if k.count > 64 { var h = SHA256(); h.update(k); k = h.finalize() }
        k += [UInt8](repeating: 0, count: 64 - k.count)
        var inner = SHA256(); inner.update(k.map { $0 ^ 0x36 }); inner.update(message)
        var outer = SHA256(); outer.update(k.map { $0 ^ 0x5c }); outer.update(inner.finalize())
        return outer.finalize()
    }
}

public enum Sealing {
    public static let magic: [UInt8] = Array("WSE1".utf8)
    public static let saltSize = 16
    public static let headerSize = 4 + saltSize
    public static let chunkSize = 64 * 1024
    public static let tagSize = 16
    static let finalBit: UInt32 = 0x8000_0000

    /// The id recorded in every object sealed with `masterKey`: tells a wrong key from a
    /// damaged object without revealing the key.
    public static func keyID(_ masterKey: [UInt8]) -> UInt64 {
        let m = HMACSHA256.mac(key: masterKey, Array("walship-key-id-v1".utf8))
        return m.prefix(8).reduce(UInt64(0)) { $0 << 8 | UInt64($1) }
    }

    public static func objectKey(_ masterKey: [UInt8], salt: [UInt8]) -> [UInt8] {
        HMACSHA256.mac(key: masterKey, Array("walship-object-key-v1".utf8) + salt)
    }

    static func nonce(_ index: UInt64) -> [UInt8] {
        var n = [UInt8](repeating: 0, count: 12)
        for i in 0..<8 { n[i] = UInt8(truncatingIfNeeded: index >> (8 * UInt64(i))) }
        return n
    }

    static func word(_ length: Int, final: Bool) -> [UInt8] {
        let w = UInt32(length) | (final ? finalBit : 0)
        return [UInt8(w & 0xff), UInt8(w >> 8 & 0xff), UInt8(w >> 16 & 0xff), UInt8(w >> 24)]
    }
}

/// Seals a byte stream chunk by chunk and hands the sealed bytes to `sink`.
public final class SealedStreamWriter {
    private let cipher: AuthenticatedCipher
    private let sink: (UnsafeRawBufferPointer) throws -> Void
    private var pending: [UInt8] = []
    private var index: UInt64 = 0
    private var out: [UInt8]
    public private(set) var bytesOut: UInt64 = 0

    /// `makeCipher` gets the per-object key derived from `salt` (random, 16 bytes).
    public init(masterKey: [UInt8], salt: [UInt8], makeCipher: ([UInt8]) throws -> AuthenticatedCipher,
                sink: @escaping (UnsafeRawBufferPointer) throws -> Void) throws {
        precondition(salt.count == Sealing.saltSize)
        cipher = try makeCipher(Sealing.objectKey(masterKey, salt: salt))
        self.sink = sink
        out = [UInt8](repeating: 0, count: Sealing.chunkSize)
        pending.reserveCapacity(Sealing.chunkSize)
        try emit(Sealing.magic + salt)
    }

    private func emit(_ b: [UInt8]) throws {
        bytesOut += UInt64(b.count)
        try b.withUnsafeBytes { try sink($0) }
    }

    public func write(_ data: UnsafeRawBufferPointer) throws {
        var rest = data
        while !rest.isEmpty {
            let take = min(Sealing.chunkSize - pending.count, rest.count)
            pending.append(contentsOf: UnsafeRawBufferPointer(rebasing: rest[0..<take]))
            rest = UnsafeRawBufferPointer(rebasing: rest[take...])
            if pending.count == Sealing.chunkSize { try sealPending(final: false, extraAAD: []) }
        }
    }

    /// Seals what is left as the final chunk; `metadata` (the object's header) is bound to it.
    public func finish(metadata: [UInt8]) throws {
        try sealPending(final: true, extraAAD: metadata)
    }

    private func sealPending(final: Bool, extraAAD: [UInt8]) throws {
        let w = Sealing.word(pending.count, final: final)
        let tag = try pending.withUnsafeBytes { p in
            try out.withUnsafeMutableBytes { o in
                try cipher.seal(nonce: Sealing.nonce(index), aad: w + extraAAD, plain: p, into: o)
            }
        }
        try emit(w)
        let n = pending.count
        bytesOut += UInt64(n)
        try out.withUnsafeBytes { try sink(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
        try emit(tag)
        index += 1
        pending.removeAll(keepingCapacity: true)
    }
}

public enum SealError: Error, CustomStringConvertible, Equatable {
    case notSealed
    case tampered
    case truncated
    case trailingBytes

    public var description: String {
        switch self {
        case .notSealed: return "its encrypted body has no WSE1 header"
        case .tampered: return "fails authentication: it was altered, or sealed with another key of the same id"
        case .truncated: return "its encrypted body is truncated"
        case .trailingBytes: return "has bytes after its final encrypted chunk"
        }
    }
}

/// Opens a sealed stream fed in arbitrary pieces; hands authenticated plaintext to `sink`.
public final class SealedStreamReader {
    private let masterKey: [UInt8]
    private let makeCipher: ([UInt8]) throws -> AuthenticatedCipher
    private let metadata: [UInt8]
    private var cipher: AuthenticatedCipher?
    private var buffer: [UInt8] = []
    private var index: UInt64 = 0
    private var finished = false
    private var out = [UInt8](repeating: 0, count: Sealing.chunkSize)

    public init(masterKey: [UInt8], metadata: [UInt8], makeCipher: @escaping ([UInt8]) throws -> AuthenticatedCipher) {
        self.masterKey = masterKey
        self.metadata = metadata
        self.makeCipher = makeCipher
    }

    public func feed(_ data: UnsafeRawBufferPointer, _ sink: (UnsafeRawBufferPointer) throws -> Void) throws {
        buffer.append(contentsOf: data)
        var consumed = 0
        defer { if consumed > 0 { buffer.removeFirst(consumed) } }
        if cipher == nil {
            guard buffer.count >= Sealing.headerSize else { return }
            guard Array(buffer[0..<4]) == Sealing.magic else { throw SealError.notSealed }
            cipher = try makeCipher(Sealing.objectKey(masterKey, salt: Array(buffer[4..<Sealing.headerSize])))
            consumed = Sealing.headerSize
        }
        while buffer.count - consumed >= 4 {
            if finished { throw SealError.trailingBytes }
            let w = buffer.withUnsafeBytes { readLE32($0, consumed) }
            let final = w & Sealing.finalBit != 0
            let length = Int(w & ~Sealing.finalBit)
            guard length <= Sealing.chunkSize, final || length == Sealing.chunkSize else { throw SealError.tampered }
            let need = 4 + length + Sealing.tagSize
            guard buffer.count - consumed >= need else { break }
            let tag = Array(buffer[(consumed + 4 + length)..<(consumed + need)])
            let aad = Array(buffer[consumed..<(consumed + 4)]) + (final ? metadata : [])
            let ok = try buffer.withUnsafeBytes { b in
                try out.withUnsafeMutableBytes { o in
                    try cipher!.open(nonce: Sealing.nonce(index), aad: aad,
                                     cipher: UnsafeRawBufferPointer(rebasing: b[(consumed + 4)..<(consumed + 4 + length)]), tag: tag, into: o)
                }
            }
            guard ok else { throw SealError.tampered }
            try out.withUnsafeBytes { try sink(UnsafeRawBufferPointer(rebasing: $0[0..<length])) }
            consumed += need
            index += 1
            if final { finished = true }
        }
        if finished && buffer.count > consumed { throw SealError.trailingBytes }
    }

    /// Call at the end of the object: it must have ended with the final chunk.
    public func finish() throws {
        guard finished, buffer.isEmpty else { throw SealError.truncated }
    }
}
