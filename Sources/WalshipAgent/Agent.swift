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


/// Thrown by `run()` when the agent must start over (the database file was replaced).
public struct AgentRestart: Error {}

/// Errors of the agent domain, each with what to do about it.
public enum AgentError: Error, CustomStringConvertible {
    case databaseMissing(String)
    case notADatabase(String)
    case notWAL(String, String)
    case alreadyRunning(String, Int32)
    case databaseLocked(String, Int32?)
    case unreadableWAL(String, String)
    case noWalIndex(String)
    case writeLockUnavailable(String)
    case notShipped([String])
    case keyRequired(String, String, String)
    case otherReplicas(String, [String], [String])
    case txidsExhausted(String, UInt64)

    public var description: String {
        switch self {
        case .databaseMissing(let p): return "database \(p) does not exist; give the path of an existing SQLite database"
        case .notADatabase(let p): return "\(p) is not a SQLite database (file is not a database)"
        case .notWAL(let p, let mode): return "could not switch \(p) to WAL mode (journal_mode is \(mode)); close other connections and retry"
        case .alreadyRunning(let p, let pid): return "another walship agent (pid \(pid)) is already replicating \(p); stop it first, or use `walship snapshot` to ask it for a snapshot"
        case .unreadableWAL(let p, let why):
            return "the WAL of \(p) cannot be read consistently with SQLite's wal-index (\(why)); nothing more is shipped from it, so that no wrong snapshot or segment reaches a replica. Run `PRAGMA wal_checkpoint(TRUNCATE)` from the application, then start the agent again"
        case .noWalIndex(let p):
            return "SQLite's wal-index \(p)-shm is missing after the agent opened the database, and the agent checks everything it reads from the WAL against it; is the database on a filesystem SQLite cannot share memory on, or opened by the application with PRAGMA locking_mode=EXCLUSIVE?"
        case .databaseLocked(let p, let pid):
            return "another walship agent\(pid.map { " (pid \($0))" } ?? "") is already replicating \(p) (with another spool directory): two agents would give one txid two states; stop it first"
        case .writeLockUnavailable(let p): return "could not take the write lock on \(p) for a moment: the application holds long write transactions; retry later"
        case .keyRequired(let p, let id, let spool):
            return "\(p) is replicated encrypted (key id \(id)): give the key with --encryption-key-file (or encryption: key-file: in the config); to stop encrypting on purpose, remove the spool \(spool) first"
        case .otherReplicas(let p, let before, let now):
            return "\(p) was last replicated to \(before.joined(separator: ", ")); this snapshot would ship to \(now.joined(separator: ", ")) only, and the others would miss objects: give the same replica URLs, or --config FILE"
        case .txidsExhausted(let r, let t):
            return "replica \(r) names txid \(t), too near the top of the txid range for a generation to follow it: an object planted there, or not walship's? Remove it (`walship list` shows it), then start again"
        case .notShipped(let r): return "not every replica has the snapshot yet (it stays in the spool and ships at the next start): \(r.joined(separator: "; "))"
        }
    }
}

/// The replication agent: pins the WAL, tails it, cuts segments, snapshots, checkpoints, and
/// hands objects to one shipper per replica. One instance per database.
public final class Agent {
    let options: AgentOptions
    let logger: Logger
    let dbPath: String
    let walPath: String
    let spool: Spool
    let tailer: WalTailer
    var replicas: [Replica] = []
    var shippers: [Shipper] = []

    private var pin: SQLiteConnection!
    /// A second read connection: the pin moves without the write lock by starting the new
    /// read transaction here before ending the old one (then the two swap), see
    /// `movePinWithoutLock`.
    private var sparePin: SQLiteConnection!
    private var writer: SQLiteConnection!
    private var checkpointer: SQLiteConnection!
    private var table: PageHashTable!
    private var dbFile: RawFile!
    var state: AgentState!
    private var persistedTableTxid: UInt64 = 0
    /// Outbox entries below this sequence are vouched for by the saved state.
    private var shippableSequence: UInt64 = 1

    // Running values (ahead of `state` until the next cut).
    private var lastTxid: UInt64 = 0
    private var dbChecksum: UInt64 = 0
    private var dbPages: UInt32 = 0
    private var lastCommitTimeUs: Int64 = 0
    private var segment: OpenSegment?
    private var pageBuffer: [UInt8] = []
    private var lastCheckpointTryUs: Int64 = 0
    /// Inside a low-disk episode of the spool's filesystem (warned once per episode).
    private var lowDiskWarned = false
    private var lastCompactionDropLogUs: Int64 = 0
    private var linkFailureLogged = false
    private var waitingForSnapshotRoom = false
    /// After a snapshot failed for lack of room, when the schedule may try again.
    private var snapshotRetryAtUs: Int64 = 0
    private var lastRepinUs: Int64 = 0

