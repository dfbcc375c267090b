#if canImport(Glibc)
import Glibc
#endif
import Logging
import WalshipConfig
import WalshipFormat
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// Runs one agent per database for `walship replicate`, all on one `WorkerPool`: a few
/// threads per core, however many databases there are. Each agent's loop runs as turns (see
/// `Agent.turn`), parked between them until its next timer, a change to its files, or a stop.
///
/// SIGTERM and SIGINT reach every agent through the `ChangeHub`; each ships what is committed
/// and ends, on the pool's threads side by side, and `waitForAll()` returns once all have.
///
/// What a failed agent does depends on how its database was named:
/// - named in the command or the config file (`.stopProcess`): its error stops the process,
///   and a service manager restarts it;
/// - found in a directory (`.retry`): it is logged, and the agent starts again after a pause,
///   while the directory's other databases go on; a database that is gone is retired.
public final class Supervisor: @unchecked Sendable {
    public enum OnFailure: Sendable {
        case stopProcess(@Sendable (Error) -> Never)
        case retry
    }

    private final class Entry {
        let options: AgentOptions
        let onFailure: OnFailure
        var agent: Agent?
        var retiring = false
        var finished = false
        /// When it failed (monotonic), for a directory's database.
        var failedAtUs: Int64?
        init(options: AgentOptions, onFailure: OnFailure) {
            self.options = options
            self.onFailure = onFailure
        }
        var directory: Bool { if case .retry = onFailure { return true }; return false }
    }

    /// The pause before a directory's failed database is tried again.
    public static let retryAfterUs: Int64 = 30_000_000

    private let logger: Logger
    private let cond = MonotonicCondition()
    private var entries: [String: Entry] = [:]   // by database path
    private let pool: WorkerPool

    /// `threads`: the pool's size (default: `WorkerPool.defaultThreads` for this machine).
    public init(logger: Logger, threads: Int? = nil) {
        self.logger = logger
        let cores = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
        self.pool = WorkerPool(threads: threads ?? WorkerPool.defaultThreads(cores: max(1, cores)))
    }

    /// Threads the agents run on so far.
    public var threadCount: Int { pool.threadCount }

    /// Whether an agent runs (or is shutting down, or failed and waits for its retry) for `path`.
    public func has(_ path: String) -> Bool { cond.locked { entries[path] != nil } }

    /// The databases with an agent that has not been retired.
    public var paths: [String] { cond.locked { entries.filter { !$0.value.retiring }.map(\.key) } }

    /// Starts an agent for `options.databasePath` on the pool.
    public func start(_ options: AgentOptions, onFailure: OnFailure) throws {
        let path = options.databasePath
        let entry = Entry(options: options, onFailure: onFailure)
        let added: Bool = cond.locked {
            guard entries[path] == nil else { return false }
            entries[path] = entry
            return true
        }
        guard added else { return }
        do {
            try startAgent(entry)
        } catch {
            cond.locked { entries[path] = nil }
            throw error
        }
    }

    /// A new agent for the entry, as a job of the pool: its first step starts it.
    private func startAgent(_ entry: Entry) throws {
        let agent = Agent(options: entry.options, logger: logger)
        // Retired before it began (or a stop request came): nothing is started.
        let retiring: Bool = cond.locked { entry.agent = agent; return entry.retiring }
        if retiring || ChangeHub.shared.stopping { finish(entry); return }
        let job = AgentJob(agent)
        try pool.add(wakeup: agent.wakeupForScheduling) { [self] in step(entry, job) }
    }

    /// An agent as a job of the pool: the agent, until it ends, and when its next turn was due.
    private final class AgentJob {
        var agent: Agent?
        var next: WorkerPool.Next?
        init(_ agent: Agent) { self.agent = agent }
    }

    private enum Outcome {
        case next(WorkerPool.Next)
        case ended(resolvedPath: String)
        case restart(resolvedPath: String)
        case failed(resolvedPath: String, Error)
    }

    /// One step of an agent's job: its start and first wait, a turn, or its end. An agent that
    /// ended is gone (closed and released) before anything else is done about it.
    private func step(_ entry: Entry, _ job: AgentJob) -> WorkerPool.Step {
        switch advance(entry, job) {
        case .next(let n):
            return .again(n)
        case .ended(let path):
            if entry.directory && cond.locked({ entry.retiring }) { StatusBoard.unregister(database: path) }
            finish(entry)
        case .restart(let path):
            restarted(entry, path)
        case .failed(let path, let error):
            failed(entry, path, error)
        }
        return .done
    }

