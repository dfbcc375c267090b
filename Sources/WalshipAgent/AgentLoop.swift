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

/// The agent's loop, as turns (`beginRun`, `turn`, `endRun`) that a `WorkerPool` or a thread
/// of its own runs, its shutdown, and what wakes it.
extension Agent {
    // MARK: main loop

    /// Runs until SIGTERM/SIGINT (or `stop()`), then ships what is committed and returns.
    /// On a thread of its own: the same turns that `Supervisor` runs on its `WorkerPool`.
    public func run() throws {
        if options.oneShotSnapshot {
            try runOnce()
            return
        }
        var next = try beginRun()
        while true {
            let left = next.atUs - clock.monotonicUs()
            var changed = false
            if next.wakeOnChange { changed = wakeup.wait(timeoutUs: left) } else { wakeup.sleep(timeoutUs: left) }
            guard let n = try turn(changed: changed) else { break }
            next = n
        }
        try endRun()
    }

    /// The one-off run of `walship snapshot`: a snapshot when the newest is not current, the
    /// open segment cut, everything shipped.
    func runOnce() throws {
        try setUpWakeups()
        if state.lastSnapshotTxid != lastTxid || segment != nil {
            try snapshotNow()
            oneShotTookSnapshot = true
        }
        // A replica found without the base of the generation (emptied, or left out of a
        // run) drops it and needs a new one: the one-off run gives it one, as the loop would.
        try cutSegment()
        kickShippers()
        let deadline = monotonicMicroseconds() + 30_000_000
        for s in shippers { _ = s.waitUntilShipped(limit: shippableSequence, deadlineUs: deadline) }
        if let s = shippers.first(where: { $0.droppedGeneration == state.generation && $0.reachableAgain }) {
            try movePinToEnd(patient: true)
            try cutSegment()
            try startGeneration(reason: "replica \(s.replica.displayURL): \(s.dropReason ?? "its backlog was dropped")", previous: state)
            startedGeneration = true
        }
        var pending = try shutdown()
        for s in shippers where s.droppedGeneration != nil {
            pending.append("\(s.replica.displayURL): its copy of generation \(s.droppedGeneration!) lacks the base; `walship replicate` (or this command again) starts a new generation for it")
        }
        if !pending.isEmpty { throw AgentError.notShipped(pending) }
    }

    /// The wake-up that ends this agent's waits: a `WorkerPool` parks the agent on it.
    package var wakeupForScheduling: Wakeup { wakeup }

    // The loop's state between turns.

    /// After `start()`: watches the files, and says when the first turn is due.
    public func beginRun() throws -> WorkerPool.Next {
        try setUpWakeups()
        let now = clock.monotonicUs()
        nextCutUs = now + options.syncIntervalUs
        lastSnapshotCheckUs = now
        lastWatchdogUs = now
        logger.info("replicating", metadata: meta.merging(["replicas": "\(replicas.map(\.displayURL).joined(separator: ", "))",
                                                           "sqlite.version": "\(SQLiteConnection.libraryVersion)",
                                                           "sync.interval": "\(DurationText.format(microseconds: options.syncIntervalUs))"]) { a, _ in a })
        return nextWait()
    }

    /// When the next turn is due, from now: the cut, the watchdog, the look for an application
    /// checkpoint; or a change, whichever comes first.
    func nextWait() -> WorkerPool.Next {
        let now = clock.monotonicUs()
        // Idle: nothing to cut and no change for two seconds. An idle database is looked
        // at once a second, and its cut times pass without a wake-up (they stay on the
        // same grid): a commit wakes it through ChangeHub. Without inotify it polls as before.
        let idle = watching && !wakeup.unwatched && segment == nil && now - lastChangeUs >= 2_000_000
        if idle && nextCutUs <= now {
            let every = max(1, options.syncIntervalUs)
            nextCutUs += ((now - nextCutUs) / every + 1) * every
        }
        var timeout = min(watchdogUs(idle: idle) - (now - lastWatchdogUs), checkpointerCheckUs)
        if !idle { timeout = min(timeout, nextCutUs - now) }
        idleBeforeWait = idle
        // While the agent waits, a change wakes it at once and it samples commit times
        // itself; everywhere else the visibility log's thread samples for it.
        visibility?.setBusy(false)
        // An idle database's look around may come up to 50 ms late: on a pool, the idle
        // databases' looks then share wake-ups instead of one each.
        return WorkerPool.Next(atUs: now + max(0, timeout), wakeOnChange: true, toleranceUs: idle ? Self.idleToleranceUs : 0)
    }

    static let idleToleranceUs: Int64 = 50_000

    func watchdogUs(idle: Bool) -> Int64 { idle ? max(options.pollIntervalUs, 1_000_000) : options.pollIntervalUs }

