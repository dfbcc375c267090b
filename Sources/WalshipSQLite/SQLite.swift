import CSQLite

/// An error from SQLite: the primary result code, SQLite's message, and what was being done.
public struct SQLiteError: Error, CustomStringConvertible {
    public let code: Int32
    public let message: String
    public let context: String

    public var isBusy: Bool { code & 0xff == SQLITE_BUSY || code & 0xff == SQLITE_LOCKED }
    public var isNotADatabase: Bool { code & 0xff == SQLITE_NOTADB }
    public var isCantOpen: Bool { code & 0xff == SQLITE_CANTOPEN }

    public var description: String {
        var hint = ""
        switch code & 0xff {
        case SQLITE_NOTADB: hint = " (the file is not a SQLite database)"
        case SQLITE_CANTOPEN: hint = " (check that the file exists and its directory is writable)"
        case SQLITE_BUSY: hint = " (the database is locked; the application should use busy_timeout >= 5000 ms)"
        case SQLITE_CORRUPT: hint = " (the database file is corrupt)"
        default: break
        }
        return "\(context): \(message)\(hint)"
    }
}

public enum CheckpointMode: Int32 {
    case passive = 0, full = 1, restart = 2, truncate = 3
}

/// One SQLite connection, closed deterministically when released.
public final class SQLiteConnection {
    private var db: OpaquePointer?
    public let path: String

    public enum OpenMode { case readWrite, readWriteCreate, readOnly }

    public init(path: String, mode: OpenMode = .readWrite) throws {
        self.path = path
        var flags: Int32 = SQLITE_OPEN_NOMUTEX
        switch mode {
        case .readWrite: flags |= SQLITE_OPEN_READWRITE
        case .readWriteCreate: flags |= SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE
        case .readOnly: flags |= SQLITE_OPEN_READONLY
        }
        var h: OpaquePointer?
        let rc = sqlite3_open_v2(path, &h, flags, nil)
        if rc != SQLITE_OK {
            let msg = h.map { String(cString: sqlite3_errmsg($0)) } ?? "out of memory"
            sqlite3_close_v2(h)
            throw SQLiteError(code: rc, message: msg, context: "opening \(path)")
        }
        db = h
        sqlite3_extended_result_codes(h, 1)
    }

    deinit { close() }

    public func close() {
        if let h = db { sqlite3_close_v2(h); db = nil }
    }

    public static var libraryVersion: String { String(cString: sqlite3_libversion()) }

    private func fail(_ rc: Int32, _ context: String) -> SQLiteError {
        SQLiteError(code: rc, message: String(cString: sqlite3_errmsg(db)), context: context)
    }

    /// Keeps SQLite from checkpointing (and deleting the WAL) when this connection closes last:
    /// the agent decides when the log is checkpointed.
    /// Fails if SQLite refuses or ignores the setting: the agent must never have the log
    /// checkpointed behind its back.
    public func disableCheckpointOnClose() throws {
        var now: Int32 = 0
        let rc = walship_sqlite_db_config_int(db, SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE, 1, &now)
        guard rc == SQLITE_OK else { throw fail(rc, "turn off the checkpoint on close") }
        guard now == 1 else {
            throw SQLiteError(code: SQLITE_ERROR, message: "the setting did not take", context: "turn off the checkpoint on close")
        }
    }

    /// Gives up the connection's lookaside buffer (small-allocation cache): for connections that
    /// do little, one per idle database among thousands, its memory costs more than it saves.
    public func dropLookaside() throws {
        let rc = walship_sqlite_no_lookaside(db)
        guard rc == SQLITE_OK else { throw fail(rc, "drop the lookaside buffer") }
    }

    /// Asks SQLite not to allocate page-cache memory ahead of need, for every connection of the
    /// process. Only before SQLite is first used; returns whether it took.
    public static func allocatePagesOnDemand() -> Bool { walship_sqlite_no_pagecache_prealloc() == SQLITE_OK }

    public func setBusyTimeout(milliseconds: Int32) { sqlite3_busy_timeout(db, milliseconds) }

    /// Runs statements that return no rows of interest.
    public func execute(_ sql: String) throws {
        var err: UnsafeMutablePointer<CChar>?
        let rc = sqlite3_exec(db, sql, nil, nil, &err)
        if rc != SQLITE_OK {
            let msg = err.map { String(cString: $0) } ?? String(cString: sqlite3_errmsg(db))
            sqlite3_free(err)
            throw SQLiteError(code: rc, message: msg, context: "\(path): \(sql)")
        }
    }

    /// Runs a query and returns every row as text columns (NULL becomes nil).
    public func query(_ sql: String) throws -> [[String?]] {
        var stmt: OpaquePointer?
        var rc = sqlite3_prepare_v2(db, sql, -1, &stmt, nil)
        guard rc == SQLITE_OK else { throw fail(rc, "\(path): \(sql)") }
        defer { sqlite3_finalize(stmt) }
        var rows: [[String?]] = []
        while true {
            rc = sqlite3_step(stmt)
            if rc == SQLITE_DONE { break }
            guard rc == SQLITE_ROW else { throw fail(rc, "\(path): \(sql)") }
            let n = sqlite3_column_count(stmt)
            rows.append((0..<n).map { i in
                sqlite3_column_text(stmt, i).map { String(cString: $0) }
            })
        }
        return rows
    }

    public func queryScalar(_ sql: String) throws -> String? {
        try query(sql).first?.first ?? nil
    }

    public var isAutocommit: Bool { sqlite3_get_autocommit(db) != 0 }

    /// Runs a checkpoint; returns (busy, frames in log, frames checkpointed).
    @discardableResult
    public func checkpoint(_ mode: CheckpointMode) throws -> (busy: Bool, log: Int32, checkpointed: Int32) {
        var log: Int32 = -1, done: Int32 = -1
        let rc = sqlite3_wal_checkpoint_v2(db, nil, mode.rawValue, &log, &done)
        if rc == SQLITE_BUSY { return (true, log, done) }
        guard rc == SQLITE_OK else { throw fail(rc, "\(path): checkpoint") }
        return (false, log, done)
    }
}
