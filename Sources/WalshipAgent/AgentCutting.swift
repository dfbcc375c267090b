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

/// Segments cut from what was captured, the spool's state, generations and snapshots, and the
/// agent's own checkpoints.
extension Agent {
    // MARK: cutting and state

    /// Closes the open segment into the outbox, saves the state, and flushes the table.
    func cutSegment() throws {
        if let seg = segment {
            segment = nil
            try seg.encoder.finish(transactionCount: seg.count, lastTxid: lastTxid, dbChecksum: dbChecksum)
            // Over at least a sync interval: a light writer's lone commit just before a cut is
            // not a fast writer.
            let open = max(Double(monotonicMicroseconds() - seg.openedUs) / 1e6, Double(options.syncIntervalUs) / 1e6, 0.001)
            segmentPayloadRate = Double(seg.builder.payloadBytes) / open
            let name = SegmentName(generation: state.generation, level: 0, firstTxid: seg.firstTxid, lastTxid: lastTxid,
                                   firstTimeMs: seg.firstTimeUs / 1000, lastTimeMs: lastCommitTimeUs / 1000)
            try seg.builder.finish(ObjectMetadata(kind: .segment, pageSize: state.pageSize, firstTxid: seg.firstTxid, lastTxid: lastTxid,
                                                  firstTimeUs: seg.firstTimeUs, lastTimeUs: lastCommitTimeUs, dbPages: dbPages,
                                                  transactionCount: seg.count, dbChecksum: dbChecksum, payloadBytes: 0,
                                                  generation: state.generation, databaseID: state.databaseID ?? 0))
            let queued = try spool.enqueue(file: seg.builder.path, key: name.key, sequence: state.nextSequence)
            state.nextSequence += 1
            status.update { $0.lastCutUnix = Double(nowMicroseconds()) / 1e6 }
            logger.debug("cut segment", metadata: ["segment.key": "\(name.key)", "segment.transactions": "\(seg.count)"])
            try saveState()
            // Only once the state vouches for it: a crash before would cut it again, differently.
            if let e = localCompactor?.remember(outboxPath: queued, key: name.key), !linkFailureLogged {
                linkFailureLogged = true
                logger.warning("level-1 compaction in the spool needs hard links; segments stay at level 0 until the last level merges them",
                               metadata: meta.merging(["error": "\(e)"]) { a, _ in a })
            }
            return
        }
        try saveState()
    }

    /// Merges the level-0 segments of closed compaction windows (all of them with `force`)
    /// into level-1 objects, each followed in the outbox by the deletion of what it replaces.
    /// Only between segments: the state it saves must not run ahead of what is in the outbox.
    func compactLocally(force: Bool) throws {
        guard let lc = localCompactor, segment == nil else { return }
        let built: [LocalCompactor.Built]
        do {
            built = try lc.build(nowUs: nowMicroseconds(), force: force, generation: state.generation)
        } catch {
            // Compaction is an optimisation: on any trouble the segments simply stay at level 0.
            logger.error("merging segments in the spool failed; they stay as they are", metadata: ["error": "\(error)"])
            status.countError("compaction")
            lc.discard(except: "")
            return
        }
        guard !built.isEmpty else { return }
        for b in built {
            try spool.enqueue(file: b.path, key: b.name.key, sequence: state.nextSequence)
            state.nextSequence += 1
            let list = spool.workDir + "/deletions.part"
            try FS.writeAtomically(list, Array(b.replaces.joined(separator: "\n").utf8))
            try spool.enqueue(file: list, key: Spool.deletionPrefix + b.name.key, sequence: state.nextSequence)
            state.nextSequence += 1
            logger.debug("compacted segments", metadata: ["segment.key": "\(b.name.key)", "inputs": "\(b.replaces.count)"])
        }
        try saveState()
        // The links go only once the state vouches for what replaces them.
        for b in built { lc.forget(keys: b.replaces) }
        let merged = built.reduce(0) { $0 + $1.replaces.count }
        status.update { r in for i in r.replicas.indices { r.replicas[i].compactedObjects += UInt64(merged) } }
        kickShippers()
    }