    /// One pass of the loop, after a wait: `changed` says whether a change ended it. Returns
    /// when the next is due, or nil when the loop ends (a stop, or a replaced database): then
    /// `endRun()`.
    public func turn(changed: Bool) throws -> WorkerPool.Next? {
        let idle: Bool
        if let until = debounceUntilUs {
            // Letting a burst of commits land, then reading them in one pass: far fewer WAL
            // reads. Meanwhile the wal-index is sampled every few milliseconds, so each commit
            // is still stamped with when it became visible. Never past the next cut.
            let now = clock.monotonicUs()
            if !stopRequested && now < until {
                visibility?.sample()
                if blockingCheckpointRunning() { try makeWayForCheckpoint() }
                let step = max(500, min(checkpointerCheckUs, sampleEveryUs, until - now))
                return WorkerPool.Next(atUs: min(until, clock.monotonicUs() + step), wakeOnChange: false)
            }
            visibility?.sample()
            if blockingCheckpointRunning() { try makeWayForCheckpoint() }
            debounceUntilUs = nil
            idle = false
        } else {
            if stopRequested { return nil }
            if changed { lastChangeUs = clock.monotonicUs() }
            if !changed {
                // Nothing new: the moment to notice an application checkpoint waiting for the pin.
                if blockingCheckpointRunning() { try makeWayForCheckpoint() }
                let t = clock.monotonicUs()
                if (idleBeforeWait || t < nextCutUs) && t - lastWatchdogUs < watchdogUs(idle: idleBeforeWait) { return nextWait() }
            }
            idle = idleBeforeWait && !changed
            // An idle pass that only looks around (no change, no upkeep due) is short, and a
            // commit made meanwhile wakes the next wait at once, which samples it: the
            // sampling thread stays asleep, one thread switch less per idle database and second.
            if !idle || clock.monotonicUs() - lastUpkeepUs >= 5_000_000 {
                visibility?.setBusy(true)   // (an idle look above leaves the sampling thread asleep)
            }
            lastWatchdogUs = clock.monotonicUs()
            if changed && debounceUs > 0 {
                let now = clock.monotonicUs()
                let until = min(now + debounceUs, nextCutUs)
                visibility?.sample()
                if now < until {
                    debounceUntilUs = until
                    let step = max(500, min(checkpointerCheckUs, sampleEveryUs, until - now))
                    return WorkerPool.Next(atUs: min(until, now + step), wakeOnChange: false)
                }
            }
        }
        if stopRequested { return nil }
        try pollAndAppend()
        if blockingCheckpointRunning() { try makeWayForCheckpoint() }
        let t = clock.monotonicUs()
        if t >= nextCutUs {
            if segment != nil {
                try cutSegment()
                try compactLocally(force: false)
                kickShippers()
                try collectOutbox()
                // Keep the pin recent so application checkpoints are not held back long.
                try movePinToEnd()
            }
            // A fixed rate: the time spent cutting does not stretch the interval.
            nextCutUs += options.syncIntervalUs
            if nextCutUs <= t { nextCutUs = t + options.syncIntervalUs }
        }
        if tailer.framesInLog >= options.checkpointFrames && t - lastCheckpointTryUs >= 1_000_000 {
            lastCheckpointTryUs = t
            visibility?.setBusy(true)   // (an idle pass may have left it asleep)
            try checkpointCycle()
        }
        if t - lastSnapshotCheckUs >= (idle ? 1_000_000 : 250_000) {
            lastSnapshotCheckUs = t
            let requested = FS.exists(spool.snapshotRequestPath)
            // A scheduled snapshot of an unchanged database would only duplicate the last one.
            let changed = state.lastSnapshotTxid != lastTxid || segment != nil
            if requested || (changed && clock.wallUs() - state.lastSnapshotTimeUs >= options.snapshotIntervalUs
                             && t >= snapshotRetryAtUs) {
                let generationBefore = state.generation
                visibility?.setBusy(true)   // (an idle pass may have left it asleep)
                do {
                    try snapshotNow()
                    if requested { try? FS.remove(spool.snapshotRequestPath) }
                } catch let e as SnapshotNoRoom where state.generation == generationBefore {
                    // The generation has its base already: a later snapshot only shortens
                    // restores, so a disk too full for one must not stop replication.
                    snapshotRetryAtUs = clock.monotonicUs() + 600_000_000
                    logger.error("snapshot failed: no room for it in the spool; replication goes on, next try in 10 minutes",
                                 metadata: meta.merging(["error": "\(e)"]) { a, _ in a })
                    status.countError("snapshot")
                    if requested { try? FS.rename(spool.snapshotRequestPath, spool.snapshotRequestFailedPath) }
                }
            }
            if databaseWasReplaced() { restartRequested = true; return nil }
            // A tailer stuck behind what SQLite committed cuts nothing, so the self-check
            // at the cut would never run: when the wal-index runs ahead of the tailer
            // (read without locks, a hint), check it under the write lock now.
            // Only when it made no progress for a whole tick: under load the index is often
            // a commit or two ahead for a moment.
            if let index = readWalIndex(), let h = tailer.header, index.describes(h), Int(index.mxFrame) > tailer.framesInLog {
                if stuckAt == tailer.framesInLog { try movePinToEnd() }
                stuckAt = tailer.framesInLog
            } else {
                stuckAt = nil
            }
            // The spool's upkeep and the status: on every tick while busy, every 5 s when
            // idle (each costs directory listings, and idle databases may be thousands).
            if !idle || t - lastUpkeepUs >= 5_000_000 {
                lastUpkeepUs = t
                try enforceSpoolLimit()
                if segment == nil && persistedTableTxid < state.tableTxid {
                    try saveState()   // records the flushed table, so the last segment can leave the spool
                }
                try compactLocally(force: false)   // windows that closed while idle
                try collectOutbox()
                try operationsTick()
            }
        }
        return nextWait()
    }