    private func advance(_ entry: Entry, _ job: AgentJob) -> Outcome {
        guard let agent = job.agent else { return .ended(resolvedPath: entry.options.databasePath) }
        let path = agent.resolvedPath
        do {
            guard let last = job.next else {
                // A stop that came while it waited for its first turn: it never starts.
                if agent.wakeupForScheduling.stopped || ChangeHub.shared.stopping {
                    release(entry, job)
                    return .ended(resolvedPath: path)
                }
                try agent.start()
                let n = try agent.beginRun()
                job.next = n
                return .next(n)
            }
            // A turn that only let commits land (no wake on change) leaves the change for later.
            let changed = last.wakeOnChange ? agent.wakeupForScheduling.takeChange() : false
            if let n = try agent.turn(changed: changed) {
                job.next = n
                return .next(n)
            }
            try agent.endRun(deadlineUs: shutdownDeadline())
            release(entry, job)
            return .ended(resolvedPath: path)
        } catch is AgentRestart {
            release(entry, job)
            return .restart(resolvedPath: path)
        } catch {
            release(entry, job)
            return .failed(resolvedPath: path, error)
        }
    }

    /// Closes the agent that ended and drops the job's hold on it: what it held (its locks, its
    /// place in `HeldFiles`, its subscription) is released before anything starts in its place.
    private func release(_ entry: Entry, _ job: AgentJob) {
        cond.locked { entry.agent = nil }
        job.agent?.close()
        job.agent = nil
    }

    /// How long agents stopping with the process wait for their replicas: one deadline for
    /// all, 30 s after the first began to stop, however many the pool's threads stop in
    /// turn. An agent retired alone has its own 30 s.
    private func shutdownDeadline() -> Int64 {
        let now = monotonicMicroseconds()
        guard ChangeHub.shared.stopping else { return now + Agent.shutdownWaitUs }
        return cond.locked {
            if processDeadlineUs == nil { processDeadlineUs = now + Agent.shutdownWaitUs }
            return processDeadlineUs!
        }
    }
    private var processDeadlineUs: Int64?

    /// The database file was replaced: a new agent takes the new file. A directory's agent
    /// ends here instead, and the next listing (within half a second) starts one for the file
    /// now under that name, vetted like any new one (a symbolic link, or nothing, is not). One
    /// named in the command or the file starts again at once.
    private func restarted(_ entry: Entry, _ resolvedPath: String) {
        let path = entry.options.databasePath
        if entry.directory {
            let retiring = cond.locked { entry.retiring }
            if !retiring && !FS.isRegularFileNotLink(path) {
                logger.notice("database is gone (or is no longer a regular file); its agent is retired", metadata: ["db.path": "\(path)"])
            }
            StatusBoard.unregister(database: resolvedPath)
            finish(entry)
            return
        }
        do { try startAgent(entry) } catch { failed(entry, resolvedPath, error) }
    }

    private func failed(_ entry: Entry, _ resolvedPath: String, _ error: Error) {
        let path = entry.options.databasePath
        let meta: Logger.Metadata = ["db.path": "\(path)"]
        switch entry.onFailure {
        case .stopProcess(let fail): fail(error)
        case .retry:
            let gone = !FS.isRegularFileNotLink(path)
            let retiring = cond.locked { entry.retiring }
            // Logged in every case: the error may have left commits unshipped.
            if gone || retiring {
                logger.error("replication of a retired database ended with an error; what its replica lacks stays in its spool",
                             metadata: meta.merging(["error": "\(error)"]) { a, _ in a })
                StatusBoard.unregister(database: resolvedPath)
                finish(entry)
            } else {
                logger.error("replication of this database failed; trying again in \(Self.retryAfterUs / 1_000_000) s",
                             metadata: meta.merging(["error": "\(error)"]) { a, _ in a })
                finish(entry, failed: true)
            }
        }
    }

    /// Marks an entry's agent as ended, and tells `agentEnded`.
    private func finish(_ entry: Entry, failed: Bool = false) {
        let tell: (@Sendable () -> Void)? = cond.locked {
            if failed { entry.failedAtUs = monotonicMicroseconds() }
            entry.finished = true
            entry.agent = nil
            cond.signal()
            return agentEnded
        }
        tell?()
    }

    /// Called (on the thread of the agent that ended) after an agent ends: the directory
    /// watcher lists again, for a database replaced under its name.
    private var agentEnded: (@Sendable () -> Void)?
    public func onAgentEnd(_ f: (@Sendable () -> Void)?) { cond.locked { agentEnded = f } }

    /// Stops the agent of `path` (it ships what is committed first). It ends on its own;
    /// `reap()` forgets it then.
    public func retire(_ path: String) {
        let agent: Agent? = cond.locked {
            guard let e = entries[path] else { return nil }
            e.retiring = true
            return e.agent
        }
        agent?.stop()
    }

    /// When the first failed database's pause ends (monotonic), if one waits.
    public var nextRetryUs: Int64? {
        cond.locked { entries.values.compactMap { e in e.finished && !e.retiring ? e.failedAtUs.map { $0 + Self.retryAfterUs } : nil }.min() }
    }