    /// Figures for /metrics, `walship status` and alerts.
    public let status: AgentStatus
    private var alerter: Alerter?
    private var localCompactor: LocalCompactor?
    private var lastStatusFileUs: Int64 = 0
    private var lastStatusWritten: StatusReport?
    private var lastUpkeepUs: Int64 = 0
    private var lastAlertCheckUs: Int64 = 0
    private var lastHousekeepingUs: Int64 = 0
    private var lastVerifyUs: Int64 = 0
    private let verifyQueue = DispatchQueue(label: "walship.verify")
    private let verifyBusy = AtomicFlag()

    /// Changes to the database and stop requests (ChangeHub); waits end early on either.
    private let wakeup = Wakeup()
    private var stopRequested: Bool { wakeup.stopped }
    /// When the last change to the database or its WAL was seen (idle back-off).
    private var lastChangeUs: Int64
    /// Whether changes wake the agent (false: it polls on its timeouts alone).
    private var watching = false
    private var bytesSinceRoomCheck = 0
    private var restartRequested = false
    /// The tailer's position when the wal-index was last seen ahead of it (stuck detection).
    private var stuckAt: Int?
    /// Compares the database file with the page-hash table after complete checkpoints.
    private var scrub = DatabaseScrub()

    struct OpenSegment {
        var builder: ObjectBuilder
        /// Encodes records into the builder; holds the segment's page window.
        var encoder: SegmentEncoder
        var firstTxid: UInt64
        var firstTimeUs: Int64
        var count: UInt32 = 0
        var pages = 0
        var openedUs = monotonicMicroseconds()
    }
    /// Payload bytes per second of the last segment cut: picks the next one's LZ4 level.
    private var segmentPayloadRate = 0.0

    /// What the loop schedules by (a test's clock moves only when the test moves it).
    private let clock: LoopClock

    public init(options: AgentOptions, logger: Logger, clock: LoopClock = SystemClock()) {
        self.options = options
        self.logger = logger
        self.clock = clock
        self.lastChangeUs = clock.monotonicUs()
        // SQLite names the WAL after the real file: follow symlinks before watching anything.
        self.dbPath = FS.resolved(options.databasePath)
        self.walPath = dbPath + "-wal"
        self.spool = Spool(dir: options.spoolDirectory ?? Spool.defaultDirectory(forDatabase: dbPath))
        self.tailer = WalTailer(walPath: dbPath + "-wal")
        self.status = AgentStatus(database: dbPath)
        if let url = options.webhookURL {
            alerter = Alerter(settings: Alerter.Settings(url: url, lagUs: options.alertLagUs, syncFailureUs: options.alertSyncFailureUs),
                              database: dbPath, logger: logger)
        }
    }

    /// See `HeldFiles`: released when the agent goes.
    private var heldIdentities: [FileIdentity] = []

    deinit { close() }

    /// Sets SQLite up, once and before any connection, for a process that may hold thousands
    /// of idle connections: no page-cache memory allocated ahead of need. Returns whether it
    /// took (it cannot once SQLite is in use; the agent works either way, with more memory).
    @discardableResult
    public static func prepareSQLiteForManyConnections() -> Bool { SQLiteConnection.allocatePagesOnDemand() }

    /// Releases what the agent holds in this process, at once rather than whenever the object
    /// goes: its place in `HeldFiles`, its locks on the spool and the database file, its
    /// subscription, its sampling. Called when it ended, after an error too, so that a new agent
    /// for the same database (a restart, a directory's retry) finds them free. Its descriptors
    /// and SQLite connections go with the object (see `RawFile.keepOpenIfHeld`).
    public func close() {
        guard !closed else { return }
        closed = true
        visibility?.stop()
        ChangeHub.shared.unsubscribe(wakeup)
        for id in heldIdentities { HeldFiles.release(id) }
        heldIdentities = []
        // Nothing of this agent may still write to the spool once another can take it: after
        // an error, shutdown() did not run, and uploads or housekeeping may be under way.
        for s in shippers { s.stopAndWait() }
        releaseLocksAfterDrill()
        // Normally at once: a new agent for this database (a restart, a retry) takes them next.
        let released = DispatchGroup()
        released.enter()
        verifyQueue.async { released.leave() }
        if released.wait(timeout: .now() + 1) == .timedOut {
            logger.warning("a restore drill is still running; the spool stays locked until it ends", metadata: meta)
        }
    }
    private var closed = false

    /// Gives up the database's flock and the spool's lock once no restore drill runs (queued
    /// behind it on its queue): a drill must never share the spool with a new agent.
    private func releaseLocksAfterDrill() {
        // The objects themselves go along (not the descriptor's number, which a closed file
        // would leave to be reused): only the drill's queue uses them from here on.
        let locks = HeldLocks(spool: spool, file: dbFile)
        verifyQueue.async {
            if let f = locks.file { flock(f.fd, LOCK_UN) }
            locks.spool.unlock()
        }
    }

    private final class HeldLocks: @unchecked Sendable {
        let spool: Spool
        let file: RawFile?
        init(spool: Spool, file: RawFile?) { self.spool = spool; self.file = file }
    }