    /// After the last turn: ships what is committed and stops; throws `AgentRestart` when the
    /// database was replaced.
    public func endRun(deadlineUs: Int64? = nil) throws {
        try shutdown(deadlineUs: deadlineUs)
        if restartRequested { throw AgentRestart() }
    }

    // MARK: waking up

    func setUpWakeups() throws {
        // Only this database's own files wake it: the database (replaced, or written by a
        // checkpoint) and its WAL. Other databases and the spool in the same directory do not.
        let name = FS.basename(dbPath)
        watching = ChangeHub.shared.subscribe(wakeup, directory: FS.dirname(dbPath), names: [name, name + "-wal"])
        if !watching { logger.warning("inotify unavailable; polling instead", metadata: meta) }
        // A commit made after start() read the log and before the watch existed raised no
        // event: the first wait returns at once, and the agent is busy for its first seconds.
        lastChangeUs = clock.monotonicUs()
        wakeup.notifyChange()
    }

    /// Pause after a wake-up before reading the WAL: --read-delay, at most a tenth of the sync interval.
    var debounceUs: Int64 { min(options.readDelayUs, options.syncIntervalUs / 10) }

    /// How long shutdown waits for the replicas to acknowledge what is committed.
    static let shutdownWaitUs: Int64 = 30_000_000

    /// Ships what is committed and stops; returns the replicas that still lack something
    /// (kept in the spool for the next start). `deadlineUs`: when to stop waiting for the
    /// replicas (default: 30 s from now); a restore drill under way gets 30 s more.
    @discardableResult
    func shutdown(deadlineUs: Int64? = nil) throws -> [String] {
        try pollAndAppend()
        try cutSegment()
        visibility?.stop()
        kickShippers()
        let deadline = deadlineUs ?? monotonicMicroseconds() + Self.shutdownWaitUs
        var pending: [String] = []
        for s in shippers where !s.waitUntilShipped(limit: shippableSequence, deadlineUs: deadline) {
            pending.append(s.replica.displayURL + (s.lastError.map { ": \($0)" } ?? ""))
            logger.error("replica did not acknowledge everything before shutdown; the spool keeps it for next start",
                         metadata: ["replica.url": "\(s.replica.displayURL)"])
        }
        try collectOutbox()
        // Every job started must end before the agent does: uploads and housekeeping on the
        // replicas' queues (housekeeping stops between jobs), and a restore drill under way.
        for s in shippers { s.stopAndWait() }
        if !drillEnds(withinUs: deadline + Self.shutdownWaitUs - monotonicMicroseconds()) {
            logger.warning("a restore drill is still running at shutdown; stopping without waiting for it", metadata: meta)
        }
        if !pin.isAutocommit { try? pin.execute("COMMIT") }
        // Released now, not when the object goes: a restart takes them again at once (once a
        // drill that outlived the wait above ends).
        releaseLocksAfterDrill()
        ChangeHub.shared.unsubscribe(wakeup)
        logger.info("stopped", metadata: meta.merging(["txid": "\(lastTxid)"]) { a, _ in a })
        return pending
    }

    /// Whether the restore drill under way, if any, ends within `us` (what is queued before
    /// this call on the drill's queue has run).
    func drillEnds(withinUs us: Int64) -> Bool {
        let drill = DispatchGroup()
        drill.enter()
        verifyQueue.async { drill.leave() }
        return drill.wait(timeout: .now() + .microseconds(Int(max(0, us)))) == .success
    }
}
