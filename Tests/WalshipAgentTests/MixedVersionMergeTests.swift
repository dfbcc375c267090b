import XCTest
@testable import WalshipAgent
import WalshipFormat
#if canImport(Glibc)
import Glibc
#endif
@testable import WalshipConfig
@testable import WalshipRestore
@testable import WalshipStorage
@testable import WalshipSystem

/// Compaction of a generation an upgraded agent continued: version-1 segments followed by
/// version-2 ones, merged into one version-2 object that holds every transaction as it was.
final class MixedVersionMergeTests: XCTestCase {
    let gen = "000661a9e1ac7a663fb0"
    let pageSize = 512

    func page(_ txid: UInt64, _ pg: UInt32) -> [UInt8] {
        // Mostly the same bytes in every version, as a b-tree page changes: deltas are small.
        var b = [UInt8](repeating: UInt8(pg), count: pageSize)
        b[Int(txid) % pageSize] = UInt8(truncatingIfNeeded: txid)
        b[pageSize - 1] = UInt8(truncatingIfNeeded: txid &* 7)
        return b
    }

    func pages(_ txid: UInt64) -> [UInt32] { [1, UInt32(2 + txid % 3)] }

    /// Writes txids first...last as one segment object of `version` under `root`.
    func writeSegment(root: String, first: UInt64, last: UInt64, version: Int) throws -> SegmentName {
        let name = SegmentName(generation: gen, level: 0, firstTxid: first, lastTxid: last,
                               firstTimeMs: Int64(first) * 10, lastTimeMs: Int64(last) * 10)
        let path = root + "/" + name.key
        try FS.makeDirectories(FS.dirname(path), mode: 0o700)
        let b = try ObjectBuilder(path: path, level: ObjectBuilder.segmentLevel)
        let encoder = version == 2 ? try SegmentEncoder(pageSize: pageSize) { try b.write($0) } : nil
        if version == 1 { try b.write(SegmentCodec.headerVersion1(pageSize: pageSize)) }
        for txid in first...last {
            let t = TransactionHeader(txid: txid, commitTimeUs: Int64(txid) * 10_000, dbPages: 4, pageCount: 2)
            if let e = encoder { try e.transaction(t) } else { try b.write(SegmentCodec.transactionHeader(t)) }
            for pg in pages(txid) {
                let bytes = page(txid, pg)
                if let e = encoder { try bytes.withUnsafeBytes { try e.page(pg, $0) } } else {
                    try b.write(SegmentCodec.pageRecordPrefixVersion1(pg)); try b.write(bytes)
                }
            }
            if let e = encoder { try e.commit(checksum: txid) } else { try b.write(SegmentCodec.transactionChecksum(txid)) }
        }
        let count = UInt32(last - first + 1)
        if let e = encoder { try e.finish(transactionCount: count, lastTxid: last, dbChecksum: last) } else {
            try b.write(SegmentCodec.trailer(transactionCount: count, lastTxid: last, dbChecksum: last))
        }
        var meta = ObjectMetadata(kind: .segment, pageSize: pageSize, firstTxid: first, lastTxid: last,
                                  firstTimeUs: Int64(first) * 10_000, lastTimeUs: Int64(last) * 10_000, dbPages: 4,
                                  transactionCount: count, dbChecksum: last, payloadBytes: 0, generation: gen)
        if version == 1 { meta.version = 1 }
        try b.finish(meta)
        return name
    }

    func testVersion1AndVersion2SegmentsMergeIntoOneVersion2Object() throws {
        let root = try FS.makePrivateDirectory(beside: NSTemporaryDirectory() + "/walship-merge-test")
        defer { FS.removeTree(root) }
        let inputs = [try writeSegment(root: root, first: 1, last: 10, version: 1),
                      try writeSegment(root: root, first: 11, last: 20, version: 2),
                      try writeSegment(root: root, first: 21, last: 30, version: 1)]
        let output = SegmentName(generation: gen, level: 1, firstTxid: 1, lastTxid: 30, firstTimeMs: 10, lastTimeMs: 300)
        let outPath = root + "/merged.part"
        let builder = try ObjectBuilder(path: outPath, level: ObjectBuilder.segmentLevel)
        let replica = FileReplica(root: root)
        try SegmentMerger.merge(inputs, from: replica, into: builder, output: output, squash: false, encryption: nil)

        var decoder = SegmentDecoder(name: "merged")
        var seen: [(UInt64, UInt32, [UInt8])] = []
        var txid: UInt64 = 0
        let meta = try streamObject(FileReplica(root: root), key: "merged.part", expect: .segment) { chunk in
            try decoder.feed(chunk) { ev in
                switch ev {
                case .transaction(let t): txid = t.txid
                case .page(let pg, let b): seen.append((txid, pg, Array(b)))
                default: break
                }
            }
        }
        try decoder.finish()
        XCTAssertEqual(decoder.payloadVersion, 2)
        XCTAssertEqual(meta.version, ObjectMetadata.formatVersion)
        XCTAssertEqual(meta.firstTxid, 1); XCTAssertEqual(meta.lastTxid, 30)
        let expected = (UInt64(1)...30).flatMap { t in pages(t).map { (t, $0, page(t, $0)) } }
        XCTAssertEqual(seen.count, expected.count)
        for (a, b) in zip(seen, expected) { XCTAssertTrue(a.0 == b.0 && a.1 == b.1 && a.2 == b.2, "txid \(b.0) page \(b.1)") }
        // Every version after a page's first is a delta in the merged object: its payload is
        // a fraction of the 60 whole pages (30 KiB) its transactions wrote; 4 pages are whole.
        XCTAssertLessThan(meta.payloadBytes, UInt64(60 * pageSize / 4))
    }
}
