#if canImport(Glibc)
import Glibc
#endif
import WalshipFormat

/// The database file a restore builds, mapped into memory once its snapshot is written. A page
/// write is then a copy, not a system call: replaying history that rewrites the same pages
/// many times costs what the copies cost.
///
/// The file is allocated (`posix_fallocate`) ahead of every range the mapping covers, after a
/// check that the filesystem has the room: running out of disk is an error from that call,
/// never a fault while copying, and a replica that claims an absurd size fails before it
/// fills the disk. Truncation zeroes the pages it removes (the file keeps its length until
/// `finish`), which is what a database that grows back over them would read.
final class RestoreOutput {
    let file: RawFile
    let pageSize: Int
    private var base: UnsafeMutableRawPointer?
    /// The file's length and the mapping's, in pages (all allocated).
    private var mappedPages = 0
    /// Pages at or above this hold zeros.
    private var highWater: Int

    /// `pages`: what the file holds now (the snapshot).
    init(file: RawFile, pageSize: Int, pages: Int) throws {
        self.file = file; self.pageSize = pageSize; self.highWater = pages
        try grow(toCover: pages)
    }

    deinit { unmap() }

    private func unmap() {
        if let b = base { munmap(b, mappedPages * pageSize); base = nil }
    }

    /// Extends the file and the mapping to at least `pages` pages, with headroom.
    private func grow(toCover pages: Int) throws {
        guard pages > mappedPages || base == nil else { return }
        let want = max(pages, mappedPages + mappedPages / 4, (64 << 20) / pageSize)
        let from = mappedPages * pageSize, to = want * pageSize
        if to > from {
            if let room = FS.space(of: file.path), Int64(to - from) > room.available {
                throw SystemError(errno: ENOSPC, context: "the restore needs \(to - from) more bytes for \(file.path); its filesystem has \(room.available)")
            }
            let rc = posix_fallocate(file.fd, off_t(from), off_t(to - from))
            if rc != 0 { throw SystemError(errno: rc, context: "allocate \(to) bytes for \(file.path)") }
        }
        unmap()
        let p = mmap(nil, to, PROT_READ | PROT_WRITE, MAP_SHARED, file.fd, 0)
        guard let p, p != MAP_FAILED else { throw SystemError.last("map \(to) bytes of \(file.path)") }
        base = p
        mappedPages = want
    }

    func write(page: UInt32, _ bytes: UnsafeRawBufferPointer) throws {
        precondition(bytes.count == pageSize)
        let index = Int(page) - 1
        if index >= mappedPages { try grow(toCover: index + 1) }
        base!.advanced(by: index * pageSize).copyMemory(from: bytes.baseAddress!, byteCount: pageSize)
        if index >= highWater { highWater = index + 1 }
    }

    /// Everything from page `pages + 1` on is gone: it reads as zeros from now on.
    func truncate(toPages pages: Int) {
        guard pages < highWater else { return }
        base!.advanced(by: pages * pageSize).initializeMemory(as: UInt8.self, repeating: 0, count: (highWater - pages) * pageSize)
        highWater = pages
    }

    /// Unmaps, and gives the file its final length.
    func finish(pages: Int) throws {
        unmap()
        try file.truncate(to: pages * pageSize)
    }
}
