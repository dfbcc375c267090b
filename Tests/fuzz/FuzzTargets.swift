// libFuzzer entry point for every parser of untrusted bytes in WalshipFormat. Built by
// Tests/fuzz/run.sh together with that module's sources, with AddressSanitizer. The first
// byte of an input picks the parser; the rest is its input. A crash, trap or sanitizer
// report is a bug; errors are expected (bad input gets an error, never a crash).

/// A cipher for the sealed-stream framing: "opens" every chunk as it is, tag or not, so the
/// fuzzer reaches the framing and length arithmetic behind authentication.
struct PassThroughCipher: AuthenticatedCipher {
    func seal(nonce: [UInt8], aad: [UInt8], plain: UnsafeRawBufferPointer, into out: UnsafeMutableRawBufferPointer) throws -> [UInt8] {
        out.copyMemory(from: plain)
        return [UInt8](repeating: 0, count: Sealing.tagSize)
    }
    func open(nonce: [UInt8], aad: [UInt8], cipher: UnsafeRawBufferPointer, tag: [UInt8], into out: UnsafeMutableRawBufferPointer) throws -> Bool {
        out.copyMemory(from: cipher)
        return true
    }
}

/// Feeds `input` to `feed` in two pieces, split where its last byte says: parsers must not
/// depend on how a stream is cut.
func inTwoPieces(_ input: [UInt8], _ feed: (UnsafeRawBufferPointer) throws -> Void) rethrows {
    let cut = input.isEmpty ? 0 : Int(input[input.count - 1]) % (input.count + 1)
    try input.withUnsafeBytes { b in
        try feed(UnsafeRawBufferPointer(rebasing: b[0..<cut]))
        try feed(UnsafeRawBufferPointer(rebasing: b[cut...]))
    }
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzOne(_ data: UnsafePointer<UInt8>?, _ size: Int) -> Int32 {
    guard let data, size > 0 else { return 0 }
    let input = Array(UnsafeBufferPointer(start: data + 1, count: size - 1))
    let text = String(decoding: input, as: UTF8.self)
    switch data[0] % 8 {
    case 0:   // object container metadata
        if let m = try? ObjectMetadata.decode(input, objectName: "fuzz") {
            _ = m.mismatch(key: "generations/\(m.generation)/snapshots/\(hex16(m.lastTxid))-\(m.lastTimeUs / 1000).snap.lz4")
            _ = m.encoded()
        }
    case 1:   // segment decoding, and page deltas: encoding then applying gives the page back
        var d = SegmentDecoder(name: "fuzz")
        do { try inTwoPieces(input) { try d.feed($0) { _ in } }; try d.finish() } catch {}
        // Two 512-byte pages from the input: the second is the first with the input's later
        // bytes written over it at input-chosen places (edits, shifts and rewrites alike).
        var old = [UInt8](repeating: 0, count: 512)
        for (i, b) in input.prefix(512).enumerated() { old[i] = b }
        var new = old
        var at = 512
        while at + 3 <= input.count {
            let offset = Int(input[at]) * 2, shift = Int(input[at + 1] % 5) - 2, length = Int(input[at + 2] % 64)
            at += 3
            for k in 0..<length where offset + k < 512 && offset + k + shift >= 0 && offset + k + shift < 512 {
                new[offset + k] = old[offset + k + shift] ^ (at + k < input.count ? input[at + k] & 1 : 0)
            }
            at += length / 8
        }
        var delta: [UInt8] = []
        let encoded = old.withUnsafeBytes { o in new.withUnsafeBytes { n in PageDelta.encode(from: o, to: n, limit: 448, into: &delta) } }
        if encoded {
            var page = old
            do {
                try delta.withUnsafeBytes { dd in try old.withUnsafeBytes { o in try page.withUnsafeMutableBytes { try PageDelta.apply(dd, to: $0, previous: o, name: "fuzz") } } }
            } catch { fatalError("a delta walship encoded does not apply: \(error)") }
            if page != new { fatalError("a delta walship encoded gives another page back") }
        }
    case 2:   // sealed streams: metadata, then chunks
        let metaSize = ObjectMetadata.encodedSize
        guard input.count >= metaSize else { return 0 }
        let r = SealedStreamReader(masterKey: [UInt8](repeating: 7, count: 32), metadata: Array(input[0..<metaSize]),
                                   makeCipher: { _ in PassThroughCipher() })
        do { try inTwoPieces(Array(input[metaSize...])) { try r.feed($0) { _ in } }; try r.finish() } catch {}
    case 3:   // object names, one per line, and every plan made from such a listing
        var snaps: [String: [SnapshotName]] = [:], segs: [String: [SegmentName]] = [:]
        for line in text.split(separator: "\n") {
            _ = GenerationID.creationTimeUs(String(line))
            switch ObjectKey.parse(String(line)) {
            case .snapshot(let n)?: snaps[n.generation, default: []].append(n)
            case .segment(let n)?: segs[n.generation, default: []].append(n)
            default: break
            }
        }
        let gens = Set(snaps.keys).union(segs.keys).map { GenerationListing(id: $0, snapshots: snaps[$0] ?? [], segments: segs[$0] ?? []) }
        let n = UInt64(input.count)
        for target in [RestoreTarget.latest, .txid(n), .txid(n * 7919), .timeUs(Int64(n) * 1_000_000_007)] {
            _ = try? RestorePlanner.plan(gens, target: target)
        }
        _ = RetentionPlanner.plan(gens, cutoffMs: Int64(n) * 1_000_003, newestGeneration: gens.map(\.id).max())
        for g in gens {
            _ = CompactionPlanner.plan(g, levelsMs: [1_000, 60_000], nowMs: Int64(n) * 999_983, fineCutoffMs: Int64(n) * 500_000,
                                       settleMs: 2_000, afterTxid: g.snapshots.first?.txid ?? 0)
        }
    case 4:   // S3 XML answers
        _ = xmlValues(input, "Key")
        _ = xmlValue(input, "Code")
        _ = xmlUnescape(text)
    case 5:   // the config file's YAML
        _ = try? MiniYAML.parse(text)
    case 6:   // times, durations, sizes, compaction levels
        _ = try? Timestamp.parseMicroseconds(text)
        _ = try? DurationText.parseMicroseconds(text)
        _ = try? ByteSize.parse(text)
        _ = try? CompactionLevels.parse(text)
    default:  // WAL and wal-index headers, and a whole WAL
        input.withUnsafeBytes { b in
            _ = WalHeader.parse(b)
            _ = WalIndexHeader.parse(b)
        }
        _ = committedTransactions(ofWal: input, chunkSize: max(1, Int(input.first ?? 1)))
    }
    return 0
}
