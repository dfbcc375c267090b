// Fixed-width integer reading and writing. Every multi-byte field in SQLite's WAL is
// big-endian; walship's own object metadata is little-endian (like LZ4's frame fields).

@inlinable func readBE32(_ p: UnsafeRawBufferPointer, _ offset: Int) -> UInt32 {
    UInt32(p[offset]) << 24 | UInt32(p[offset + 1]) << 16 | UInt32(p[offset + 2]) << 8 | UInt32(p[offset + 3])
}

@inlinable func readLE32(_ p: UnsafeRawBufferPointer, _ offset: Int) -> UInt32 {
    UInt32(p[offset]) | UInt32(p[offset + 1]) << 8 | UInt32(p[offset + 2]) << 16 | UInt32(p[offset + 3]) << 24
}

@inlinable func readLE64(_ p: UnsafeRawBufferPointer, _ offset: Int) -> UInt64 {
    UInt64(readLE32(p, offset)) | UInt64(readLE32(p, offset + 4)) << 32
}

public func bigEndian32(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> UInt32 { readBE32(bytes, offset) }
public func littleEndian32(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> UInt32 { readLE32(bytes, offset) }
public func littleEndian64(_ bytes: UnsafeRawBufferPointer, at offset: Int) -> UInt64 { readLE64(bytes, offset) }

/// An append-only little-endian byte writer used to build metadata and record headers.
public struct ByteWriter {
    public private(set) var bytes: [UInt8] = []
    public init(capacity: Int = 64) { bytes.reserveCapacity(capacity) }
    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { bytes.append(UInt8(v & 0xff)); bytes.append(UInt8(v >> 8)) }
    public mutating func u32(_ v: UInt32) { for i in 0..<4 { bytes.append(UInt8((v >> (8 * UInt32(i))) & 0xff)) } }
    public mutating func u64(_ v: UInt64) { for i in 0..<8 { bytes.append(UInt8((v >> (8 * UInt64(i))) & 0xff)) } }
    public mutating func i64(_ v: Int64) { u64(UInt64(bitPattern: v)) }
    public mutating func raw(_ v: [UInt8]) { bytes.append(contentsOf: v) }
    public mutating func pad(to count: Int) { while bytes.count < count { bytes.append(0) } }
}

/// A little-endian reader over a byte array, failing with a FormatError on overrun.
public struct ByteReader {
    let bytes: [UInt8]
    public private(set) var offset: Int = 0
    public init(_ bytes: [UInt8]) { self.bytes = bytes }
    public var remaining: Int { bytes.count - offset }
    mutating func need(_ n: Int, _ what: String) throws {
        if remaining < n { throw FormatError.truncated("\(what): needs \(n) bytes, \(remaining) left") }
    }
    public mutating func u8(_ what: String = "field") throws -> UInt8 { try need(1, what); defer { offset += 1 }; return bytes[offset] }
    public mutating func u16(_ what: String = "field") throws -> UInt16 {
        try need(2, what); defer { offset += 2 }
        return UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8
    }
    public mutating func u32(_ what: String = "field") throws -> UInt32 {
        try need(4, what); defer { offset += 4 }
        return bytes.withUnsafeBytes { readLE32($0, offset) }
    }
    public mutating func u64(_ what: String = "field") throws -> UInt64 {
        try need(8, what); defer { offset += 8 }
        return bytes.withUnsafeBytes { readLE64($0, offset) }
    }
    public mutating func i64(_ what: String = "field") throws -> Int64 { Int64(bitPattern: try u64(what)) }
    public mutating func raw(_ n: Int, _ what: String = "field") throws -> [UInt8] {
        try need(n, what); defer { offset += n }
        return Array(bytes[offset..<offset + n])
    }
}

/// Errors of the pure format layer: malformed, truncated or unsupported bytes.
public enum FormatError: Error, CustomStringConvertible, Equatable {
    case truncated(String)
    case corrupt(String)
    case unsupported(String)
    case invalidArgument(String)

    public var description: String {
        switch self {
        case .truncated(let s): return "truncated data: \(s)"
        case .corrupt(let s): return "corrupt data: \(s)"
        case .unsupported(let s): return "unsupported: \(s)"
        case .invalidArgument(let s): return s
        }
    }
}

public enum Base64 {
    static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)
    public static func encode(_ bytes: [UInt8]) -> String {
        var out: [UInt8] = []
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var i = 0
        while i < bytes.count {
            let b0 = UInt32(bytes[i]), b1 = i + 1 < bytes.count ? UInt32(bytes[i + 1]) : 0, b2 = i + 2 < bytes.count ? UInt32(bytes[i + 2]) : 0
            let v = b0 << 16 | b1 << 8 | b2
            out.append(alphabet[Int(v >> 18 & 63)]); out.append(alphabet[Int(v >> 12 & 63)])
            out.append(i + 1 < bytes.count ? alphabet[Int(v >> 6 & 63)] : UInt8(ascii: "="))
            out.append(i + 2 < bytes.count ? alphabet[Int(v & 63)] : UInt8(ascii: "="))
            i += 3
        }
        return String(decoding: out, as: UTF8.self)
    }
}

extension StringProtocol {
    /// Every `a` replaced by `b` (without Foundation).
    package func replacingAll(_ a: Character, with b: String) -> String {
        var out = ""
        for c in self { if c == a { out += b } else { out.append(c) } }
        return out
    }
}