    var meta: Logger.Metadata { ["db.path": "\(dbPath)"] }

    // MARK: start-up

    /// Opens the database, spool and replicas, decides continue vs new generation, and pins.
    public func start() throws {
        // A backend's libraries (libcurl and TLS for a network store) are initialised only when
        // a replica of its kind is opened, which keeps their pages out of the agent's memory
        // for directory replicas.
        guard FS.exists(dbPath) else { throw AgentError.databaseMissing(dbPath) }
        guard FS.isRegularFile(dbPath) else { throw AgentError.notADatabase(dbPath) }
        // Before anything is created (spool, replica): a file that is not SQLite's is refused
        // here, and one that is gets its connections only once the replicas are checked.
        // (Through the descriptor the agent keeps for its life: closing any descriptor of the
        // file would drop the POSIX locks SQLite holds on it in this process.)
        if options.foundInDirectory {
            guard FS.isRegularFileNotLink(options.databasePath) else {
                throw AgentError.notADatabase(options.databasePath + " (a database found in a directory must be a regular file, not a symbolic link)")
            }
        }
        dbFile = try RawFile(path: dbPath, flags: O_RDONLY | O_CLOEXEC | (options.foundInDirectory ? O_NOFOLLOW : 0))
        if options.foundInDirectory {
            // Swapped since the directory's listing vetted it: the file may be a database (or
            // a -shm) that an agent of this process replicates, and closing this descriptor
            // would drop that agent's locks. It is kept open, and the name is refused.
            var st = stat()
            guard fstat(dbFile.fd, &st) == 0 else { throw SystemError.last("stat \(dbPath)") }
            if let expected = options.expectedIdentity, expected != FileIdentity(st) {
                dbFile.keepOpenIfHeld()
                throw AgentError.notADatabase(dbPath + " (it changed since it was found; found again at the next listing)")
            }
        }
        // Held from now on (see HeldFiles): nothing else in the process opens it meanwhile.
        heldIdentities = [try dbFile.identity()]
        HeldFiles.hold(heldIdentities[0])
        let head = try dbFile.read(at: 0, count: 16)
        if head.count == 16 && head != Array("SQLite format 3\0".utf8) || (1..<16).contains(head.count) {
            throw AgentError.notADatabase(dbPath)
        }
        for (i, url) in options.replicaURLs.enumerated() {
            let env = i < options.replicaEnvironments.count ? options.replicaEnvironments[i] : nil
            let r = try ReplicaBackends.open(url, environment: env)
            // The shipper retries forever with its own backoff: two attempts a request from
            // now on, so that a failure shows (log, metrics, alerts) within seconds.
            r.failFast()
            replicas.append(r)
        }
        try spool.prepare()
        if let pid = try spool.lock() { throw AgentError.alreadyRunning(dbPath, pid) }
        // One agent per database, whatever its spool: an flock on the database file itself
        // (flock and SQLite's POSIX record locks do not interact on local filesystems; this
        // descriptor stays open for the agent's life). Taken before any SQLite connection or
        // replica is touched.
        if flock(dbFile.fd, LOCK_EX | LOCK_NB) != 0 {
            let err = Glibc.errno
            if err == EWOULDBLOCK {
                let holder = flockHolder(of: dbFile)
                // Another agent of this very process: closing this descriptor would drop the
                // POSIX locks SQLite holds for it (its pin among them). Kept open instead.
                if holder == getpid() { dbFile.keepOpenForLife() }
                throw AgentError.databaseLocked(dbPath, holder)
            }
            throw SystemError(errno: err, context: "lock \(dbPath) (flock; the database must be on a local filesystem)")
        }
        // A run with other replicas than the last leaves out replicas that then miss objects
        // (each is checked, and given a new generation, before the next object it takes). A
        // one-off snapshot must not do that to the configured replicas behind their back.
        let urls = replicas.map(\.displayURL)
        let last = try spool.loadReplicaURLs()
        if let last, Set(last) != Set(urls) {
            if options.oneShotSnapshot { throw AgentError.otherReplicas(dbPath, last, urls) }
            logger.notice("the replica list changed since the last run; a replica that missed objects gets a new generation before anything else",
                          metadata: meta.merging(["replicas.before": "\(last.joined(separator: " "))", "replicas.now": "\(urls.joined(separator: " "))"]) { a, _ in a })
        }
        // A new replica must answer now, and so must any whose answer is a refusal (wrong
        // credentials, no such bucket, not a replica): those are fixed by the operator, not by
        // waiting. One this spool has shipped to before and that cannot be reached for now
        // (connection, timeout, server error) is retried like any failing upload, and the
        // others are not held back.
        for r in replicas {
            do { try r.prepareForWriting() } catch where (last ?? []).contains(r.displayURL) && !options.oneShotSnapshot && Self.isOutage(error) {
                logger.error("a replica does not answer at start; replication to it is retried in the background",
                             metadata: meta.merging(["replica.url": "\(r.displayURL)", "error": "\(error)"]) { a, _ in a })
            }
        }
        try spool.saveReplicaURLs(urls)
        // Only now that every replica has been checked: a bad replica URL or credentials must
        // not leave the database switched to WAL mode.
        try openConnections()
        // With one compaction level, that level squashes (built from the replicas, beyond the
        // fine window); with more, level 1 is built here from the spool.
        if options.compactionLevelsUs.count >= 2 {
            localCompactor = LocalCompactor(dir: spool.compactDir, workDir: spool.workDir, windowUs: options.compactionLevelsUs[0],
                                            settleUs: options.syncIntervalUs + 1_000_000, key: options.encryptionKey)
        }
        try spool.clearWork()
        // Every check of what the tailer reads goes through the wal-index: without it the agent
        // could not tell a rolled-back spill from a commit, so it does not start.
        guard let shm = try RawFile.openIfExists(dbPath + "-shm") else { throw AgentError.noWalIndex(dbPath) }
        shmFile = shm
        // The files whose locks this agent now holds, for whoever opens files nearby.
        var more = [try shm.identity()]
        if let wal = FileIdentity.of(walPath) { more.append(wal) }
        for id in more { HeldFiles.hold(id) }
        heldIdentities += more
        // The sampling thread reads the -shm file itself, never through the agent: it holds
        // no reference that could outlive (or end) the agent.
        let log = VisibilityLog(everyUs: sampleEveryUs) { Agent.readWalIndex(shm) }
        visibility = log
        try log.start()
        log.setBusy(true)   // until the main loop first waits for a change
        tailer.walIndex = { [weak self] in self?.readWalIndex() }
        table = try PageHashTable(path: spool.tablePath)
        for (i, r) in replicas.enumerated() {
            let s = Shipper(replica: r, spool: spool, logger: logger)
            s.onError = { [status] in status.countError("upload", replica: i) }
            s.onHousekeepingError = { [status] in status.countError("housekeeping", replica: i) }
            shippers.append(s)
        }
        StatusBoard.register(status, for: dbPath)

        let previous = try spool.loadState()
        let pageSize = try databasePageSize()
        let ino = try dbFile.inode()
        var continued = false
        try withWriteLock(patient: true) {
            if let id = previous?.keyID, options.encryptionKey == nil {
                throw AgentError.keyRequired(dbPath, hex16(id), spool.dir)
            }
            let sameKey = (previous?.keyID ?? 0) == (options.encryptionKey?.id ?? 0)
            if previous != nil && !sameKey {
                logger.warning("the encryption key changed (or encryption was turned on or off); starting a new generation so that no generation mixes keys", metadata: meta)
            }
            if var s = previous, sameKey, sameDatabaseID(s), s.dbDevice == ino.dev, s.dbInode == ino.ino, s.pageSize == pageSize, s.dbPath == dbPath {
                if try tailer.resume(at: s.wal) {
                    continued = true
                } else if try tailer.readHeader() == nil || walHasNoCommittedFrames() {
                    // The log was emptied while we were away. If the database file still is
                    // exactly what we last shipped, nothing was missed.
                    let (pages, sum) = try checksumOfDatabaseFile(pageSize: pageSize)
                    if pages == s.dbPages && sum == s.dbChecksum {
                        tailer.adopt(try tailer.readHeader())
                        s.wal = tailer.position
                        state = s
                        continued = true
                    }
                } else if s.wal.header == nil, let h = try tailer.readHeader() {
                    // The saved position had no WAL at all, so every frame in it now came
                    // after what was shipped, provided nothing was copied back meanwhile:
                    // the database file is still exactly what was shipped.
                    let (pages, sum) = try checksumOfDatabaseFile(pageSize: pageSize)
                    if pages == s.dbPages && sum == s.dbChecksum {
                        tailer.adopt(h)
                        s.wal = tailer.position
                        state = s
                        continued = true
                    }
                }
                if continued {
                    state = state ?? s
                    if state.wal != tailer.position { state.wal = tailer.position }
                    restoreRunningValues()
                    try recoverSpool()
                    logger.info("continuing generation", metadata: meta.merging(["generation": "\(state.generation)", "txid": "\(state.lastTxid)"]) { a, _ in a })
                    // What was committed while the agent was away is read once the lock is
                    // released (below); a restart of the log before then is caught.
                    if let index = readWalIndex(), let h = tailer.header, index.describes(h) { restartGuard = index }
                }
            }
            if !continued {
                if let p = previous {
                    logger.warning("cannot prove continuity with the last shipped position; starting a new generation", metadata: meta)
                    try dropUnvouched(by: p)
                    localCompactor?.dropBeyond(txid: p.lastTxid, generation: p.generation)
                }
                tailer.adopt(try tailer.readHeader())
                try consumeWithoutShipping()
                // The snapshot of a new generation, and every segment after, rest on the
                // tailer's reading of the WAL: it must agree with SQLite's wal-index.
                if let why = divergenceFromWalIndex() { throw AgentError.unreadableWAL(dbPath, why) }
            }
            try repin()
        }
        if !continued {
            startedGeneration = true
            try startGeneration(reason: newGenerationReason(previous: previous, inode: ino, pageSize: pageSize), previous: previous)
        } else {
            // The backlog, read without the write lock: gigabytes committed while the agent
            // was away must not hold up the application. The pin taken above keeps those
            // frames in the log (a read mark forbids a restart), unless they were all copied
            // back already; then a restart before they are read starts a new generation.
            try pollAndAppend()
            try cutSegment()
        }
        kickShippers()
    }

