import Glibc
import WalshipFormat
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// The self-check after a checkpoint. Once a checkpoint has copied every committed frame of
/// the WAL into the database file, and while the agent's pin keeps any later frame out of it,
/// that file must hold exactly the state the replicas have at the agent's last txid. The
/// page-hash table records that state page by page, so comparing costs a read and a hash per
/// page, without the write lock.
///
/// Each comparison covers page 1 (it records the database size, so a missed transaction that
/// grew or shrank the database shows there), every page the agent captured since the last
/// comparison, and a rolling window over the rest of the file, so that in time every page is
/// compared, including pages a missed transaction wrote and nothing rewrote since.
struct DatabaseScrub {
    /// Pages captured since the last comparison. Past `dirtyLimitBytes` of pages only the
    /// rolling window runs: a comparison stays short, and the window covers the rest in time.
    private var dirty = Set<UInt32>()
    private var dirtyOverflow = false
    private var cursor: UInt32 = 1
    static let dirtyLimitBytes = 32 << 20
    /// Bytes of the rolling window read per comparison.
    static let windowBytes = 4 << 20

    mutating func noteWritten(_ pg: UInt32, pageSize: Int) {
        guard !dirtyOverflow else { return }
        dirty.insert(pg)
        if dirty.count > max(1024, Self.dirtyLimitBytes / max(pageSize, 512)) { dirty.removeAll(); dirtyOverflow = true }
    }

    /// After a snapshot rebuilt the table from the file itself: nothing is pending.
    mutating func forgetWritten() { dirty.removeAll(keepingCapacity: true); dirtyOverflow = false }

    struct Outcome {
        var mismatch: String?
        var pagesCompared = 0
        /// `shouldYield` asked to stop: the pages not compared wait for the next time.
        var interrupted = false
    }

    /// Compares the file with `expected` (the table) for the database of `pages` pages.
    /// A page past the file's end counts as zeros (SQLite extends a file that way).
    /// `shouldYield` is asked every 64 pages (an application checkpoint waiting for the pin
    /// must not wait for a comparison).
    mutating func compare(file: RawFile, pageSize: Int, pages: UInt32, shouldYield: () -> Bool,
                          expected: (UInt32) throws -> UInt64) throws -> Outcome {
        var out = Outcome()
        guard pages > 0, pageSize > 0 else { return out }
        let lock = DatabaseChecksum.lockBytePage(pageSize: pageSize)
        var todo = dirty.filter { $0 <= pages }
        todo.insert(1)
        dirty.removeAll(keepingCapacity: true)
        dirtyOverflow = false
        var window = max(16, Self.windowBytes / pageSize)
        if cursor > pages { cursor = 1 }
        while window > 0 && todo.count < Int(pages) {
            todo.insert(cursor)
            cursor = cursor >= pages ? 1 : cursor + 1
            window -= 1
        }
        var buf = [UInt8](repeating: 0, count: pageSize)
        let ordered = todo.sorted()
        for (i, pg) in ordered.enumerated() where pg != lock {
            if i % 64 == 63 && shouldYield() {
                for rest in ordered[i...] { noteWritten(rest, pageSize: pageSize) }
                out.interrupted = true
                return out
            }
            let offset = Int(pg - 1) * pageSize
            try buf.withUnsafeMutableBytes { b in
                let n = try file.read(at: offset, into: b)
                if n < pageSize { for i in n..<pageSize { b[i] = 0 } }
            }
            let h = buf.withUnsafeBytes { DatabaseChecksum.pageHash($0, pageNumber: pg) }
            out.pagesCompared += 1
            let want = try expected(pg)
            if h != want {
                out.mismatch = "after a complete checkpoint, page \(pg) of the database file differs from the replicated chain"
                    + " (file \(hex16(h)), chain \(hex16(want)))"
                return out
            }
        }
        return out
    }
}
