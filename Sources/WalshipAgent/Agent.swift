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

    var pin: SQLiteConnection!
    /// A second read connection: the pin moves without the write lock by starting the new
    /// read transaction here before ending the old one (then the two swap), see
    /// `movePinWithoutLock`.
    var sparePin: SQLiteConnection!
    var writer: SQLiteConnection!
    var checkpointer: SQLiteConnection!
    var table: PageHashTable!
    var dbFile: RawFile!
    var state: AgentState!
    var persistedTableTxid: UInt64 = 0
    /// Outbox entries below this sequence are vouched for by the saved state.
    var shippableSequence: UInt64 = 1

    // Running values (ahead of `state` until the next cut).
    var lastTxid: UInt64 = 0
    var dbChecksum: UInt64 = 0
    var dbPages: UInt32 = 0
    var lastCommitTimeUs: Int64 = 0
    var segment: OpenSegment?
    var pageBuffer: [UInt8] = []
    var lastCheckpointTryUs: Int64 = 0
    /// Inside a low-disk episode of the spool's filesystem (warned once per episode).
    var lowDiskWarned = false
    var lastCompactionDropLogUs: Int64 = 0
    var linkFailureLogged = false
    var waitingForSnapshotRoom = false
    /// After a snapshot failed for lack of room, when the schedule may try again.
    var snapshotRetryAtUs: Int64 = 0
    var lastRepinUs: Int64 = 0

    /// Figures for /metrics, `walship status` and alerts.
    public let status: AgentStatus
    var alerter: Alerter?
    var localCompactor: LocalCompactor?
    var lastStatusFileUs: Int64 = 0
    var lastStatusWritten: StatusReport?
    var lastUpkeepUs: Int64 = 0
    var lastAlertCheckUs: Int64 = 0
    var lastHousekeepingUs: Int64 = 0
    var lastVerifyUs: Int64 = 0
    let verifyQueue = DispatchQueue(label: "walship.verify")
    let verifyBusy = AtomicFlag()

    /// Changes to the database and stop requests (ChangeHub); waits end early on either.
    let wakeup = Wakeup()
    var stopRequested: Bool { wakeup.stopped }
    /// When the last change to the database or its WAL was seen (idle back-off).
    var lastChangeUs: Int64
    /// Whether changes wake the agent (false: it polls on its timeouts alone).
    var watching = false
    var bytesSinceRoomCheck = 0
    var restartRequested = false
    /// The tailer's position when the wal-index was last seen ahead of it (stuck detection).
    var stuckAt: Int?
    /// Compares the database file with the page-hash table after complete checkpoints.
    var scrub = DatabaseScrub()

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
    var segmentPayloadRate = 0.0

    /// What the loop schedules by (a test's clock moves only when the test moves it).
    let clock: LoopClock

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
    var heldIdentities: [FileIdentity] = []

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
        if !drillEnds(withinUs: 1_000_000) {
            logger.warning("a restore drill is still running; the spool stays locked until it ends", metadata: meta)
        }
    }
    var closed = false

    /// Gives up the database's flock and the spool's lock once no restore drill runs (queued
    /// behind it on its queue): a drill must never share the spool with a new agent.
    func releaseLocksAfterDrill() {
        // The objects themselves go along (not the descriptor's number, which a closed file
        // would leave to be reused): only the drill's queue uses them from here on.
        let locks = HeldLocks(spool: spool, file: dbFile)
        verifyQueue.async {
            if let f = locks.file { flock(f.fd, LOCK_UN) }
            locks.spool.unlock()
        }
    }

    final class HeldLocks: @unchecked Sendable {
        let spool: Spool
        let file: RawFile?
        init(spool: Spool, file: RawFile?) { self.spool = spool; self.file = file }
    }

    var meta: Logger.Metadata { ["db.path": "\(dbPath)"] }

    // Stored state of the parts kept in the other Agent*.swift files.

    var holdingWriteLock = false

    var makingWay = false

    var lastCourtesy: (key: (UInt32, UInt32, Bool), atUs: Int64)?

    /// A log position the tailer must reach before a restart of that log counts as continuity.
    var restartGuard: WalIndexHeader?

    var shmFile: RawFile?

    var visibility: VisibilityLog?

    var lastComparedUs: Int64 = 0

    var lastComparedTxid: UInt64 = 0

    var lastComparedGeneration = ""

    var nextCutUs: Int64 = 0

    var lastSnapshotCheckUs: Int64 = 0

    var lastWatchdogUs: Int64 = 0

    /// Whether the database was idle when the last wait began.
    var idleBeforeWait = false

    /// Set while a burst of commits is let land before the WAL is read (see `turn`).
    var debounceUntilUs: Int64?

    let sampleEveryUs: Int64 = 8_000

    /// One per replica, kept across runs (it remembers the snapshot it last checked).
    var housekeepers: [Int: Housekeeper] = [:]

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

    func openConnections() throws {
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

    func databasePageSize() throws -> Int {
        let h = try dbFile.read(at: 0, count: 100)
        guard h.count == 100, h.starts(with: Array("SQLite format 3\0".utf8)) else { throw AgentError.notADatabase(dbPath) }
        let raw = Int(h[16]) << 8 | Int(h[17])
        return raw == 1 ? 65536 : raw
    }

    /// Database size in pages when the WAL has no commit: from the header if valid, else the file.
    func databaseFilePages(pageSize: Int) throws -> UInt32 {
        let h = try dbFile.read(at: 0, count: 100)
        if h.count == 100 {
            let be = h.withUnsafeBytes { (bigEndian32($0, at: 24), bigEndian32($0, at: 28), bigEndian32($0, at: 92)) }
            if be.1 > 0 && be.0 == be.2 { return be.1 }
        }
        return UInt32(try dbFile.size() / pageSize)
    }

    func walHasNoCommittedFrames() throws -> Bool {
        guard let h = try tailer.readHeader() else { return true }
        let probe = WalTailer(walPath: walPath)
        probe.adopt(h)
        if case .transactions(let t) = try probe.poll() { return t.isEmpty }
        return false
    }

    func checksumOfDatabaseFile(pageSize: Int) throws -> (UInt32, UInt64) {
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

    func restoreRunningValues() {
        lastTxid = state.lastTxid
        dbChecksum = state.dbChecksum
        dbPages = state.dbPages
        lastCommitTimeUs = state.lastCommitTimeUs
        persistedTableTxid = state.tableTxid
        shippableSequence = state.nextSequence
    }

    /// After a crash: drop outbox objects the state does not vouch for, and bring the page-hash
    /// table up to the state's txid from the segments still in the outbox.
    func recoverSpool() throws {
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
    func dropUnvouched(by state: AgentState) throws {
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

    func replayIntoTable(path: String, key: String) throws {
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

    // MARK: status for tools

    public var currentGeneration: String { state.generation }
    public var currentTxid: UInt64 { lastTxid }
    /// Whether the one-off run wrote a snapshot (false: the newest one already was at the
    /// current txid, or a new generation's first snapshot was the one).
    public internal(set) var oneShotTookSnapshot = false
    /// Whether start() began a new generation (with its snapshot).
    public internal(set) var startedGeneration = false
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