    private func openConnections() throws {
        func open() throws -> SQLiteConnection {
            let c: SQLiteConnection
            do { c = try SQLiteConnection(path: dbPath, mode: .readWrite) } catch let e as SQLiteError {
                if e.isNotADatabase { throw AgentError.notADatabase(dbPath) }
                throw e
            }
            try c.disableCheckpointOnClose()
            try c.dropLookaside()
            c.setBusyTimeout(milliseconds: 5000)
            return c
        }
        writer = try open()
        let mode: String
        do { mode = try writer.queryScalar("PRAGMA journal_mode") ?? "" } catch let e as SQLiteError {
            if e.isNotADatabase { throw AgentError.notADatabase(dbPath) }
            throw e
        }
        if mode.lowercased() != "wal" {
            let now = try writer.queryScalar("PRAGMA journal_mode=WAL") ?? ""
            guard now.lowercased() == "wal" else { throw AgentError.notWAL(dbPath, now) }
            logger.notice("switched the database to WAL mode (it was \(mode))", metadata: meta)
        }
        try writer.execute("PRAGMA wal_autocheckpoint=0")
        pin = try open()
        try pin.execute("PRAGMA wal_autocheckpoint=0")
        sparePin = try open()
        try sparePin.execute("PRAGMA wal_autocheckpoint=0")
        checkpointer = try open()
        try checkpointer.execute("PRAGMA wal_autocheckpoint=0")
        checkpointer.setBusyTimeout(milliseconds: 0)
        // A connection checkpoints only once it has opened the WAL, which happens on its first read.
        _ = try checkpointer.query("SELECT count(*) FROM sqlite_master")
    }