    func saveState() throws {
        state.lastTxid = lastTxid
        state.dbChecksum = dbChecksum
        state.dbPages = dbPages
        state.lastCommitTimeUs = lastCommitTimeUs
        state.wal = tailer.position
        try spool.saveState(state)
        persistedTableTxid = state.tableTxid
        shippableSequence = state.nextSequence
        if table.hasPending { try table.flush() }
        state.tableTxid = lastTxid
    }

    func kickShippers() {
        for s in shippers { s.kick(limit: shippableSequence) }
    }

    /// Deletes outbox objects every replica has, once the table no longer needs them.
    func collectOutbox() throws {
        guard let minAck = shippers.map(\.acked).min() else { return }
        for e in try spool.outboxEntries() where e.sequence <= minAck {
            if let s = ObjectKey.parse(e.key)?.segment, s.generation == state.generation, s.lastTxid > persistedTableTxid {
                continue
            }
            try FS.remove(e.path)
        }
    }

    /// Keeps the spool under its limit: a replica that keeps failing loses its backlog and
    /// gets a new generation when it answers again. Replicas that keep up are not affected.
    func enforceSpoolLimit() throws {
        let room = SpoolRoom(of: spool.dir)
        for s in shippers where s.droppedGeneration != nil {
            s.probe()
            if s.reachableAgain && s.droppedGeneration == state.generation {
                // The new generation starts with a snapshot: wait until one can fit.
                let need = Int64(dbPages) * Int64(state.pageSize)
                if room.available < need {
                    if !waitingForSnapshotRoom {
                        waitingForSnapshotRoom = true
                        logger.warning("replica answers again, but the spool has no room for the snapshot its new generation needs; waiting",
                                       metadata: ["replica.url": "\(s.replica.displayURL)", "spool.free": "\(room.available)", "snapshot.bytes": "\(need)"])
                    }
                    continue
                }
                waitingForSnapshotRoom = false
                let why = s.dropReason ?? "it answers again after its backlog was dropped"
                logger.notice("a replica needs a new base; starting a new generation",
                              metadata: ["replica.url": "\(s.replica.displayURL)", "reason": "\(why)"])
                try movePinToEnd(patient: true)
                try cutSegment()
                try startGeneration(reason: "replica \(s.replica.displayURL): \(why)", previous: state)
                return
            }
        }
        // Warned once per episode: the episode ends only when half the headroom again is free.
        if room.short && !lowDiskWarned || room.ample && lowDiskWarned {
            lowDiskWarned = room.short
            if room.short {
                logger.warning("the spool's filesystem is nearly full: the spool is held to what fits",
                               metadata: ["spool.dir": "\(spool.dir)", "spool.free": "\(room.available)", "spool.headroom": "\(room.headroom)"])
                status.countError("spool-disk-full")
            }
        }
        try shedSpool(room: room)
    }

