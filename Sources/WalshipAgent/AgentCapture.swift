#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import Dispatch
import Logging
import WalshipFormat
import WalshipSQLite
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// The agent's capture: the write lock and the pin, room for application checkpoints, the
/// tailer's reads of the WAL, and the times that date commits.
extension Agent {
    // MARK: write lock and pin

    /// Runs `body` holding SQLite's write lock (BEGIN IMMEDIATE on the agent's own connection).
    /// Returns false without running it when the lock is busy and `patient` is false.
    @discardableResult
    func withWriteLock(patient: Bool = false, waitMs: Int32 = 0, _ body: () throws -> Void) throws -> Bool {
        // Re-entrant: a step that needs the lock may run inside one that holds it already.
        if holdingWriteLock { try body(); return true }
        let deadline = monotonicMicroseconds() + (patient ? 10_000_000 : 0)
        while true {
            writer.setBusyTimeout(milliseconds: patient ? 50 : waitMs)
            do {
                try writer.execute("BEGIN IMMEDIATE")
                break
            } catch let e as SQLiteError where e.isBusy {
                if !writer.isAutocommit { try? writer.execute("ROLLBACK") }
                guard patient else { return false }
                if monotonicMicroseconds() >= deadline { throw AgentError.writeLockUnavailable(dbPath) }
                // An application checkpoint may hold the lock while it waits for the pin.
                if !makingWay && blockingCheckpointRunning() {
                    makingWay = true
                    defer { makingWay = false }
                    try makeWayForCheckpoint()
                }
            }
        }
        holdingWriteLock = true
        defer { holdingWriteLock = false; try? writer.execute("ROLLBACK") }
        try body()
        return true
    }

    /// Replaces the pin with a read transaction at the current end of the WAL. Only call while
    /// holding the write lock, after reading the WAL to its end.
    func repin() throws {
        if !pin.isAutocommit { try pin.execute("COMMIT") }
        try beginReadTransaction(pin)
        lastRepinUs = monotonicMicroseconds()
    }

    /// Whether the saved generation's objects carry the id this agent must record.
    func sameDatabaseID(_ s: AgentState) -> Bool {
        guard let id = s.databaseID else { return false }
        return options.databaseID.map { $0 == id } ?? true
    }

    /// Why a start cannot continue the saved generation, in words for the log and alerts.
    func newGenerationReason(previous: AgentState?, inode ino: (dev: UInt64, ino: UInt64), pageSize: Int) -> String {
        guard let p = previous else { return "first run" }
        if (p.keyID ?? 0) != (options.encryptionKey?.id ?? 0) { return "the encryption key changed" }
        if p.databaseID == nil { return "objects now record the database's id (the spool was written by an older walship)" }
        if !sameDatabaseID(p) { return "the database id changed to \(DatabaseID.text(options.databaseID ?? 0)) (database-id)" }
        if p.dbDevice != ino.dev || p.dbInode != ino.ino { return "the database file was replaced" }
        if p.pageSize != pageSize { return "the page size changed" }
        return "continuity lost while the agent was stopped"
    }

    /// BEGIN, then a read, which is when SQLite takes the snapshot. If the read fails the
    /// transaction is ended, so that "not in autocommit" always means "holds a snapshot".
    func beginReadTransaction(_ c: SQLiteConnection) throws {
        try c.execute("BEGIN")
        do { _ = try c.query("SELECT count(*) FROM sqlite_master") } catch {
            try? c.execute("ROLLBACK")
            throw error
        }
    }

    /// Under the write lock, reads the WAL to its end and moves the pin there. False when the
    /// lock was busy (only when not `patient`).
    @discardableResult
    func movePinToEnd(patient: Bool = false, waitMs: Int32 = 0) throws -> Bool {
        var diverged: String?
        let moved = try withWriteLock(patient: patient, waitMs: waitMs) {
            try pollAndAppend()
            diverged = divergenceFromWalIndex()
            try repin()
        }
        if let why = diverged { try recoverFromDivergence(why) }
        return moved
    }