    private func databasePageSize() throws -> Int {
        let h = try dbFile.read(at: 0, count: 100)
        guard h.count == 100, h.starts(with: Array("SQLite format 3\0".utf8)) else { throw AgentError.notADatabase(dbPath) }
        let raw = Int(h[16]) << 8 | Int(h[17])
        return raw == 1 ? 65536 : raw
    }

    /// Database size in pages when the WAL has no commit: from the header if valid, else the file.
    private func databaseFilePages(pageSize: Int) throws -> UInt32 {
        let h = try dbFile.read(at: 0, count: 100)
        if h.count == 100 {
            let be = h.withUnsafeBytes { (bigEndian32($0, at: 24), bigEndian32($0, at: 28), bigEndian32($0, at: 92)) }
            if be.1 > 0 && be.0 == be.2 { return be.1 }
        }
        return UInt32(try dbFile.size() / pageSize)
    }

    private func walHasNoCommittedFrames() throws -> Bool {
        guard let h = try tailer.readHeader() else { return true }
        let probe = WalTailer(walPath: walPath)
        probe.adopt(h)
        if case .transactions(let t) = try probe.poll() { return t.isEmpty }
        return false
    }

    private func checksumOfDatabaseFile(pageSize: Int) throws -> (UInt32, UInt64) {
        let pages = try databaseFilePages(pageSize: pageSize)
        guard try dbFile.size() >= Int(pages) * pageSize else { return (pages, 0) }
        var sum: UInt64 = 0
        var buf = [UInt8](repeating: 0, count: pageSize)
        let lock = DatabaseChecksum.lockBytePage(pageSize: pageSize)
        for pg in stride(from: UInt32(1), through: pages, by: 1) where pg != lock {
            _ = try buf.withUnsafeMutableBytes { try dbFile.read(at: Int(pg - 1) * pageSize, into: $0) }
            sum ^= buf.withUnsafeBytes { DatabaseChecksum.pageHash($0, pageNumber: pg) }
        }
        return (pages, sum)
    }

    private func restoreRunningValues() {
        lastTxid = state.lastTxid
        dbChecksum = state.dbChecksum
        dbPages = state.dbPages
        lastCommitTimeUs = state.lastCommitTimeUs
        persistedTableTxid = state.tableTxid
        shippableSequence = state.nextSequence
    }

    /// After a crash: drop outbox objects the state does not vouch for, and bring the page-hash
    /// table up to the state's txid from the segments still in the outbox.
    private func recoverSpool() throws {
        try dropUnvouched(by: state)
        // Links to segments cut after the saved state will be cut again, differently.
        localCompactor?.dropBeyond(txid: state.lastTxid, generation: state.generation)
        if state.tableTxid < state.lastTxid {
            for e in try spool.outboxEntries() {
                guard let s = ObjectKey.parse(e.key)?.segment, s.generation == state.generation,
                      s.lastTxid > state.tableTxid, s.lastTxid <= state.lastTxid else { continue }
                try replayIntoTable(path: e.path, key: e.key)
            }
            try table.flush()
            state.tableTxid = state.lastTxid
            persistedTableTxid = state.tableTxid
            try spool.saveState(state)
        }
    }

