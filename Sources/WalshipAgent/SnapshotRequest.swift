#if canImport(Glibc)
import Glibc
#endif
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

/// Asks a running agent for a snapshot through a request file in its spool.
public enum SnapshotRequest {
    static func spool(_ db: String, _ dir: String?) -> Spool {
        Spool(dir: dir ?? Spool.defaultDirectory(forDatabase: FS.absolute(db)))
    }

    /// The pid of the agent replicating `database`, if one runs.
    public static func runningAgent(database: String, spoolDirectory: String?) -> Int32? {
        spool(database, spoolDirectory).isLockedByAnotherProcess()
    }

    public enum Outcome { case taken, failed, timedOut }

    /// Creates the request and waits until the agent removes it (after the snapshot), or marks
    /// it failed (the agent logs why).
    public static func ask(database: String, spoolDirectory: String?, timeoutUs: Int64) throws -> Outcome {
        let s = spool(database, spoolDirectory)
        try? FS.remove(s.snapshotRequestFailedPath)
        try FS.writeAtomically(s.snapshotRequestPath, Array("requested\n".utf8))
        let deadline = monotonicMicroseconds() + timeoutUs
        while monotonicMicroseconds() < deadline {
            if !FS.exists(s.snapshotRequestPath) {
                // Gone: taken, or renamed to mark a failure (checked after, so no race).
                if FS.exists(s.snapshotRequestFailedPath) {
                    try? FS.remove(s.snapshotRequestFailedPath)
                    return .failed
                }
                return .taken
            }
            usleep(50_000)
        }
        try? FS.remove(s.snapshotRequestPath)
        return .timedOut
    }
}
