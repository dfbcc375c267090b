// XXH64 (Yann Collet's xxHash, 64-bit variant), written from its published specification.
// walship uses it for the whole-database checksum: one hash per page, seeded with the page number.

public enum XXH64 {
    static let p1: UInt64 = 0x9E37_79B1_85EB_CA87
    static let p2: UInt64 = 0xC2B2_AE3D_27D4_EB4F
    static let p3: UInt64 = 0x1656_67B1_9E37_79F9
    static let p4: UInt64 = 0x85EB_CA77_C2B2_AE63
    static let p5: UInt64 = 0x27D4_EB2F_1656_67C5

    @inline(__always) static func rotl(_ x: UInt64, _ r: UInt64) -> UInt64 { (x << r) | (x >> (64 - r)) }
    @inline(__always) static func round(_ acc: UInt64, _ input: UInt64) -> UInt64 {
        rotl(acc &+ input &* p2, 31) &* p1
    }
    @inline(__always) static func merge(_ acc: UInt64, _ val: UInt64) -> UInt64 {
        (acc ^ round(0, val)) &* p1 &+ p4
    }

    public static func hash(_ data: UnsafeRawBufferPointer, seed: UInt64 = 0) -> UInt64 {
        let len = data.count
        var i = 0
        var h: UInt64
        @inline(__always) func load64(_ o: Int) -> UInt64 { UInt64(littleEndian: data.loadUnaligned(fromByteOffset: o, as: UInt64.self)) }
        @inline(__always) func load32(_ o: Int) -> UInt64 { UInt64(UInt32(littleEndian: data.loadUnaligned(fromByteOffset: o, as: UInt32.self))) }
        if len >= 32 {
            var v1 = seed &+ p1 &+ p2, v2 = seed &+ p2, v3 = seed, v4 = seed &- p1
            let limit = len - 32
            while i <= limit {
                v1 = round(v1, load64(i)); v2 = round(v2, load64(i + 8))
                v3 = round(v3, load64(i + 16)); v4 = round(v4, load64(i + 24))
                i += 32
            }
            h = rotl(v1, 1) &+ rotl(v2, 7) &+ rotl(v3, 12) &+ rotl(v4, 18)
            h = merge(h, v1); h = merge(h, v2); h = merge(h, v3); h = merge(h, v4)
        } else {
            h = seed &+ p5
        }
        h = h &+ UInt64(len)
        while i + 8 <= len {
            h ^= round(0, load64(i)); h = rotl(h, 27) &* p1 &+ p4; i += 8
        }
        if i + 4 <= len {
            h ^= load32(i) &* p1; h = rotl(h, 23) &* p2 &+ p3; i += 4
        }
        while i < len {
            h ^= UInt64(data[i]) &* p5; h = rotl(h, 11) &* p1; i += 1
        }
        h ^= h >> 33; h = h &* p2; h ^= h >> 29; h = h &* p3; h ^= h >> 32
        return h
    }

    public static func hash(_ bytes: [UInt8], seed: UInt64 = 0) -> UInt64 {
        bytes.withUnsafeBytes { hash($0, seed: seed) }
    }
}

/// The whole-database checksum: XOR over every page (except SQLite's lock-byte page) of
/// XXH64(page bytes, seed: page number). Order-independent, so it is maintained per
/// transaction from a page→hash table, and recomputed by restore with one pass over the file.
public enum DatabaseChecksum {
    public static func pageHash(_ page: UnsafeRawBufferPointer, pageNumber: UInt32) -> UInt64 {
        XXH64.hash(page, seed: UInt64(pageNumber))
    }

    /// The page SQLite never uses: the one holding byte offset 2^30 (1 GiB).
    public static func lockBytePage(pageSize: Int) -> UInt32 { UInt32((1 << 30) / pageSize + 1) }

    /// Hash of an all-zero page, what a page reads as when a file grows without writing it.
    public static func zeroPageHash(pageNumber: UInt32, pageSize: Int) -> UInt64 {
        let zeros = [UInt8](repeating: 0, count: pageSize)
        return zeros.withUnsafeBytes { pageHash($0, pageNumber: pageNumber) }
    }
}