    /// Brings the spool back under its bound: compaction links first, then the backlog of a
    /// replica that keeps failing. Safe between any two writes of a segment.
    func shedSpool(room: SpoolRoom) throws {
        var held = spool.heldBytes
        let limit = room.limit(held: held, configured: options.spoolLimitBytes)
        guard held > limit.bytes else { return }
        // Compaction is an optimisation: its links go first (those that alone hold a segment).
        dropCompactionLinks(held: held, limit: limit.bytes)
        held = spool.heldBytes
        guard held > limit.bytes else { return }
        let last = shippableSequence - 1
        // Over --spool-limit, or with half the headroom gone, a failing replica's backlog goes
        // now; otherwise only after it has failed for a while (not for one transient error).
        let urgent = !limit.diskBound || room.critical
        let wallNow = nowMicroseconds()   // failingSinceUs is wall-clock time
        var dropped = false
        for s in shippers where s.acked < last && s.lastError != nil && s.droppedGeneration == nil {
            if !urgent, let since = s.failingSinceUs, wallNow - since < 10_000_000 { continue }
            logger.error("spool over its limit while a replica is failing: dropping that replica's backlog; it gets a new generation when it returns",
                         metadata: ["replica.url": "\(s.replica.displayURL)", "spool.bytes": "\(held)",
                                    "spool.limit": "\(limit.bytes)", "spool.limited.by": "\(limit.diskBound ? "free disk space" : "--spool-limit")"])
            s.dropBacklog(through: last, generation: state.generation)
            dropped = true
        }
        try collectOutbox()
        // The segments that just left the outbox may still be held by their links.
        if dropped { dropCompactionLinks(held: held, limit: limit.bytes) }
    }

    /// Removes the compaction links that alone hold a segment (logged at most every 10 minutes).
    func dropCompactionLinks(held: Int64, limit: Int64) {
        guard let lc = localCompactor, lc.discardSoleLinks() > 0 else { return }
        let now = monotonicMicroseconds()
        if now - lastCompactionDropLogUs >= 600_000_000 || lastCompactionDropLogUs == 0 {
            lastCompactionDropLogUs = now
            logger.warning("spool over its limit: segments waiting for level-1 compaction stay at level 0 instead",
                           metadata: ["spool.bytes": "\(held)", "spool.limit": "\(limit)"])
        }
    }

    // MARK: generations and snapshots

    /// Whether an error reaching a replica is one that waiting may cure (the replica is down
    /// or unreachable), rather than one the operator must fix.
    static func isOutage(_ error: Error) -> Bool {
        switch error {
        case let e as ReplicaOutageTelling: return e.isOutage
        case ReplicaError.io: return true
        case let e as SystemError: return [EIO, ESTALE, ENOTCONN, ETIMEDOUT, EHOSTDOWN, EHOSTUNREACH, ENETUNREACH].contains(e.errno)
        default: return false
        }
    }

    /// A random nonzero id for a database replicated for the first time.
    static func newDatabaseID() -> UInt64 {
        var id: UInt64 = 0
        while id == 0 { id = UInt64.random(in: 1...UInt64.max) }
        return id
    }

