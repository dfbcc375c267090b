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

/// Operations from the loop: the status and its file, alerts, housekeeping on the replicas,
/// restore drills, the spool's bound.
extension Agent {
    // MARK: operations: status, alerts, housekeeping, drills

    /// Runs from the main loop about four times a second.
    func operationsTick() throws {
        let now = nowMicroseconds()
        try refreshStatus(nowUs: now)
        let mono = clock.monotonicUs()
        if mono - lastStatusFileUs >= 1_000_000 {
            // Written when something in it changed, and every 10 s regardless (its time says
            // the agent is alive): an idle database costs no file write a second.
            var report = status.current
            report.updatedUnix = 0
            let same = report == lastStatusWritten
            if options.statusInSpool && (!same || mono - lastStatusFileUs >= 10_000_000) {
                lastStatusFileUs = mono
                lastStatusWritten = report
                StatusFile.write(status.current, spool: spool.dir)
            }
        }
        if let a = alerter, mono - lastAlertCheckUs >= 1_000_000 {
            lastAlertCheckUs = mono
            a.evaluate(status.current, nowUs: now)
        }
        if mono - lastHousekeepingUs >= housekeepingEveryUs {
            lastHousekeepingUs = mono
            scheduleHousekeeping()
        }
        if options.verifyIntervalUs > 0 && (lastVerifyUs == 0 || mono - lastVerifyUs >= options.verifyIntervalUs) {
            if lastVerifyUs == 0 { lastVerifyUs = mono; return }   // the first drill after one interval
            lastVerifyUs = mono
            scheduleVerify()
        }
    }

    /// How often retention and compaction look at each replica.
    var housekeepingEveryUs: Int64 {
        var every = min(options.retentionUs / 4, 300_000_000)
        if let w = options.compactionLevelsUs.first { every = min(every, w / 2) }
        return max(every, 1_000_000)
    }

    func refreshStatus(nowUs: Int64) throws {
        let entries = try spool.outboxEntries()
        let walBytes = UInt64(FS.fileSize(walPath) ?? 0)
        // What waits to ship; the bound counts more (Spool.heldBytes), as the disk sees it.
        let spoolBytes = entries.reduce(UInt64(0)) { $0 + UInt64(FS.fileSize($1.path) ?? 0) }
        var reps: [ReplicaStatus] = []
        for s in shippers {
            let acked = s.acked
            var oldest: Int64? = segment?.firstTimeUs
            for e in entries where e.sequence > acked && e.sequence < shippableSequence {
                if let t = Agent.firstCommitTimeUs(ofKey: e.key) { oldest = min(oldest ?? t, t) }
            }
            var r = ReplicaStatus(url: s.replica.displayURL)
            r.lagSeconds = oldest.map { Double(max(0, nowUs - $0)) / 1e6 } ?? 0
            r.lastSyncUnix = Double(s.lastSuccessUs) / 1e6
            let up = s.uploads
            r.shippedObjects = UInt64(up.count); r.shippedBytes = up.bytes
            r.requests = s.replica.requestCounts.snapshot
            r.lastError = s.lastError
            r.failingSinceUnix = s.failingSinceUs.map { Double($0) / 1e6 }
            reps.append(r)
        }
        status.update {
            $0.updatedUnix = Double(nowUs) / 1e6
            $0.alertLagSeconds = Double(options.alertLagUs) / 1e6
            $0.generation = state.generation
            $0.databaseID = state.databaseID.map(DatabaseID.text)
            $0.txid = lastTxid
            $0.lastCommitUnix = Double(lastCommitTimeUs) / 1e6
            $0.walBytes = walBytes
            $0.spoolBytes = spoolBytes
            $0.lastSnapshotUnix = Double(state.lastSnapshotTimeUs) / 1e6
            // Keep what other threads record (drills, housekeeping); refresh the rest.
            while $0.replicas.count < reps.count { $0.replicas.append(reps[$0.replicas.count]) }
            for (i, r) in reps.enumerated() {
                $0.replicas[i].url = r.url
                $0.replicas[i].lagSeconds = r.lagSeconds
                $0.replicas[i].lastSyncUnix = r.lastSyncUnix
                $0.replicas[i].shippedObjects = r.shippedObjects
                $0.replicas[i].shippedBytes = r.shippedBytes
                $0.replicas[i].requests = r.requests
                $0.replicas[i].lastError = r.lastError
                $0.replicas[i].failingSinceUnix = r.failingSinceUnix
            }
        }
    }

    /// The commit time an outbox object starts at: segments and snapshots carry it in their names.
    static func firstCommitTimeUs(ofKey key: String) -> Int64? {
        // A compacted object starts at its window's first commit, but what it holds was
        // acknowledged already (as level 0): only level-0 segments and snapshots count.
        switch ObjectKey.parse(key) {
        case .segment(let s)? where s.level == 0: return s.firstTimeMs * 1000
        case .snapshot(let s)?: return s.timeMs * 1000
        default: return nil
        }
    }

