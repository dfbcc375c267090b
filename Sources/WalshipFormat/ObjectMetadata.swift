// Metadata carried in front of every stored object, inside an LZ4 skippable frame so that
// `lz4 -d` ignores it and still yields the payload (a SQLite file for a snapshot).

public enum ObjectKind: UInt8, Codable, Sendable {
    case snapshot = 1
    case segment = 2
}

public struct ObjectMetadata: Equatable, Sendable {
    /// The version written. Version 1 objects differ only in their segment payloads; both are read.
    public static let formatVersion: UInt16 = 2
    public static let readableVersions: ClosedRange<UInt16> = 1...2
    /// Skippable-frame magic 0x184D2A57 (the LZ4 spec reserves 0x184D2A50...0x184D2A5F).
    public static let skippableMagic: UInt32 = 0x184D_2A57
    public static let bodySize = 128
    /// Bytes the metadata occupies at the start of an object: magic, size, body.
    public static let encodedSize = 8 + bodySize
    static let marker: [UInt8] = Array("WALSHIP\0".utf8)

    public var version: UInt16 = ObjectMetadata.formatVersion
    public var kind: ObjectKind
    public var flags: UInt8 = 0
    public var pageSize: Int
    public var firstTxid: UInt64
    public var lastTxid: UInt64
    public var firstTimeUs: Int64
    public var lastTimeUs: Int64
    public var dbPages: UInt32
    public var transactionCount: UInt32
    public var dbChecksum: UInt64
    public var payloadBytes: UInt64
    public var generation: String
    /// Sealing.keyID of the key that encrypted the object; 0 when it is not encrypted.
    public var keyID: UInt64 = 0
    /// The database the object was taken from: a random nonzero id the agent keeps for it
    /// (`DatabaseID`). 0 in objects written before it was recorded.
    public var databaseID: UInt64 = 0

    public static let flagEncrypted: UInt8 = 1
    public var isEncrypted: Bool { flags & ObjectMetadata.flagEncrypted != 0 }

    public init(kind: ObjectKind, pageSize: Int, firstTxid: UInt64, lastTxid: UInt64, firstTimeUs: Int64,
                lastTimeUs: Int64, dbPages: UInt32, transactionCount: UInt32, dbChecksum: UInt64,
                payloadBytes: UInt64, generation: String, flags: UInt8 = 0, databaseID: UInt64 = 0) {
        self.kind = kind; self.pageSize = pageSize; self.firstTxid = firstTxid; self.lastTxid = lastTxid
        self.firstTimeUs = firstTimeUs; self.lastTimeUs = lastTimeUs; self.dbPages = dbPages
        self.transactionCount = transactionCount; self.dbChecksum = dbChecksum
        self.payloadBytes = payloadBytes; self.generation = generation; self.flags = flags
        self.databaseID = databaseID
    }

    public func encoded() -> [UInt8] {
        var w = ByteWriter(capacity: ObjectMetadata.encodedSize)
        w.u32(ObjectMetadata.skippableMagic)
        w.u32(UInt32(ObjectMetadata.bodySize))
        w.raw(ObjectMetadata.marker)
        w.u16(version); w.u8(kind.rawValue); w.u8(flags)
        w.u32(UInt32(pageSize))
        w.u64(firstTxid); w.u64(lastTxid)
        w.i64(firstTimeUs); w.i64(lastTimeUs)
        w.u32(dbPages); w.u32(transactionCount)
        w.u64(dbChecksum); w.u64(payloadBytes)
        var gen = Array(generation.utf8.prefix(32))
        while gen.count < 32 { gen.append(0) }
        w.raw(gen)
        w.u64(keyID)
        w.u64(databaseID)
        let sum = w.bytes.withUnsafeBytes { XXH64.hash(UnsafeRawBufferPointer(rebasing: $0[8..<128])) }
        w.u64(sum)
        return w.bytes
    }

    /// Decodes the first `encodedSize` bytes of an object.
    public static func decode(_ bytes: [UInt8], objectName: String = "object") throws -> ObjectMetadata {
        guard bytes.count >= encodedSize else {
            throw FormatError.truncated("\(objectName) is \(bytes.count) bytes, shorter than its \(encodedSize)-byte metadata header")
        }
        var r = ByteReader(Array(bytes[0..<encodedSize]))
        let magic = try r.u32(), size = try r.u32()
        guard magic == skippableMagic, size == UInt32(bodySize) else {
            throw FormatError.corrupt("\(objectName) does not start with walship metadata (not a walship object, or encrypted with a key you did not give)")
        }
        let sum = bytes.withUnsafeBytes { XXH64.hash(UnsafeRawBufferPointer(rebasing: $0[8..<128])) }
        guard sum == bytes.withUnsafeBytes({ readLE64($0, 128) }) else {
            throw FormatError.corrupt("\(objectName): metadata checksum mismatch")
        }
        guard try r.raw(8) == marker else { throw FormatError.corrupt("\(objectName): bad metadata marker") }
        let version = try r.u16()
        guard readableVersions.contains(version) else {
            throw FormatError.unsupported("\(objectName) has format version \(version); this walship reads versions \(readableVersions.lowerBound)-\(readableVersions.upperBound): upgrade walship")
        }
        guard let kind = ObjectKind(rawValue: try r.u8()) else { throw FormatError.corrupt("\(objectName): unknown object kind") }
        let flags = try r.u8()
        let pageSize = Int(try r.u32())
        let firstTxid = try r.u64(), lastTxid = try r.u64()
        let firstTime = try r.i64(), lastTime = try r.i64()
        let dbPages = try r.u32(), count = try r.u32()
        let checksum = try r.u64(), payload = try r.u64()
        let genBytes = try r.raw(32).prefix { $0 != 0 }
        let keyID = try r.u64()
        let databaseID = try r.u64()
        // Checked before anything does arithmetic with them (an object may have been planted).
        func bad(_ why: String) -> FormatError { .corrupt("\(objectName): metadata \(why)") }
        guard (512...65536).contains(pageSize), pageSize & (pageSize - 1) == 0 else {
            throw bad("page size \(pageSize) is not a power of two from 512 to 65536")
        }
        // SQLite's largest page count; a size in bytes then fits any arithmetic done with it.
        guard dbPages <= 0xFFFF_FFFE else { throw bad("page count \(dbPages) is beyond what SQLite allows") }
        guard firstTxid <= lastTxid, lastTxid < UInt64(Int64.max) else {
            throw bad("txid range \(firstTxid)-\(lastTxid) is not a valid range")
        }
        guard firstTime <= lastTime else { throw bad("time range \(firstTime)-\(lastTime) runs backwards") }
        if kind == .snapshot && (firstTxid != lastTxid || count != 0) {
            throw bad("describes a snapshot over txids \(firstTxid)-\(lastTxid) with \(count) transactions")
        }
        var m = ObjectMetadata(kind: kind, pageSize: pageSize, firstTxid: firstTxid, lastTxid: lastTxid,
                              firstTimeUs: firstTime, lastTimeUs: lastTime, dbPages: dbPages,
                              transactionCount: count, dbChecksum: checksum, payloadBytes: payload,
                              generation: String(decoding: genBytes, as: UTF8.self), flags: flags)
        m.version = version
        m.keyID = keyID
        m.databaseID = databaseID
        return m
    }
}