    func startGeneration(reason: String, previous: AgentState?) throws {
        let ino = try dbFile.inode()
        let filePageSize = try databasePageSize()
        let pageSize = tailer.header?.pageSize ?? filePageSize
        // Txids never name two states: continue after the last txid this agent or any replica
        // knows (a new host has no spool, but its replicas remember). A new generation's id
        // sorts after every generation known, even when the wall clock went back since.
        var known = previous.map { max($0.lastTxid, lastTxid) }
        var newestUs = previous.flatMap { GenerationID.creationTimeUs($0.generation) } ?? 0
        // With a saved state, its generation is the newest this database wrote; without one
        // (a first run, a lost spool), the replicas are asked.
        for r in replicas where previous == nil {
            let gens: [GenerationListing]
            do { gens = try listGenerations(r) } catch {
                logger.warning("could not list a replica's generations before starting a new one; its id and txids follow what else is known",
                               metadata: meta.merging(["replica.url": "\(r.displayURL)", "error": "\(error)"]) { a, _ in a })
                continue
            }
            if let last = gens.compactMap(\.lastTxid).max() {
                // Names may claim txids up to 2^62; a generation needs room above them.
                if last >= 1 << 61 { throw AgentError.txidsExhausted(r.displayURL, last) }
                known = max(known ?? 0, last)
            }
            // Ids claiming a time beyond 2^62 µs (a planted name) are not followed: one past
            // them would leave the range of an id.
            for g in gens { if let t = GenerationID.creationTimeUs(g.id), t < 1 << 62 { newestUs = max(newestUs, t) } }
        }
        let gen = GenerationID.make(timeUs: max(nowMicroseconds(), newestUs + 1), random: UInt16.random(in: 0...UInt16.max))
        let baseTxid = known.map { $0 + 1 } ?? 0
        var nextSeq = previous?.nextSequence ?? 1
        for e in try spool.outboxEntries() { nextSeq = max(nextSeq, e.sequence + 1) }
        for s in shippers { nextSeq = max(nextSeq, s.acked + 1) }
        state = AgentState(dbPath: dbPath, dbDevice: ino.dev, dbInode: ino.ino, generation: gen, pageSize: pageSize,
                           lastTxid: baseTxid, lastCommitTimeUs: lastCommitTimeUs, dbPages: 0, dbChecksum: 0,
                           tableTxid: baseTxid, wal: tailer.position, nextSequence: nextSeq,
                           lastSnapshotTimeUs: 0, lastSnapshotTxid: 0, keyID: options.encryptionKey?.id,
                           databaseID: options.databaseID ?? previous?.databaseID ?? Self.newDatabaseID())
        lastTxid = baseTxid
        logger.notice("starting a new generation", metadata: meta.merging(["generation": "\(gen)", "reason": "\(reason)"]) { a, _ in a })
        status.update { $0.newGenerations += 1; $0.generation = gen }
        localCompactor?.discard(except: gen)
        if reason != "first run" {
            alerter?.event("new generation \(gen) started: \(reason); a snapshot follows, and restores before it use the previous generation")
        }
        var info: [String: String] = [
            "generation": gen, "created": Timestamp.format(microseconds: nowMicroseconds()),
            "page_size": "\(pageSize)", "reason": reason, "format_version": "\(ObjectMetadata.formatVersion)",
            "base_txid": "\(baseTxid)", "database_id": DatabaseID.text(state.databaseID ?? 0),
        ]
        if let k = options.encryptionKey {
            // Encrypted replicas reveal nothing about the host or the database's path.
            info["encryption"] = "AES-256-GCM"
            info["encryption_key_id"] = k.idText
        } else {
            info["database"] = dbPath
            info["host"] = hostName()
        }
        let json = try JSONEncoder().encode(info)
        let path = spool.workDir + "/generation.json"
        try FS.writeAtomically(path, Array(json))
        try spool.enqueue(file: path, key: "generations/\(gen)/generation.json", sequence: state.nextSequence)
        state.nextSequence += 1
        try writeSnapshot(rebuildTable: true)
        try saveState()
        kickShippers()
    }