    /// Retention and compaction, on each healthy replica's own queue.
    func scheduleHousekeeping() {
        let settings = Housekeeper.Settings(retentionUs: options.retentionUs, compactionLevelsUs: options.compactionLevelsUs,
                                            fineWindowUs: options.fineWindowUs,
                                            settleUs: 2 * options.syncIntervalUs + 2_000_000, encryptionKey: options.encryptionKey)
        for (i, s) in shippers.enumerated() where s.lastError == nil && s.droppedGeneration == nil {
            let keeper: Housekeeper
            if let k = housekeepers[i] { keeper = k } else {
                keeper = Housekeeper(replica: s.replica, workDir: spool.workDir, settings: settings, logger: logger)
                keeper.shouldStop = { [weak s] in s?.isStopping ?? true }
                housekeepers[i] = keeper
            }
            let status = self.status, logger = self.logger, generation = state.generation
            s.housekeeping {
                if s.isStopping { return }
                do {
                    guard try s.checkGenerationStillThere(generation) else { return }
                } catch {
                    // Cannot tell (no permission to read, the store failing): retention and
                    // compaction still run, and the next look tries again.
                    status.countError("housekeeping", replica: i)
                    logger.warning("could not check that the replica still holds the current generation",
                                   metadata: ["replica.url": "\(s.replica.displayURL)", "error": "\(error)"])
                }
                do {
                    let o = try keeper.run(currentGeneration: generation)
                    if o.deleted > 0 || o.compacted > 0 {
                        status.update {
                            guard i < $0.replicas.count else { return }
                            $0.replicas[i].deletedObjects += UInt64(o.deleted + o.compacted)
                            $0.replicas[i].compactedObjects += UInt64(o.compacted)
                        }
                    }
                } catch is Housekeeper.Stopped {
                    return
                } catch {
                    status.countError("housekeeping", replica: i)
                    logger.error("retention or compaction failed; retrying later", metadata: ["replica.url": "\(s.replica.displayURL)", "error": "\(error)"])
                }
            }
        }
    }

    /// A restore drill of every replica, in the background, one at a time.
    func scheduleVerify() {
        guard verifyBusy.testAndSet() else { return }
        let urls = options.replicaURLs, envs = options.replicaEnvironments
        let key = options.encryptionKey, dir = spool.dir + "/verify", status = self.status, logger = self.logger
        let busy = verifyBusy
        verifyQueue.async {
            defer { busy.clear() }
            try? FS.makeDirectories(dir, mode: 0o700)
            for (i, url) in urls.enumerated() {
                let report: VerifyReport
                do {
                    let r = try ReplicaBackends.open(url, environment: i < envs.count ? envs[i] : nil)
                    report = Verifier.run(replica: r, target: .latest, encryptionKey: key, tempDir: dir, scrub: .segments)
                } catch {
                    var failed = VerifyReport(replica: url, target: RestoreTarget.latest.description)
                    failed.problems = ["\(error)"]
                    report = failed
                }
                status.update {
                    guard i < $0.replicas.count else { return }
                    $0.replicas[i].verifyOK = report.ok
                    $0.replicas[i].verifyUnix = Double(nowMicroseconds()) / 1e6
                    $0.replicas[i].verifyMessage = report.ok ? "txid \(report.txid ?? 0) restored and checked" : report.problems.first
                }
                if report.ok {
                    logger.info("restore drill passed", metadata: ["replica.url": "\(report.replica)", "txid": "\(report.txid ?? 0)",
                                                                  "objects": "\(report.objectsChecked)", "seconds": "\(format1(report.seconds))"])
                } else {
                    status.countError("verify", replica: i)
                    logger.error("restore drill failed", metadata: ["replica.url": "\(report.replica)", "problem": "\(report.problems.first ?? "")"])
                }
            }
        }
    }

    /// Notices a database file replaced underneath (restored, copied over). Uses stat on the
    /// path: opening and closing another descriptor on the database would drop the POSIX
    /// locks SQLite holds through the agent's own connections.
    func databaseWasReplaced() -> Bool {
        var st = stat()
        guard stat(dbPath, &st) == 0 else { return false }
        if UInt64(st.st_dev) != state.dbDevice || UInt64(st.st_ino) != state.dbInode {
            logger.warning("the database file was replaced; shipping what was read, then restarting replication, which starts a new generation", metadata: meta)
            return true
        }
        return false
    }

    public func stop() { wakeup.stop() }

    /// The database file's path with symbolic links resolved (the key of its status).
    public var resolvedPath: String { dbPath }
}