    /// Self-check, only under the write lock (when no commit can be under way): the tailer
    /// must stand exactly at SQLite's last commit as the wal-index records it. Returns what
    /// differs, or nil.
    func divergenceFromWalIndex() -> String? {
        guard let index = readWalIndex() else { return nil }
        guard let h = tailer.header else {
            return index.mxFrame == 0 ? nil : "the wal-index has \(index.mxFrame) committed frames but the tailer has no WAL header"
        }
        if index.describes(h) {
            return Int(index.mxFrame) == tailer.framesInLog ? nil
                : "the wal-index's last commit is frame \(index.mxFrame), the tailer's is \(tailer.framesInLog); \(tailer.describeFrameAfterCommit())"
        }
        // Other salts: a writer restarted the log but wrote no commit (it rolled back).
        return index.mxFrame == 0 ? nil : "the wal-index describes another log (salts differ) with \(index.mxFrame) committed frames"
    }

    /// What the tailer read and what SQLite committed differ: nothing read since the last
    /// proven point can be trusted, so a new generation starts from a snapshot (G2).
    func recoverFromDivergence(_ why: String) throws {
        logger.error("capture self-check failed: what the replicas hold differs from what SQLite committed; starting a new generation",
                     metadata: meta.merging(["reason": "\(why)"]) { a, _ in a })
        status.countError("capture-divergence")
        try startGenerationFromCurrentWAL(reason: "capture self-check failed: \(why)")
    }

    /// Reads the WAL afresh to its end without shipping it (its content goes into the new
    /// snapshot), pins there, and starts a new generation. A snapshot is built from the
    /// tailer's map of the WAL: if reading the log afresh still disagrees with SQLite's
    /// wal-index, that snapshot would be wrong, so the agent stops, loudly.
    func startGenerationFromCurrentWAL(reason: String) throws {
        try withWriteLock(patient: true) {
            tailer.adopt(try tailer.readHeader())
            try consumeWithoutShipping()
            if let still = divergenceFromWalIndex() { throw AgentError.unreadableWAL(dbPath, still) }
            try repin()
        }
        try cutSegment()
        try startGeneration(reason: reason, previous: state)
    }

    // MARK: application checkpoints

    /// How often, while nothing changes, the agent looks for an application checkpoint that
    /// waits for its pin.
    /// Every 20 ms while nothing changes (a few syscalls: cheap enough to keep idle CPU low);
    /// every 2 ms for a moment after one was seen, so that its second step follows quickly.
    ///
    /// A database without changes for two seconds is looked at once a second only: with many
    /// idle databases the 20 ms looks were most of the process's work. An application
    /// checkpoint on it that has frames to copy writes the database file first, and that
    /// write wakes the agent at once (ChangeHub); only one with nothing left to copy waits
    /// for the slower look, a second at most.
    var checkpointerCheckUs: Int64 {
        let now = clock.monotonicUs()
        if let last = lastCourtesy, now - last.atUs < 500_000 { return 2_000 }
        return now - lastChangeUs >= 2_000_000 ? 1_000_000 : 20_000
    }

    /// Another process holds both the WAL's writer lock and its checkpointer lock: a FULL,
    /// RESTART or TRUNCATE checkpoint is running (a writer holds only the first, a PASSIVE
    /// checkpoint only the second). It waits for readers behind the end of the log, and
    /// RESTART and TRUNCATE wait for every reader of the log: the agent's pin among them.
    func blockingCheckpointRunning() -> Bool {
        guard let f = shmFile else { return false }
        return byteLockedByAnotherProcess(f.fd, at: WalIndexHeader.writeLockByte)
            && byteLockedByAnotherProcess(f.fd, at: WalIndexHeader.checkpointLockByte)
    }

