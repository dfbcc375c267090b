import WalshipFormat
import WalshipLZ4
import WalshipStorage
import WalshipSystem

/// Thrown by a payload handler to end a download early (the restore target was reached).
package struct StopStreaming: Error {
    package init() {}
}

/// Errors reading a stored object, naming the object and replica.
public struct ObjectError: Error, CustomStringConvertible {
    public let key: String
    public let replica: String
    public let problem: String
    public var description: String { "object '\(key)' in \(replica) \(problem)" }
    package init(key: String, replica: String, problem: String) { self.key = key; self.replica = replica; self.problem = problem }
}

/// An error met while reading object `key`, as its reader reports it: format failures become
/// an ObjectError that names the object; the rest pass through.
func objectReadError(_ e: Error, key: String, replica: Replica) -> Error {
    if e is StopStreaming || e is ObjectError || e is ReplicaError || e is EncryptionError || e is ForeignGeneration { return e }
    if let s = e as? SystemError { return s }
    if let l = e as? LZ4Error { return ObjectError(key: key, replica: replica.displayURL, problem: "is corrupt or truncated (\(l.message))") }
    if let s = e as? SealError { return ObjectError(key: key, replica: replica.displayURL, problem: "\(s)") }
    return ObjectError(key: key, replica: replica.displayURL, problem: "is unreadable: \(e)")
}

/// Streams one stored object: checks its metadata, then (decrypting it when it is sealed)
/// decompresses its LZ4 frame and hands the payload to `payload` chunk by chunk. Returns the
/// metadata. Wraps every format failure in an ObjectError that names the object.
@discardableResult
package func streamObject(_ replica: Replica, key: String, expect kind: ObjectKind, encryption: EncryptionKey? = nil, allowUnencrypted: Bool = false,
                  onMetadata: (ObjectMetadata) throws -> Void = { _ in },
                  payload: (UnsafeRawBufferPointer) throws -> Void) throws -> ObjectMetadata {
    var head: [UInt8] = []
    var meta: ObjectMetadata?
    let lz = try LZ4FrameDecompressor(name: key)
    var opener: SealedStreamReader?
    func wrap(_ e: Error) -> Error { objectReadError(e, key: key, replica: replica) }
    do {
        try replica.get(key: key) { chunk in
            var rest = chunk
            if meta == nil {
                let need = ObjectMetadata.encodedSize - head.count
                head.append(contentsOf: UnsafeRawBufferPointer(rebasing: rest[0..<min(need, rest.count)]))
                rest = UnsafeRawBufferPointer(rebasing: rest[min(need, rest.count)...])
                if head.count < ObjectMetadata.encodedSize { return }
                let m = try ObjectMetadata.decode(head, objectName: key)
                guard m.kind == kind else {
                    throw ObjectError(key: key, replica: replica.displayURL, problem: "is a \(m.kind), expected a \(kind)")
                }
                if m.isEncrypted {
                    guard let k = encryption else {
                        throw EncryptionError.badKey("object '\(key)' in \(replica.displayURL) is encrypted (key id \(hex16(m.keyID))); give its key with --encryption-key-file")
                    }
                    guard k.id == m.keyID else {
                        throw EncryptionError.badKey("object '\(key)' in \(replica.displayURL) is encrypted with key id \(hex16(m.keyID)), but the key given has id \(k.idText): use the key the replica was written with")
                    }
                    opener = k.opener(metadata: head)
                } else if encryption != nil && !allowUnencrypted {
                    // With a key, a plaintext object could have been planted by whoever can
                    // write to the bucket (the header's checksum is not keyed).
                    throw EncryptionError.badKey("object '\(key)' in \(replica.displayURL) is not encrypted, but a key was given: refusing it in case it was planted; pass --allow-unencrypted to accept objects stored before encryption was turned on")
                }
                meta = m
                try onMetadata(m)
            }
            if rest.isEmpty { return }
            if let o = opener { try o.feed(rest) { plain in try lz.feed(plain, payload) } } else { try lz.feed(rest, payload) }
        }
        guard meta != nil else {
            throw ObjectError(key: key, replica: replica.displayURL, problem: "is truncated: \(head.count) bytes, shorter than its metadata header")
        }
        try opener?.finish()
        try lz.finish()
    } catch is StopStreaming {
    } catch {
        throw wrap(error)
    }
    return meta!
}