    /// Streams the database as of the tailer's position (pinned) into a snapshot object.
    /// No write lock is held. With `rebuildTable` the page-hash table and checksum are rebuilt
    /// from it (new generation); otherwise its checksum must equal the running one.
    func writeSnapshot(rebuildTable: Bool) throws {
        let pageSize = state.pageSize
        let pages = tailer.lastCommitSize > 0 ? tailer.lastCommitSize : try databaseFilePages(pageSize: pageSize)
        let now = max(nowMicroseconds(), lastCommitTimeUs)
        let builder = try ObjectBuilder(path: spool.workDir + "/snapshot.part", key: options.encryptionKey)
        let lock = DatabaseChecksum.lockBytePage(pageSize: pageSize)
        var sum: UInt64 = 0
        var buf = [UInt8](repeating: 0, count: pageSize)
        let frames = tailer.pageFrames
        let hashFile = spool.workDir + "/pagehash.new"
        let newTable = rebuildTable ? try RawFile(path: hashFile, flags: O_RDWR | O_CREAT | O_TRUNC, mode: 0o600) : nil
        var hashBatch: [UInt8] = []
        var hashOffset = 0
        let start = monotonicMicroseconds()
        do {
            for pg in stride(from: UInt32(1), through: pages, by: 1) {
                try buf.withUnsafeMutableBytes { b in
                    if let f = frames[pg], try tailer.readPageIfStillValid(frameIndex: f, into: b) { return }
                    let n = try dbFile.read(at: Int(pg - 1) * pageSize, into: b)
                    if n < pageSize { for i in n..<pageSize { b[i] = 0 } }
                }
                let h = buf.withUnsafeBytes { DatabaseChecksum.pageHash($0, pageNumber: pg) }
                if pg != lock { sum ^= h }
                try builder.write(buf)
                if newTable != nil {
                    var v = h.littleEndian
                    withUnsafeBytes(of: &v) { hashBatch.append(contentsOf: $0) }
                    if hashBatch.count >= 1 << 16 {
                        try hashBatch.withUnsafeBytes { try newTable!.write(at: hashOffset, $0) }
                        hashOffset += hashBatch.count; hashBatch.removeAll(keepingCapacity: true)
                    }
                }
            }
            if let t = newTable, !hashBatch.isEmpty { try hashBatch.withUnsafeBytes { try t.write(at: hashOffset, $0) } }
            let snap = SnapshotName(generation: state.generation, txid: lastTxid, timeMs: now / 1000)
            try builder.finish(ObjectMetadata(kind: .snapshot, pageSize: pageSize, firstTxid: lastTxid, lastTxid: lastTxid,
                                              firstTimeUs: now, lastTimeUs: now, dbPages: pages, transactionCount: 0,
                                              dbChecksum: sum, payloadBytes: 0, generation: state.generation,
                                              databaseID: state.databaseID ?? 0))
            if rebuildTable {
                table.discardPending()
                try FS.rename(hashFile, spool.tablePath)
                table = try PageHashTable(path: spool.tablePath)
                scrub.forgetWritten()
                dbChecksum = sum
                dbPages = pages
            } else if sum != dbChecksum || pages != dbPages {
                logger.error("snapshot checksum differs from the running checksum; starting a new generation to be safe",
                             metadata: ["snapshot.checksum": "\(hex16(sum))", "running.checksum": "\(hex16(dbChecksum))"])
                builder.abandon()
                try startGeneration(reason: "checksum self-check failed", previous: state)
                return
            }
            try spool.enqueue(file: builder.path, key: snap.key, sequence: state.nextSequence)
            state.nextSequence += 1
            state.lastSnapshotTimeUs = clock.wallUs()
            state.lastSnapshotTxid = lastTxid
            logger.info("snapshot written", metadata: ["snapshot.key": "\(snap.key)", "snapshot.pages": "\(pages)",
                                                       "snapshot.ms": "\((monotonicMicroseconds() - start) / 1000)"])
        } catch {
            builder.abandon()
            try? FS.remove(hashFile)
            if let e = error as? SystemError, e.errno == ENOSPC || e.errno == EDQUOT { throw SnapshotNoRoom(cause: e) }
            throw error
        }
    }

    /// A snapshot within the current generation: pin at the end, cut, stream.
    public func snapshotNow() throws {
        try movePinToEnd(patient: true)
        try cutSegment()
        try compactLocally(force: true)   // compacted objects never span a snapshot
        try writeSnapshot(rebuildTable: false)
        try saveState()
        kickShippers()
    }

    // MARK: checkpoints