    /// Forgets agents that ended. Returns the paths of databases that failed and whose pause
    /// is over: the caller may start them again.
    @discardableResult
    public func reap() -> [String] {
        let now = monotonicMicroseconds()
        return cond.locked {
            var retry: [String] = []
            for (path, e) in entries where e.finished {
                if let t = e.failedAtUs, !e.retiring {
                    if now - t < Self.retryAfterUs { continue }
                    retry.append(path)
                }
                entries[path] = nil
            }
            return retry
        }
    }

    /// Waits for every agent to end (after a stop request).
    public func waitForAll() {
        cond.locked {
            while entries.values.contains(where: { !$0.finished }) { cond.wait(timeoutUs: 1_000_000) }
            entries = [:]
        }
    }
}

/// Finds the databases of `replicate --dir` (or a config file's `directories:`) and keeps one
/// agent per database: a database that appears is replicated within a second (the directory
/// is listed when its entries change), one that vanishes is retired (its agent ships what it has and
/// stops; its spool stays until removed by hand), and one whose agent failed is tried again
/// after a pause.
public final class DirectoryWatcher: @unchecked Sendable {
    private let directories: [DirectoryConfig]
    private let keys: [EncryptionKey?]
    private let supervisor: Supervisor
    private let logger: Logger
    private let wakeup = Wakeup()
    private var warned: Set<String> = []
    /// The databases this watcher started (a database of the same directory named under
    /// `databases:` is not its to retire).
    private var owned: Set<String> = []
    /// The identity of every database replicated in this process, by path: a file with one of
    /// them under another name (a hard link) is the same database, and is never opened.
    private var identities: [String: Set<FileIdentity>] = [:]

    /// At most two listings a second: a change to a directory's entries (or an agent that
    /// ended) brings a listing this long after the previous one at the latest.
    public static let scanEveryUs: Int64 = 500_000
    /// With every directory watched, a listing this often even with no change (a database
    /// whose agent failed is retried at the first listing after its pause).
    public static let fullScanEveryUs: Int64 = 10_000_000

    private let statusWriter: ProcessStatusWriter?
    /// One per directory: its entries' changes (see `ChangeHub.subscribeToEntries`).
    private var entryWakeups: [Wakeup] = []

    /// `statusFile`: the process's one status file, written from this loop (it then runs even
    /// with no directory to watch). A directory's databases then keep no status file of their
    /// own in their spools: one file for the process, not one write per database.
    public init(directories: [DirectoryConfig], encryptionKeys: [EncryptionKey?], supervisor: Supervisor,
                statusFile: String? = nil, logger: Logger) {
        self.directories = directories
        self.keys = encryptionKeys
        self.supervisor = supervisor
        self.logger = logger
        self.statusWriter = statusFile.map { ProcessStatusWriter(path: $0, logger: logger) }
    }

    /// Lists (and writes the status file) until SIGTERM or SIGINT (or `stop()`). A directory is
    /// listed when its entries change (a file comes, goes, or is written before it has an
    /// agent), when an agent ends, and every 10 s regardless; a directory that cannot be
    /// watched, twice a second. Idle directories cost no listing.
    public func run() {
        // Subscribed for the stop requests (no names: no change of a file wakes it this way).
        ChangeHub.shared.subscribe(wakeup, directory: directories.first?.path ?? "/", names: [])
        for dir in directories { entryWakeups.append(watchEntries(of: dir)) }
        supervisor.onAgentEnd { [wakeup] in wakeup.notifyChange() }
        defer {
            supervisor.onAgentEnd(nil)
            for w in entryWakeups { w.setListener(nil); ChangeHub.shared.unsubscribe(w) }
            ChangeHub.shared.unsubscribe(wakeup)
        }
        var lastTickUs: Int64 = 0
        while !wakeup.stopped {
            // A watch lost (the directory removed, or unmounted) is made again, on whatever now
            // has the name; meanwhile, and where none can be made, the directory is listed
            // twice a second.
            var everyWatched = true
            for (i, w) in entryWakeups.enumerated() where w.unwatched {
                w.setListener(nil)
                ChangeHub.shared.unsubscribe(w)
                entryWakeups[i] = watchEntries(of: directories[i])
                if entryWakeups[i].unwatched { everyWatched = false }
            }
            let fullEvery = everyWatched ? Self.fullScanEveryUs : Self.scanEveryUs
            // Changes seen until now are in this listing.
            _ = wakeup.takeChange()
            scan()
            let scannedUs = monotonicMicroseconds()
            var pending = false
            while !wakeup.stopped {
                let now = monotonicMicroseconds()
                if statusWriter != nil && now - lastTickUs >= 1_000_000 {
                    statusWriter?.tick()
                    lastTickUs = now
                }
                let since = now - scannedUs
                // A failed database is retried at the end of its pause.
                let retryDue = supervisor.nextRetryUs.map { $0 <= now } ?? false
                if since >= fullEvery || ((pending || retryDue) && since >= Self.scanEveryUs) { break }
                var timeout = (pending ? Self.scanEveryUs : fullEvery) - since
                if let r = supervisor.nextRetryUs { timeout = min(timeout, max(r - now, Self.scanEveryUs - since)) }
                if statusWriter != nil { timeout = min(timeout, lastTickUs + 1_000_000 - now) }
                // A change is taken here only to note it; the listing comes at most twice a second.
                // With no directory (a status file only) it waits for nothing but the clock and a
                // stop, and does not count as a subscriber waiting for news.
                if pending || directories.isEmpty {
                    wakeup.sleep(timeoutUs: max(0, timeout))
                } else if wakeup.wait(timeoutUs: max(0, timeout)) {
                    pending = true
                }
            }
        }
    }