    /// Lets a waiting checkpoint finish within milliseconds: the pin moves to the end of the
    /// log (nothing can commit while the checkpoint holds the writer lock), and once the log
    /// is all copied back, a new pin reads the database file only, which holds back nothing.
    func makeWayForCheckpoint() throws {
        guard let index = readWalIndex() else { return }
        let now = clock.monotonicUs()
        // Once per state of the log: the first move puts the pin at the end, the second (when
        // everything is copied back) lets a RESTART or TRUNCATE go.
        let key = (index.salt1, index.mxFrame, index.nBackfill >= index.mxFrame)
        if let last = lastCourtesy, last.key == key, now - last.atUs < 50_000 { return }
        if try movePinWithoutLock() {
            lastCourtesy = (key, now)
            status.update { $0.checkpoints["application-waited", default: 0] += 1 }
            logger.debug("pin moved for an application checkpoint", metadata: ["wal.mxFrame": "\(index.mxFrame)", "wal.backfilled": "\(index.nBackfill)"])
        } else {
            logger.debug("could not move the pin for an application checkpoint yet", metadata: [
                "wal.mxFrame": "\(index.mxFrame)", "tailer.frames": "\(tailer.framesInLog)",
                "same.log": "\(tailer.header.map { index.describes($0) } ?? false)"])
        }
    }

    /// Moves the pin to the end of the WAL without the write lock. A pin is safe when, at the
    /// instant its read transaction starts, the agent has read every committed frame: then no
    /// frame it has not read can be copied back and overwritten by a restart while it holds
    /// the pin. The wal-index is read just before and just after the read transaction starts;
    /// any commit or restart in between changes its last frame or its salts.
    func movePinWithoutLock() throws -> Bool {
        try pollAndAppend()
        guard let before = readWalIndex(), let h = tailer.header, before.describes(h), Int(before.mxFrame) == tailer.framesInLog else {
            return false
        }
        // Make before break. A FULL, RESTART or TRUNCATE checkpoint waits, with its busy
        // handler's pauses (up to 100 ms), for an exclusive lock on each read-mark slot it
        // found behind the end of the log; the pin's slot is one of them. Ended first and
        // begun again, the pin would take the very same slot back (the first one free) within
        // microseconds, every time, and the checkpoint would wait out its whole timeout. Begun
        // on the spare connection while the old pin still holds its slot, the new pin takes
        // another slot, and the old one is then free for the checkpoint's next try.
        try beginReadTransaction(sparePin)
        lastRepinUs = monotonicMicroseconds()
        let after = readWalIndex()
        swap(&pin, &sparePin)
        // The old read transaction ends (a read-only one: nothing to lose either way).
        if !sparePin.isAutocommit {
            do { try sparePin.execute("COMMIT") } catch {
                try? sparePin.execute("ROLLBACK")
                if !sparePin.isAutocommit { throw error }
            }
        }
        guard let after, after.samePosition(as: before) else {
            // Something committed meanwhile, so the pin may stand past frames not read yet.
            // Those cannot be overwritten before a restart of this log, and a restart is
            // accepted as continuity only once they are read.
            if let after, after.describes(h) {
                restartGuard = after
            } else if let after, after.mxFrame == 0, blockingCheckpointRunning() {
                // A RESTART or TRUNCATE checkpoint restarted the log while holding the writer
                // lock throughout: nothing committed after `before`, which was read to its end.
                restartGuard = before
            } else {
                // The log restarted in between: whether it dropped unread frames cannot be told.
                restartGuard = WalIndexHeader(mxFrame: UInt32.max, salt1: h.salt1, salt2: h.salt2)
            }
            return false
        }
        return true
    }

    // MARK: tailing