    /// The checkpoint cycle (docs/ARCHITECTURE.md): (a) move the pin to the end under the write lock; (b) PASSIVE
    /// checkpoint with no lock; (c) under the write lock, release the pin, PASSIVE checkpoint
    /// the few new frames, pin again. The next writer then restarts the WAL, which the tailer
    /// follows as continuity. Skipped whenever the write lock is busy.
    func checkpointCycle() throws {
        let start = monotonicMicroseconds()
        let generationAtStart = state.generation
        // Step (b) runs without the write lock, so it must never be a checkpoint that races a
        // WAL restart (SQLite before 3.51.3 can then record a wrong backfill count). A writer
        // restarts the log only when every frame was copied back and no reader holds a read
        // mark past frame 0. So (b) runs only when frames remain to copy: the pin, taken at
        // the end under the write lock, then holds a read mark that forbids any restart
        // until (c), which runs under the write lock.
        var fullyCopied = false
        var diverged: String?
        let locked = try withWriteLock(waitMs: 20) {
            try pollAndAppend()
            diverged = divergenceFromWalIndex()
            try repin()
            // Read after the new pin started: under the write lock nBackfill can only grow, so
            // a count short of mxFrame now proves the pin holds a read mark (no restart).
            if let index = readWalIndex(), index.nBackfill >= index.mxFrame { fullyCopied = true }
        }
        if let why = diverged { try recoverFromDivergence(why); return }
        guard locked else {
            logger.debug("checkpoint skipped: write lock busy", metadata: meta)
            status.update { $0.checkpoints["skipped", default: 0] += 1 }
            return
        }
        if fullyCopied {   // nothing to copy: the next writer restarts the log
            try compareDatabaseWithChain()
            return
        }
        let bulk = try checkpointer.checkpoint(.passive)
        var final: (busy: Bool, log: Int32, checkpointed: Int32)?
        try withWriteLock(waitMs: 20) {
            try pollAndAppend()
            // Never copy back a commit the tailer has not read: after the next restart it
            // would be gone from the WAL without having been shipped.
            diverged = divergenceFromWalIndex()
            if diverged != nil { return }
            try pin.execute("COMMIT")
            defer { try? repin() }
            final = try checkpointer.checkpoint(.passive)
        }
        if let why = diverged { try recoverFromDivergence(why); return }
        if let f = final, !f.busy, f.checkpointed == f.log, !pin.isAutocommit {
            // The pin is back and nothing new was read: the file now holds the last txid's state.
            try compareDatabaseWithChain()
            if state.generation != generationAtStart { return }
        }
        if pin.isAutocommit { _ = try movePinToEnd(patient: true) }
        let seconds = Double(monotonicMicroseconds() - start) / 1e6
        let result = final.map { !$0.busy && $0.checkpointed == $0.log ? "complete" : "partial" } ?? "partial"
        status.update {
            $0.checkpoints[result, default: 0] += 1
            $0.checkpointSecondsTotal += seconds
            $0.lastCheckpointSeconds = seconds
        }
        logger.debug("checkpoint", metadata: ["checkpoint.frames": "\(bulk.log)", "checkpoint.copied": "\(bulk.checkpointed)",
                                              "checkpoint.final": "\(final.map { "\($0.checkpointed)/\($0.log)" } ?? "skipped")",
                                              "checkpoint.ms": "\((monotonicMicroseconds() - start) / 1000)"])
    }

    /// The self-check after a complete checkpoint (DatabaseScrub): only while the pin holds
    /// and before anything new is read from the WAL, so that the file, the table and the last
    /// txid describe one state.
    func compareDatabaseWithChain() throws {
        // Nothing new since the last comparison: the file has not changed through SQLite
        // either, so only the rolling window has something to find; once a minute.
        let t0 = monotonicMicroseconds()
        if lastTxid == lastComparedTxid && state.generation == lastComparedGeneration && t0 - lastComparedUs < 60_000_000 { return }
        let outcome = try scrub.compare(file: dbFile, pageSize: state.pageSize, pages: dbPages,
                                        shouldYield: { [unowned self] in blockingCheckpointRunning() }) { try table.get($0) }
        logger.debug("database compared with the chain", metadata: ["compare.pages": "\(outcome.pagesCompared)",
                                                                   "compare.interrupted": "\(outcome.interrupted)",
                                                                   "compare.ms": "\((monotonicMicroseconds() - t0) / 1000)"])
        if let why = outcome.mismatch { try recoverFromDivergence(why); return }
        if !outcome.interrupted { (lastComparedTxid, lastComparedGeneration, lastComparedUs) = (lastTxid, state.generation, t0) }
    }
}
