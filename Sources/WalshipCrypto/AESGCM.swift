import CCrypto

/// Errors of the crypto domain.
public struct CryptoError: Error, CustomStringConvertible {
    public let message: String
    public var description: String { message }
}

/// AES-256-GCM with 12-byte nonces and 16-byte tags, over OpenSSL's EVP interface. One
/// cipher context is reused for every message, so sealing a stream of chunks allocates nothing.
public final class AESGCM {
    public static let keySize = 32
    public static let nonceSize = 12
    public static let tagSize = 16
    private let key: [UInt8]
    private let ctx: OpaquePointer

    public init(key: [UInt8]) throws {
        guard key.count == AESGCM.keySize else { throw CryptoError(message: "an AES-256 key is 32 bytes, got \(key.count)") }
        guard let c = EVP_CIPHER_CTX_new() else { throw CryptoError(message: "cannot allocate a cipher context") }
        self.key = key
        self.ctx = c
    }

    deinit { EVP_CIPHER_CTX_free(ctx) }

    /// Encrypts `plain` into `out` (same length) and returns the tag.
    public func seal(nonce: [UInt8], aad: [UInt8], plain: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) throws -> [UInt8] {
        precondition(nonce.count == AESGCM.nonceSize && out.count >= plain.count)
        guard EVP_EncryptInit_ex(ctx, EVP_aes_256_gcm(), nil, key, nonce) == 1 else { throw failure("encrypt init") }
        var n: Int32 = 0
        if !aad.isEmpty {
            guard EVP_EncryptUpdate(ctx, nil, &n, aad, Int32(aad.count)) == 1 else { throw failure("encrypt aad") }
        }
        if plain.count > 0 {
            guard EVP_EncryptUpdate(ctx, out.baseAddress!.assumingMemoryBound(to: UInt8.self), &n,
                                    plain.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(plain.count)) == 1 else { throw failure("encrypt") }
        }
        var tail = [UInt8](repeating: 0, count: 16)
        guard EVP_EncryptFinal_ex(ctx, &tail, &n) == 1 else { throw failure("encrypt final") }
        var tag = [UInt8](repeating: 0, count: AESGCM.tagSize)
        guard EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_GET_TAG, Int32(AESGCM.tagSize), &tag) == 1 else { throw failure("get tag") }
        return tag
    }

    /// Decrypts `cipher` into `out` and checks the tag; false when the tag does not match
    /// (wrong key, or the bytes were altered). `out` must not be used when it returns false.
    public func open(nonce: [UInt8], aad: [UInt8], cipher: UnsafeRawBufferPointer, tag: [UInt8], into out: UnsafeMutableRawBufferPointer) throws -> Bool {
        precondition(nonce.count == AESGCM.nonceSize && tag.count == AESGCM.tagSize && out.count >= cipher.count)
        guard EVP_DecryptInit_ex(ctx, EVP_aes_256_gcm(), nil, key, nonce) == 1 else { throw failure("decrypt init") }
        var n: Int32 = 0
        if !aad.isEmpty {
            guard EVP_DecryptUpdate(ctx, nil, &n, aad, Int32(aad.count)) == 1 else { throw failure("decrypt aad") }
        }
        if cipher.count > 0 {
            guard EVP_DecryptUpdate(ctx, out.baseAddress!.assumingMemoryBound(to: UInt8.self), &n,
                                    cipher.baseAddress!.assumingMemoryBound(to: UInt8.self), Int32(cipher.count)) == 1 else { throw failure("decrypt") }
        }
        var t = tag
        guard EVP_CIPHER_CTX_ctrl(ctx, EVP_CTRL_GCM_SET_TAG, Int32(AESGCM.tagSize), &t) == 1 else { throw failure("set tag") }
        var tail = [UInt8](repeating: 0, count: 16)
        return EVP_DecryptFinal_ex(ctx, &tail, &n) == 1
    }

    private func failure(_ step: String) -> CryptoError {
        let code = ERR_get_error()
        var buf = [CChar](repeating: 0, count: 256)
        ERR_error_string_n(code, &buf, buf.count)
        return CryptoError(message: "AES-256-GCM \(step) failed: \(String(cString: buf))")
    }
}

/// Cryptographically secure random bytes.
public func secureRandomBytes(_ count: Int) throws -> [UInt8] {
    var b = [UInt8](repeating: 0, count: count)
    guard RAND_bytes(&b, Int32(count)) == 1 else { throw CryptoError(message: "the system random generator failed") }
    return b
}

/// MD5 of `bytes`: only for S3's Content-MD5 header, which DeleteObjects requires.
public func md5Digest(_ bytes: [UInt8]) -> [UInt8] {
    var out = [UInt8](repeating: 0, count: 16)
    var n: UInt32 = 0
    _ = EVP_Digest(bytes, bytes.count, &out, &n, EVP_md5(), nil)
    return out
}
