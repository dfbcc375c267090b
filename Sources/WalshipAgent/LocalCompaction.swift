#if canImport(Glibc)
import Glibc
#endif
import WalshipFormat
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// Builds level-1 segments in the spool, from hard links to the level-0 segments the agent
/// cut, so that compaction costs each replica one PUT and one batch DELETE per window, and no
/// GET. Links live in `compact/` under their replica key (slashes as "~").
final class LocalCompactor {
    struct Built {
        var path: String
        var name: SegmentName
        var replaces: [String]
    }

    let dir: String
    let workDir: String
    let windowUs: Int64
    let settleUs: Int64
    let key: EncryptionKey?

    init(dir: String, workDir: String, windowUs: Int64, settleUs: Int64, key: EncryptionKey?) {
        self.dir = dir; self.workDir = workDir; self.windowUs = windowUs; self.settleUs = settleUs; self.key = key
    }

    /// Keeps a level-0 segment just put in the outbox for the next merge. Returns the error
    /// when the link cannot be made (the segment then simply stays at level 0).
    func remember(outboxPath: String, key: String) -> SystemError? {
        let target = dir + "/" + key.replacingAll("/", with: "~")
        if link(outboxPath, target) != 0 && errno != EEXIST { return SystemError.last("link \(target)") }
        return nil
    }

    private func entries() -> [(file: String, name: SegmentName)] {
        ((try? FS.list(dir)) ?? []).compactMap { f in
            guard let n = ObjectKey.parse(f.replacingAll("~", with: "/"))?.segment(atLevel: 0) else { return nil }
            return (f, n)
        }.sorted { $0.name.firstTxid < $1.name.firstTxid }
    }

    /// Gives up merging the segments whose link is their only copy (they left the outbox):
    /// removing those frees disk, the others would free nothing. They stay at level 0.
    /// Returns how many links went.
    func discardSoleLinks() -> Int {
        var n = 0
        for e in entries() {
            var st = stat()
            if stat(dir + "/" + e.file, &st) == 0, st.st_nlink == 1, (try? FS.remove(dir + "/" + e.file)) != nil { n += 1 }
        }
        return n
    }

    /// Drops links of other generations (they can no longer be merged with anything).
    func discard(except generation: String) {
        for e in entries() where e.name.generation != generation { try? FS.remove(dir + "/" + e.file) }
    }

    func forget(_ names: [SegmentName]) { forget(keys: names.map(\.key)) }
    func forget(keys: [String]) {
        for k in keys { try? FS.remove(dir + "/" + k.replacingAll("/", with: "~")) }
    }

    /// Drops links to segments past `txid` (cut after the last saved state: they will be cut
    /// again, with other bounds).
    func dropBeyond(txid: UInt64, generation: String) {
        for e in entries() where e.name.generation == generation && e.name.lastTxid > txid { try? FS.remove(dir + "/" + e.file) }
    }

    /// Merges the runs of consecutive segments whose window has closed (all of them with
    /// `force`, before a snapshot: merges never cross one). Single segments are just let go.
    func build(nowUs: Int64, force: Bool, generation: String) throws -> [Built] {
        var out: [Built] = []
        let all = entries().filter { $0.name.generation == generation }
        var group: [SegmentName] = []
        var reached: UInt64 = 0
        func close() throws {
            defer { group = [] }
            guard group.count >= 2 else { forget(group); return }
            if let b = try merge(group) { out.append(b) }
        }
        for e in all {
            // Never two merged objects over one txid: an overlapping link is left out.
            if e.name.firstTxid <= reached && (reached > 0 || !group.isEmpty) { forget([e.name]); continue }
            reached = max(reached, e.name.lastTxid)
            let w = e.name.firstTimeMs * 1000 / windowUs
            let closed = force || (w + 1) * windowUs + settleUs <= nowUs
            if let last = group.last, last.firstTimeMs * 1000 / windowUs != w || e.name.firstTxid != last.lastTxid + 1 {
                try close()
            }
            if !closed { break }   // later windows are not closed either
            group.append(e.name)
        }
        try close()
        return out
    }

    /// nil when the spool's filesystem has no room for the merged copy now.
    private func merge(_ inputs: [SegmentName]) throws -> Built? {
        // The merged copy takes about as much room as its inputs: on a filesystem short of
        // that (beyond the headroom kept free) the merge waits, and the segments ship at
        // level 0 meanwhile, rather than fill a disk the application may share.
        let need = inputs.reduce(Int64(0)) { $0 + Int64(FS.fileSize(dir + "/" + $1.key.replacingAll("/", with: "~")) ?? 0) }
        let room = SpoolRoom(of: workDir)
        guard room.available - room.headroom >= need else { return nil }
        let path = workDir + "/level1-\(hex16(inputs[0].firstTxid)).part"
        let builder = try ObjectBuilder(path: path, key: key, level: ObjectBuilder.mergeLevel(inputBytes: need, spanMs: inputs.last!.lastTimeMs - inputs[0].firstTimeMs))
        let name = SegmentName(generation: inputs[0].generation, level: 1, firstTxid: inputs[0].firstTxid, lastTxid: inputs.last!.lastTxid,
                               firstTimeMs: inputs[0].firstTimeMs, lastTimeMs: inputs.last!.lastTimeMs)
        do {
            // The links are named by their keys with "/" as "~", flat in the links directory.
            try SegmentMerger.merge(inputs, from: FileReplica(root: dir), storedKey: { $0.key.replacingAll("/", with: "~") },
                                    into: builder, output: name, squash: false, encryption: key)
            return Built(path: path, name: name, replaces: inputs.map(\.key))
        } catch {
            builder.abandon()
            throw error
        }
    }
}
