#if canImport(Glibc)
import Glibc
#endif
import WalshipFormat
import CLinux
import WalshipStorage
import WalshipSystem

/// The database file a restore builds, past its snapshot: pages written, truncations, and the
/// final length.
///
/// Mapped (the `walship restore` command, on ext4, XFS or tmpfs): the file is mapped into
/// memory and a page write is a copy, not a system call, so replaying history that rewrites
/// the same pages many times costs what the copies cost. Every range the mapping covers is
/// allocated first (`posix_fallocate`, after checking the room), and those filesystems
/// overwrite allocated blocks in place, so running out of disk is an error from that call,
/// never a fault while copying. A disk that fails a read while a page is brought in would
/// still end the process (SIGBUS): that is why the agent's own drills, which run inside the
/// agent, and filesystems that copy on write (btrfs, ZFS) use plain writes instead.
///
/// Written: one `pwrite` per page, as before mapping existed.
final class RestoreOutput {
    let file: RawFile
    let pageSize: Int
    private var base: UnsafeMutableRawPointer?
    /// Pages mapped; the file's length is at least this (all allocated).
    private var mappedPages = 0
    /// The file's length in bytes.
    private var fileBytes: Int
    /// Pages at or above this hold zeros (or are past the end of the file).
    private var highWater: Int
    let mapped: Bool

    /// Filesystems that allocate with `posix_fallocate` natively and overwrite in place.
    static func mappable(_ file: RawFile) -> Bool {
        let ext4 = 0xEF53, xfs = 0x5846_5342, tmpfs = 0x0102_1994
        return [ext4, xfs, tmpfs].contains(walship_filesystem_type(file.fd))
    }

    /// `pages`: what the file holds now (the snapshot).
    init(file: RawFile, pageSize: Int, pages: Int, map: Bool) throws {
        self.file = file; self.pageSize = pageSize; self.highWater = pages
        self.fileBytes = pages * pageSize
        self.mapped = map && RestoreOutput.mappable(file)
        if mapped && pages > 0 { try remap(pages) }
    }

    deinit { unmap() }

    private func unmap() {
        if let b = base { munmap(b, mappedPages * pageSize); base = nil }
    }

    /// Grows the file (allocated) and the mapping to `pages`, or to `atLeast` when the
    /// filesystem lacks the room for the headroom.
    private func remap(_ wanted: Int, atLeast: Int? = nil) throws {
        var pages = wanted
        if let room = FS.space(of: file.path), let least = atLeast, Int64(pages * pageSize - fileBytes) > room.available {
            pages = least
        }
        let to = pages * pageSize
        if to > fileBytes {
            if let room = FS.space(of: file.path), Int64(to - fileBytes) > room.available {
                throw RestoreError.noRoom("the restored database needs \(to - fileBytes) more bytes in \(FS.dirname(file.path)), which has \(room.available) free")
            }
            let rc = posix_fallocate(file.fd, off_t(fileBytes), off_t(to - fileBytes))
            if rc != 0 { throw SystemError(errno: rc, context: "allocate \(to) bytes for \(file.path)") }
            fileBytes = to
        }
        unmap()
        let p = mmap(nil, to, PROT_READ | PROT_WRITE, MAP_SHARED, file.fd, 0)
        guard let p, p != MAP_FAILED else { throw SystemError.last("map \(to) bytes of \(file.path)") }
        base = p
        mappedPages = pages
    }

    func write(page: UInt32, _ bytes: UnsafeRawBufferPointer) throws {
        precondition(bytes.count == pageSize)
        let index = Int(page) - 1
        if mapped {
            if index >= mappedPages {
                // Headroom: a quarter more, at most 64 MiB, so growth remaps rarely.
                try remap(index + 1 + min((index + 1) / 4, (64 << 20) / pageSize), atLeast: index + 1)
            }
            base!.advanced(by: index * pageSize).copyMemory(from: bytes.baseAddress!, byteCount: pageSize)
        } else {
            try file.write(at: index * pageSize, bytes)
            fileBytes = max(fileBytes, (index + 1) * pageSize)
        }
        if index >= highWater { highWater = index + 1 }
    }

    /// Everything from page `pages + 1` on is gone: it reads as zeros from now on.
    func truncate(toPages pages: Int) throws {
        guard pages < highWater else { return }
        if !mapped {
            try file.truncate(to: pages * pageSize)
            fileBytes = pages * pageSize
        } else {
            let from = pages * pageSize, count = (highWater - pages) * pageSize
            // Large ranges are zeroed by the filesystem, keeping their blocks allocated.
            if count < (1 << 20) || walship_zero_range(file.fd, Int64(from), Int64(count)) != 0 {
                base!.advanced(by: from).initializeMemory(as: UInt8.self, repeating: 0, count: count)
            }
        }
        highWater = pages
    }

    /// Unmaps, and gives the file its final length.
    func finish(pages: Int) throws {
        unmap()
        try file.truncate(to: pages * pageSize)
        fileBytes = pages * pageSize
    }
}