    /// Reads the WAL and appends every new committed transaction to the open segment.
    func pollAndAppend() throws {
        while true {
            switch try tailer.poll() {
            case .headerChanged(let old, let new):
                // While the pin is held, SQLite can restart the log only when every frame has
                // been copied back, and the pin (always taken where the agent had read to)
                // stops any frame it has not read from being copied back. So a restart never
                // drops an unread frame: a new header with the same page size continues the chain.
                if let g = restartGuard, let o = old, g.salt1 == o.salt1, g.salt2 == o.salt2, tailer.framesInLog < Int(g.mxFrame) {
                    restartGuard = nil
                    logger.warning("the WAL restarted before every frame of the previous log was read; starting a new generation",
                                   metadata: meta.merging(["wal.frames.read": "\(tailer.framesInLog)", "wal.frames.committed": "\(g.mxFrame)"]) { a, _ in a })
                    try startGenerationFromCurrentWAL(reason: "WAL restarted before it was read to its end")
                    return
                }
                restartGuard = nil
                // The same salts in a rewritten header: a writer wrote the header of a log
                // that had nothing committed yet (a transaction that rolled back), and the
                // next one wrote it again with its own checkpoint counter. Nothing was read
                // under the old header, so nothing can be missed.
                let rewrittenEmpty = old.map { $0.pageSize == new.pageSize && tailer.framesInLog == 0 } ?? false
                if old == nil || old!.couldRestart(to: new) || rewrittenEmpty {
                    logger.debug("WAL restarted", metadata: ["wal.salt1": "\(new.salt1)", "wal.checkpoint_seq": "\(new.checkpointSequence)"])
                    tailer.adopt(new)
                    continue
                }
                let what = old!.pageSize != new.pageSize ? "the WAL changed page size (\(old!.pageSize) to \(new.pageSize))"
                    : "the WAL header was rewritten with the same salts after \(tailer.framesInLog) committed frames (checkpoint sequence \(old!.checkpointSequence) to \(new.checkpointSequence))"
                logger.warning("\(what); starting a new generation", metadata: meta)
                try startGenerationFromCurrentWAL(reason: "WAL continuity lost")
                return
            case .transactions(let txns):
                for t in txns { try append(t) }
                // A writer too fast for the high compression level: its segment is cut now (not
                // while the application waits for the write lock) and the next takes the fast level.
                if !holdingWriteLock, let s = segment, s.builder.level > 0, s.builder.payloadBytes > ObjectBuilder.compressedPayloadLimit,
                   Double(s.builder.payloadBytes) / max(Double(monotonicMicroseconds() - s.openedUs) / 1e6, 0.001) > Double(ObjectBuilder.compressedRateLimit) {
                    try cutSegment()
                    kickShippers()
                }
                if tailer.hasMore { continue }   // read in bounded slices
                if let h = tailer.header { visibility?.forget(readTo: tailer.framesInLog, salt1: h.salt1, salt2: h.salt2) }
                return
            }
        }
    }

    /// Reads the WAL to its end without shipping (its content goes into the next snapshot).
    func consumeWithoutShipping() throws {
        while true {
            switch try tailer.poll() {
            case .headerChanged(_, let new): tailer.adopt(new)
            case .transactions(let t): if t.isEmpty { return }
            }
        }
    }

    func append(_ t: CommittedTransaction) throws {
        let pageSize = t.header.pageSize
        let now = max(commitStamp(t), lastCommitTimeUs)
        if segment == nil {
            let b = try ObjectBuilder(path: spool.workDir + "/segment.part", key: options.encryptionKey,
                                      level: ObjectBuilder.segmentLevel(payloadBytesPerSecond: segmentPayloadRate))
            let e = try SegmentEncoder(pageSize: pageSize) { try b.write($0) }
            segment = OpenSegment(builder: b, encoder: e, firstTxid: lastTxid + 1, firstTimeUs: now)
        }
        let txid = lastTxid + 1
        let encoder = segment!.encoder
        try encoder.transaction(TransactionHeader(txid: txid, commitTimeUs: now, dbPages: t.commitSize, pageCount: UInt32(t.frames.count)))
        if pageBuffer.count != pageSize { pageBuffer = [UInt8](repeating: 0, count: pageSize) }
        var hashes: [(UInt32, UInt64)] = []
        hashes.reserveCapacity(t.frames.count)
        for (i, (pg, frame)) in t.frames.enumerated() {
            try checkRoomWhileWriting(pageSize)
            if let kept = t.pages?[i] {
                try kept.withUnsafeBytes { b in
                    hashes.append((pg, DatabaseChecksum.pageHash(b, pageNumber: pg)))
                    try encoder.page(pg, b)
                }
                continue
            }
            try pageBuffer.withUnsafeMutableBytes { try tailer.readPage(frameIndex: frame, into: $0) }
            try pageBuffer.withUnsafeBytes { b in
                hashes.append((pg, DatabaseChecksum.pageHash(b, pageNumber: pg)))
                try encoder.page(pg, b)
            }
        }
        var logical = dbPages
        dbChecksum ^= try updateTable(pages: hashes, commitSize: t.commitSize, logicalSize: &logical)
        dbPages = logical
        for (pg, _) in hashes { scrub.noteWritten(pg, pageSize: pageSize) }
        try encoder.commit(checksum: dbChecksum)
        lastTxid = txid
        lastCommitTimeUs = now
        segment!.count += 1
        segment!.pages += t.frames.count
    }