    /// Removes from the outbox what a killed agent queued after its last saved state: nothing
    /// the state does not vouch for may ship, whether the generation continues or not (a
    /// segment cut just before the kill would otherwise reach the replicas with txids that
    /// the next generation gives again).
    private func dropUnvouched(by state: AgentState) throws {
        for e in try spool.outboxEntries() {
            if e.sequence >= state.nextSequence {
                // Queued after the last saved state (a compacted object, its deletion list, a
                // segment): not vouched for. Deletion lists above all must never outlive the
                // object that replaces what they delete.
                logger.notice("dropping an object the saved state does not vouch for", metadata: ["object.key": "\(e.key)"])
                try FS.remove(e.path)
                continue
            }
            guard let object = ObjectKey.parse(e.key) else { continue }
            var orphan = object.generation > state.generation
            if object.generation == state.generation {
                switch object {
                case .segment(let s): orphan = s.firstTxid > state.lastTxid
                case .snapshot(let s): orphan = s.txid > state.lastTxid
                case .generationInfo: break
                }
            }
            if orphan {
                logger.notice("dropping an object the saved state does not vouch for", metadata: ["object.key": "\(e.key)"])
                try FS.remove(e.path)
            }
        }
    }

    private func replayIntoTable(path: String, key: String) throws {
        let r = FileReplica(root: FS.dirname(path))
        var decoder = SegmentDecoder(name: key)
        var pages: [(UInt32, UInt64)] = []
        var size = UInt32(0)
        var logical = state.dbPages
        var header: TransactionHeader?
        try streamObject(r, key: FS.basename(path), expect: .segment, encryption: options.encryptionKey) { chunk in
            try decoder.feed(chunk) { ev in
                switch ev {
                case .transaction(let t): header = t; pages.removeAll(); size = t.dbPages
                case .page(let pg, let bytes): pages.append((pg, DatabaseChecksum.pageHash(bytes, pageNumber: pg)))
                case .commit:
                    if let t = header, t.txid > state.tableTxid {
                        _ = try updateTable(pages: pages, commitSize: size, logicalSize: &logical)
                    }
                default: break
                }
            }
        }
    }

    // MARK: write lock and pin