    /// A wake-up for changes to `dir`'s entries, which wakes this watcher's loop; `unwatched`
    /// when the directory cannot be watched.
    private func watchEntries(of dir: DirectoryConfig) -> Wakeup {
        let w = Wakeup()
        w.setListener { [wakeup] in wakeup.notifyChange() }
        // Names with a dot first are never databases here (the process's status file and its
        // temporary files, the spools): their changes wake nobody.
        if !ChangeHub.shared.subscribeToEntries(w, directory: dir.path, ignoringHidden: true) { w.loseWatchForever() }
        return w
    }

    /// A last status once every agent has stopped.
    public func writeFinalStatus() { statusWriter?.tick(force: true) }

    public func stop() { wakeup.stop() }

    /// One pass: start what appeared (or waited out its pause), retire what vanished.
    public func scan() {
        if directories.isEmpty { return }
        let retry = Set(supervisor.reap())
        var present: Set<String> = []
        // The files agents hold (HeldFiles: each agent's database, -wal and -shm, from the
        // descriptors it opened), and the file each agent was started on, before it holds it.
        for p in identities.keys where !supervisor.has(p) { identities[p] = nil }
        for (i, dir) in directories.enumerated() {
            let names: [String]
            do {
                // Every database with an agent here (this watcher's, or one listed in the config
                // that the pattern matches too) is only looked up, never opened.
                let known = Set((Array(identities.keys) + supervisor.paths).filter { FS.dirname($0) == dir.path }.map(FS.basename))
                let taken = identities.values.reduce(into: HeldFiles.all) { $0.formUnion($1) }
                names = try dir.databasesPresent(known: known, taken: taken) { name, why in
                    if warned.insert(dir.path + "/" + name).inserted {
                        logger.warning("not replicated: \(why)", metadata: ["db.path": "\(dir.path)/\(name)"])
                    }
                }
                warned.remove(dir.path)
            } catch {
                if warned.insert(dir.path).inserted {
                    logger.error("cannot list the directory; its databases go on, new ones wait", metadata: ["dir.path": "\(dir.path)", "error": "\(error)"])
                }
                // Nothing is retired on a listing that failed.
                for p in owned where FS.dirname(p) == dir.path { present.insert(p) }
                continue
            }
            for name in names {
                let path = dir.path + "/" + name
                if present.contains(path) { continue }   // (two patterns of one directory)
                present.insert(path)
                if supervisor.has(path) && !retry.contains(path) { continue }
                // One agent per file: another name for a file replicated here is skipped.
                guard let id = FileIdentity.of(path) else { continue }
                if let other = identities.first(where: { $0.value.contains(id) && $0.key != path })?.key {
                    if warned.insert(path).inserted {
                        logger.warning("not replicated: the same file as another database (a hard link)", metadata: ["db.path": "\(path)", "same.as": "\(other)"])
                    }
                    continue
                }
                var options = AgentOptions(dir.database(named: name), encryptionKey: keys[i])
                options.foundInDirectory = true
                options.statusInSpool = statusWriter == nil
                options.expectedIdentity = id
                do {
                    identities[path] = [id]
                    try supervisor.start(options, onFailure: .retry)
                    owned.insert(path)
                    logger.info("database found; replicating it", metadata: ["db.path": "\(path)"])
                } catch {
                    logger.error("cannot start an agent for this database; trying again soon", metadata: ["db.path": "\(path)", "error": "\(error)"])
                }
            }
        }
        let stillRunning = Set(supervisor.paths)
        for path in owned.sorted() {
            if !supervisor.has(path) { owned.remove(path); continue }   // ended, and reaped
            if stillRunning.contains(path) && !present.contains(path) {
                logger.notice("database vanished from its directory; retiring its agent", metadata: ["db.path": "\(path)"])
                supervisor.retire(path)
            }
        }
    }
}