    /// The main loop checks the spool's room four times a second, but a fast writer can
    /// fill a small filesystem's headroom between two checks: every 64 KiB written into a
    /// segment, one statvfs, and when the disk runs short the spool is shed right away.
    func checkRoomWhileWriting(_ bytes: Int) throws {
        bytesSinceRoomCheck += bytes
        guard bytesSinceRoomCheck >= 64 << 10 else { return }
        bytesSinceRoomCheck = 0
        let room = SpoolRoom(of: spool.dir)
        // Under the write lock only when the disk is critically short: shedding lists and
        // stats the spool, which the application must not wait for otherwise.
        if room.critical || (room.short && !holdingWriteLock) { try shedSpool(room: room) }
    }

    /// Applies one transaction to the page-hash table and returns the XOR to apply to the
    /// whole-database checksum. Pages appear as the database grows (as zeros unless written)
    /// and disappear when it shrinks; the lock-byte page never counts.
    func updateTable(pages: [(UInt32, UInt64)], commitSize: UInt32, logicalSize: inout UInt32) throws -> UInt64 {
        let pageSize = state?.pageSize ?? 4096
        let lock = DatabaseChecksum.lockBytePage(pageSize: pageSize)
        var delta: UInt64 = 0
        let maxWritten = pages.map(\.0).max() ?? 0
        let top = max(commitSize, maxWritten)
        if top > logicalSize {
            let written = Set(pages.map(\.0))
            var pg = logicalSize + 1
            while pg <= top {
                if pg != lock && !written.contains(pg) {
                    let z = DatabaseChecksum.zeroPageHash(pageNumber: pg, pageSize: pageSize)
                    delta ^= z
                    table.set(pg, z)
                }
                pg += 1
            }
        }
        for (pg, h) in pages where pg != lock {
            if pg <= logicalSize { delta ^= try table.get(pg) }
            delta ^= h
            table.set(pg, h)
        }
        let present = max(logicalSize, top)
        if commitSize < present {
            var pg = commitSize + 1
            while pg <= present {
                if pg != lock { delta ^= try table.get(pg) }
                pg += 1
            }
        }
        logicalSize = commitSize
        return delta
    }

    // MARK: commit times

    /// Reads the wal-index header from the -shm file (nil while it is being written). The file
    /// is kept open for the agent's lifetime: closing a descriptor would drop SQLite's locks on it.
    func readWalIndex() -> WalIndexHeader? {
        shmFile.flatMap { Agent.readWalIndex($0) }
    }

    /// One look at a wal-index header; a positioned read, safe from any thread.
    static func readWalIndex(_ f: RawFile) -> WalIndexHeader? {
        var b = [UInt8](repeating: 0, count: WalIndexHeader.size)
        guard let n = try? b.withUnsafeMutableBytes({ try f.read(at: 0, into: $0) }), n == b.count else { return nil }
        return b.withUnsafeBytes { WalIndexHeader.parse($0) }
    }

    /// The commit time of a transaction: the first moment it was seen visible in the
    /// wal-index, else now. Always an upper bound of the real commit, and close to it even
    /// when the WAL is read in batches or the main loop was busy.
    func commitStamp(_ t: CommittedTransaction) -> Int64 {
        visibility?.firstSeen(salt1: t.header.salt1, salt2: t.header.salt2, commitFrame: t.commitFrame) ?? nowMicroseconds()
    }
}