    /// Runs `body` holding SQLite's write lock (BEGIN IMMEDIATE on the agent's own connection).
    /// Returns false without running it when the lock is busy and `patient` is false.
    @discardableResult
    private func withWriteLock(patient: Bool = false, waitMs: Int32 = 0, _ body: () throws -> Void) throws -> Bool {
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
    private var holdingWriteLock = false
    private var makingWay = false

    /// Replaces the pin with a read transaction at the current end of the WAL. Only call while
    /// holding the write lock, after reading the WAL to its end.
    private func repin() throws {
        if !pin.isAutocommit { try pin.execute("COMMIT") }
        try beginReadTransaction(pin)
        lastRepinUs = monotonicMicroseconds()
    }

    /// Whether the saved generation's objects carry the id this agent must record.
    private func sameDatabaseID(_ s: AgentState) -> Bool {
        guard let id = s.databaseID else { return false }
        return options.databaseID.map { $0 == id } ?? true
    }

    /// Why a start cannot continue the saved generation, in words for the log and alerts.
    private func newGenerationReason(previous: AgentState?, inode ino: (dev: UInt64, ino: UInt64), pageSize: Int) -> String {
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
    private func beginReadTransaction(_ c: SQLiteConnection) throws {
        try c.execute("BEGIN")
        do { _ = try c.query("SELECT count(*) FROM sqlite_master") } catch {
            try? c.execute("ROLLBACK")
            throw error
        }
    }

    /// Under the write lock, reads the WAL to its end and moves the pin there. False when the
    /// lock was busy (only when not `patient`).
    @discardableResult
    private func movePinToEnd(patient: Bool = false, waitMs: Int32 = 0) throws -> Bool {
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
    private func divergenceFromWalIndex() -> String? {
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
    private func recoverFromDivergence(_ why: String) throws {
        logger.error("capture self-check failed: what the replicas hold differs from what SQLite committed; starting a new generation",
                     metadata: meta.merging(["reason": "\(why)"]) { a, _ in a })
        status.countError("capture-divergence")
        try startGenerationFromCurrentWAL(reason: "capture self-check failed: \(why)")
    }

    /// Reads the WAL afresh to its end without shipping it (its content goes into the new
    /// snapshot), pins there, and starts a new generation. A snapshot is built from the
    /// tailer's map of the WAL: if reading the log afresh still disagrees with SQLite's
    /// wal-index, that snapshot would be wrong, so the agent stops, loudly.
    private func startGenerationFromCurrentWAL(reason: String) throws {
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
    private var checkpointerCheckUs: Int64 {
        let now = clock.monotonicUs()
        if let last = lastCourtesy, now - last.atUs < 500_000 { return 2_000 }
        return now - lastChangeUs >= 2_000_000 ? 1_000_000 : 20_000
    }

    /// Another process holds both the WAL's writer lock and its checkpointer lock: a FULL,
    /// RESTART or TRUNCATE checkpoint is running (a writer holds only the first, a PASSIVE
    /// checkpoint only the second). It waits for readers behind the end of the log, and
    /// RESTART and TRUNCATE wait for every reader of the log: the agent's pin among them.
    private func blockingCheckpointRunning() -> Bool {
        guard let f = shmFile else { return false }
        return byteLockedByAnotherProcess(f.fd, at: WalIndexHeader.writeLockByte)
            && byteLockedByAnotherProcess(f.fd, at: WalIndexHeader.checkpointLockByte)
    }

    /// Lets a waiting checkpoint finish within milliseconds: the pin moves to the end of the
    /// log (nothing can commit while the checkpoint holds the writer lock), and once the log
    /// is all copied back, a new pin reads the database file only, which holds back nothing.
    private func makeWayForCheckpoint() throws {
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
    private var lastCourtesy: (key: (UInt32, UInt32, Bool), atUs: Int64)?

    /// Moves the pin to the end of the WAL without the write lock. A pin is safe when, at the
    /// instant its read transaction starts, the agent has read every committed frame: then no
    /// frame it has not read can be copied back and overwritten by a restart while it holds
    /// the pin. The wal-index is read just before and just after the read transaction starts;
    /// any commit or restart in between changes its last frame or its salts.
    private func movePinWithoutLock() throws -> Bool {
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

    /// A log position the tailer must reach before a restart of that log counts as continuity.
    private var restartGuard: WalIndexHeader?

    // MARK: tailing

    /// Reads the WAL and appends every new committed transaction to the open segment.
    private func pollAndAppend() throws {
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
    private func consumeWithoutShipping() throws {
        while true {
            switch try tailer.poll() {
            case .headerChanged(_, let new): tailer.adopt(new)
            case .transactions(let t): if t.isEmpty { return }
            }
        }
    }

    private func append(_ t: CommittedTransaction) throws {
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
    private func checkRoomWhileWriting(_ bytes: Int) throws {
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

    private var shmFile: RawFile?
    private var visibility: VisibilityLog?

    /// Reads the wal-index header from the -shm file (nil while it is being written). The file
    /// is kept open for the agent's lifetime: closing a descriptor would drop SQLite's locks on it.
    private func readWalIndex() -> WalIndexHeader? {
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
    private func commitStamp(_ t: CommittedTransaction) -> Int64 {
        visibility?.firstSeen(salt1: t.header.salt1, salt2: t.header.salt2, commitFrame: t.commitFrame) ?? nowMicroseconds()
    }

    // MARK: cutting and state

    /// Closes the open segment into the outbox, saves the state, and flushes the table.
    private func cutSegment() throws {
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
    private func compactLocally(force: Bool) throws {
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

    private func saveState() throws {
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

    private func kickShippers() {
        for s in shippers { s.kick(limit: shippableSequence) }
    }

    /// Deletes outbox objects every replica has, once the table no longer needs them.
    private func collectOutbox() throws {
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
    private func enforceSpoolLimit() throws {
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
    private func shedSpool(room: SpoolRoom) throws {
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
    private func dropCompactionLinks(held: Int64, limit: Int64) {
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

    private func startGeneration(reason: String, previous: AgentState?) throws {
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
    private func writeSnapshot(rebuildTable: Bool) throws {
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
    private func checkpointCycle() throws {
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
    private func compareDatabaseWithChain() throws {
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
    private var lastComparedUs: Int64 = 0
    private var lastComparedTxid: UInt64 = 0
    private var lastComparedGeneration = ""

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
    private func runOnce() throws {
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
    private var nextCutUs: Int64 = 0
    private var lastSnapshotCheckUs: Int64 = 0
    private var lastWatchdogUs: Int64 = 0
    /// Whether the database was idle when the last wait began.
    private var idleBeforeWait = false
    /// Set while a burst of commits is let land before the WAL is read (see `turn`).
    private var debounceUntilUs: Int64?

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
    private func nextWait() -> WorkerPool.Next {
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

    private func watchdogUs(idle: Bool) -> Int64 { idle ? max(options.pollIntervalUs, 1_000_000) : options.pollIntervalUs }

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

    // MARK: operations: status, alerts, housekeeping, drills

    /// Runs from the main loop about four times a second.
    private func operationsTick() throws {
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
    private var housekeepingEveryUs: Int64 {
        var every = min(options.retentionUs / 4, 300_000_000)
        if let w = options.compactionLevelsUs.first { every = min(every, w / 2) }
        return max(every, 1_000_000)
    }

    private func refreshStatus(nowUs: Int64) throws {
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

    /// One per replica, kept across runs (it remembers the snapshot it last checked).
    private var housekeepers: [Int: Housekeeper] = [:]

    /// Retention and compaction, on each healthy replica's own queue.
    private func scheduleHousekeeping() {
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
    private func scheduleVerify() {
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
    private func databaseWasReplaced() -> Bool {
        var st = stat()
        guard stat(dbPath, &st) == 0 else { return false }
        if UInt64(st.st_dev) != state.dbDevice || UInt64(st.st_ino) != state.dbInode {
            logger.warning("the database file was replaced; shipping what was read, then restarting replication, which starts a new generation", metadata: meta)
            return true
        }
        return false
    }

    /// How long shutdown waits for the replicas to acknowledge what is committed.
    static let shutdownWaitUs: Int64 = 30_000_000

    /// Ships what is committed and stops; returns the replicas that still lack something
    /// (kept in the spool for the next start). `deadlineUs`: when to stop waiting for the replicas (default: 30 s from now); a restore
    /// drill under way gets 30 s more.
    @discardableResult
    private func shutdown(deadlineUs: Int64? = nil) throws -> [String] {
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
        let drill = DispatchGroup()
        drill.enter()
        verifyQueue.async { drill.leave() }
        let drillWaitUs = max(0, deadline + Self.shutdownWaitUs - monotonicMicroseconds())
        if drill.wait(timeout: .now() + .microseconds(Int(drillWaitUs))) == .timedOut {
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

    public func stop() { wakeup.stop() }

    /// The database file's path with symbolic links resolved (the key of its status).
    public var resolvedPath: String { dbPath }

    // MARK: waking up

    private func setUpWakeups() throws {
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

    private let sampleEveryUs: Int64 = 8_000

    /// Pause after a wake-up before reading the WAL: --read-delay, at most a tenth of the sync interval.
    private var debounceUs: Int64 { min(options.readDelayUs, options.syncIntervalUs / 10) }

    // MARK: status for tools

    public var currentGeneration: String { state.generation }
    public var currentTxid: UInt64 { lastTxid }
    /// Whether the one-off run wrote a snapshot (false: the newest one already was at the
    /// current txid, or a new generation's first snapshot was the one).
    public private(set) var oneShotTookSnapshot = false
    /// Whether start() began a new generation (with its snapshot).
    public private(set) var startedGeneration = false
    public var lastSnapshotTxid: UInt64 { state.lastSnapshotTxid }
}

/// The pid holding an flock on `file`, from /proc/locks (nil when it cannot be told).
func flockHolder(of file: RawFile) -> Int32? {
    guard let ino = try? file.inode(), let locks = try? RawFile(path: "/proc/locks", flags: O_RDONLY) else { return nil }
    var text: [UInt8] = []
    while text.count < 4 << 20, let chunk = try? locks.read(at: text.count, count: 65536), !chunk.isEmpty { text += chunk }
    for line in String(decoding: text, as: UTF8.self).split(separator: "\n") {
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF": the pid, then major:minor:inode.
        let f = line.split(separator: " ", omittingEmptySubsequences: true)
        guard f.count >= 6, f[1] == "FLOCK", let pid = Int32(f[4]) else { continue }
        if let last = f[5].split(separator: ":").last, UInt64(last) == ino.ino { return pid }
    }
    return nil
}

func hostName() -> String {
    var buf = [CChar](repeating: 0, count: 256)
    gethostname(&buf, buf.count)
    return String(cString: buf)
}

/// A snapshot that did not fit in the spool's filesystem (nothing of it was kept).
struct SnapshotNoRoom: Error, CustomStringConvertible {
    let cause: SystemError
    var description: String { cause.description }
}

/// Free space of the spool's filesystem against the headroom kept free there for the segment
/// being built and a snapshot: a quarter of the filesystem, at most 64 MiB.
struct SpoolRoom {
    let available: Int64
    let headroom: Int64

    init(of dir: String) {
        if let fs = FS.space(of: dir) {
            available = fs.available
            headroom = min(64 << 20, fs.total / 4)
        } else {   // unknown: the disk never sets the bound
            available = Int64.max / 4
            headroom = 0
        }
    }

    /// Less than the headroom is free: only then can the disk set the bound.
    var short: Bool { available < headroom }
    /// Less than half of it.
    var critical: Bool { available < headroom / 2 }
    /// At least one and a half times it: a low-disk episode is over.
    var ample: Bool { available >= headroom + headroom / 2 }

    /// The bound in force for a spool holding `held` bytes: `configured` (--spool-limit), or
    /// what fits, held plus free less the headroom, when that is less (`diskBound`), so that a
    /// backlog never fills the disk that other files share.
    func limit(held: Int64, configured: Int64) -> (bytes: Int64, diskBound: Bool) {
        let fits = max(0, held + available - headroom)
        return fits < configured ? (fits, true) : (configured, false)
    }
}
