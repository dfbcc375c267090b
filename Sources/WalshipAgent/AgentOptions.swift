import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// What one agent replicates, and how.
public struct AgentOptions {
    public var databasePath: String
    public var replicaURLs: [String]
    /// Per replica (same order as `replicaURLs`): credentials environment, nil for the process's.
    public var replicaEnvironments: [[String: String]?] = []
    public var syncIntervalUs: Int64 = 1_000_000
    public var snapshotIntervalUs: Int64 = 86_400_000_000
    /// Run a checkpoint cycle once the WAL holds this many frames.
    public var checkpointFrames = 1000
    public var spoolDirectory: String?
    /// Wait after a WAL change before reading it, so a burst of commits is read in one pass.
    /// Commit times are stamped when read, so they may be this much late (at most).
    public var readDelayUs: Int64 = 100_000
    /// Past this many bytes in the spool, the backlog of failing replicas is dropped (and a new
    /// generation starts there when they return): the agent never fills the disk.
    public var spoolLimitBytes: Int64 = 1 << 30
    /// Watchdog poll when no inotify event arrives.
    public var pollIntervalUs: Int64 = 250_000
    /// Take one snapshot, ship everything, and return (`walship snapshot` with no agent running).
    public var oneShotSnapshot = false
    /// Encrypt every object with this key (AES-256-GCM); nil stores them in the clear.
    public var encryptionKey: EncryptionKey?
    /// A database found in a shared directory: its path must name the file itself (no symbolic
    /// link) and, when given, be this very file (device and inode as the listing saw them).
    public var foundInDirectory = false
    /// Keep `status.json` in the spool (false when the process keeps one status file for all).
    public var statusInSpool = true
    public var expectedIdentity: FileIdentity?
    /// The database id to record in every object (`database-id`); nil keeps the spool's, or
    /// draws a random one on a first run.
    public var databaseID: UInt64?
    /// Snapshots older than this are deleted (the newest one before the cutoff is kept, so
    /// every point of the last `retention` stays restorable), with the segments only they need.
    public var retentionUs: Int64 = OperationsDefaults.retentionUs
    /// Window sizes of compaction levels 1, 2, ... (empty: no compaction).
    public var compactionLevelsUs: [Int64] = OperationsDefaults.compactionLevelsUs
    /// Inside this window every transaction stays a restore point; older history is kept at
    /// the boundaries of the last compaction level.
    public var fineWindowUs: Int64 = OperationsDefaults.fineWindowUs
    /// Run a restore drill against every replica this often (0: never).
    public var verifyIntervalUs: Int64 = 0
    public var webhookURL: String?
    public var alertLagUs: Int64 = OperationsDefaults.alertLagUs
    public var alertSyncFailureUs: Int64 = OperationsDefaults.alertSyncFailureUs
    public init(databasePath: String, replicaURLs: [String]) {
        self.databasePath = databasePath
        self.replicaURLs = replicaURLs
    }
}

extension AgentOptions {
    /// The agent's options for one database of `replicate`, from its settings.
    public init(_ d: DatabaseConfig, encryptionKey: EncryptionKey?) {
        self.init(databasePath: d.path, replicaURLs: d.replicas.map(\.url))
        replicaEnvironments = d.replicas.map(\.environment)
        syncIntervalUs = d.syncIntervalUs
        snapshotIntervalUs = d.snapshotIntervalUs
        checkpointFrames = d.checkpointFrames
        readDelayUs = d.readDelayUs
        spoolDirectory = d.spoolDirectory
        spoolLimitBytes = d.spoolLimitBytes
        self.encryptionKey = encryptionKey
        retentionUs = d.retentionUs
        compactionLevelsUs = d.compactionLevelsUs
        fineWindowUs = d.fineWindowUs
        verifyIntervalUs = d.verifyIntervalUs
        webhookURL = d.webhookURL
        alertLagUs = d.alertLagUs
        alertSyncFailureUs = d.alertSyncFailureUs
        databaseID = d.databaseID
    }
}
