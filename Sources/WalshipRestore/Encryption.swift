#if canImport(Glibc)
import Glibc
#endif
import WalshipFormat
import WalshipCrypto
import WalshipStorage
import WalshipSystem

extension AESGCM: AuthenticatedCipher {}

/// The master key for encryption at rest: 32 raw bytes read from a file. The key itself never
/// appears in logs or errors; its id (an HMAC of it) does.
public struct EncryptionKey: Sendable, CustomStringConvertible {
    /// Never the key itself, wherever a key ends up printed.
    public var description: String { "encryption key (id \(idText))" }
    let bytes: [UInt8]
    public let id: UInt64
    public var idText: String { hex16(id) }

    public init(bytes: [UInt8]) throws {
        guard bytes.count == AESGCM.keySize else {
            throw EncryptionError.badKey("an encryption key is exactly 32 raw bytes, this one is \(bytes.count) (make one with: head -c 32 /dev/urandom > key && chmod 600 key)")
        }
        self.bytes = bytes
        self.id = Sealing.keyID(bytes)
    }

    /// Reads a key file. It must hold exactly 32 bytes.
    public static func load(path: String) throws -> EncryptionKey {
        guard FS.isRegularFile(path) else { throw EncryptionError.badKey("encryption key file \(path) does not exist or is not a file") }
        let b: [UInt8]
        do { b = try FS.readAll(path) } catch { throw EncryptionError.badKey("cannot read encryption key file \(path): \(error)") }
        do { return try EncryptionKey(bytes: b) } catch EncryptionError.badKey(let why) {
            throw EncryptionError.badKey("\(path): \(why)")
        }
    }

    /// True when other users may read the key file (worth a warning).
    public static func isExposed(path: String) -> Bool {
        var st = stat()
        guard stat(path, &st) == 0 else { return false }
        return st.st_mode & 0o077 != 0
    }

    package func sealer(sink: @escaping (UnsafeRawBufferPointer) throws -> Void) throws -> SealedStreamWriter {
        try SealedStreamWriter(masterKey: bytes, salt: try secureRandomBytes(Sealing.saltSize),
                               makeCipher: { try AESGCM(key: $0) }, sink: sink)
    }

    func opener(metadata: [UInt8]) -> SealedStreamReader {
        SealedStreamReader(masterKey: bytes, metadata: metadata, makeCipher: { try AESGCM(key: $0) })
    }
}

public enum EncryptionError: Error, CustomStringConvertible {
    case badKey(String)
    public var description: String {
        switch self { case .badKey(let s): return s }
    }
}
