import WalshipFormat
import WalshipStorage
import WalshipSystem

/// A value an option does not take; the message says what it takes.
public struct OptionValueError: Error, CustomStringConvertible {
    public let description: String
    init(_ message: String) { description = message }
}

/// One per-database setting of `replicate`, the same on the command line (`--<key> VALUE`) and
/// in the config file (`<key>: VALUE`, under `defaults:` or a database): one parser, one rule,
/// one default and one help text, so the two cannot drift apart.
public struct DatabaseOption: Sendable {
    public let key: String
    public let defaultText: String?
    public let help: String
    let parse: @Sendable (String, inout DatabaseConfig) throws -> Void

    public var flag: String { "--" + key }
    /// The help text with the default, for `--help`.
    public var helpWithDefault: String { help + (defaultText.map { " (default: \($0))" } ?? "") }
}

public enum DatabaseOptions {
    static func duration(_ text: String) throws -> Int64 {
        do { return try DurationText.parseMicroseconds(text) } catch { throw OptionValueError("\(error)") }
    }

    static func option(_ key: String, _ defaultText: String?, _ help: String,
                       _ parse: @escaping @Sendable (String, inout DatabaseConfig) throws -> Void) -> DatabaseOption {
        DatabaseOption(key: key, defaultText: defaultText, help: help, parse: parse)
    }

    /// Every option whose value is one piece of text. (The database's path, replicas, spool
    /// directory, id and encryption key are given differently on the command line and in the
    /// file, and are read by each.)
    public static let all: [DatabaseOption] = [
        option("sync-interval", "1s", "How often a segment is cut and shipped; at least 10ms.") { t, c in
            let v = try duration(t)
            guard v >= 10_000 else { throw OptionValueError("must be at least 10ms") }
            c.syncIntervalUs = v
        },
        option("snapshot-interval", "24h", "How often a full snapshot is taken.") { t, c in
            c.snapshotIntervalUs = try duration(t)
        },
        option("checkpoint-frames", "1000", "Checkpoint the WAL once it holds this many frames; at least 10.") { t, c in
            guard let v = Int(t), v >= 10 else { throw OptionValueError("must be a whole number of at least 10, got '\(t)'") }
            c.checkpointFrames = v
        },
        option("read-delay", "100ms", "Wait up to this long after a WAL change before reading it, to read bursts of commits in one pass (at most a tenth of the sync interval; commit times stay precise to a few milliseconds).") { t, c in
            c.readDelayUs = try duration(t)
        },
        option("spool-limit", "1GB", "Spool size past which a failing replica's backlog is dropped (it gets a new generation when it returns). Lowered on its own when the spool's filesystem runs short.") { t, c in
            do { c.spoolLimitBytes = try ByteSize.parse(t) } catch { throw OptionValueError("\(error)") }
        },
        option("retention", "7d", "Keep snapshots this long (always at least one); segments go when no kept snapshot needs them. Points in time stay restorable for this long. At least 1s.") { t, c in
            let v = try duration(t)
            guard v >= 1_000_000 else { throw OptionValueError("must be at least 1s") }
            c.retentionUs = v
        },
        option("compaction", "5m,1h", "Compaction level windows, smallest first: segments are merged into one object per window ('off' to disable). The last level squashes history older than the fine window.") { t, c in
            do { c.compactionLevelsUs = try CompactionLevels.parse(t) } catch { throw OptionValueError("\(error)") }
        },
        option("fine-window", "24h", "Inside this window every transaction stays a restore point; older history keeps only the last compaction level's boundaries.") { t, c in
            c.fineWindowUs = try duration(t)
        },
        option("verify-interval", nil, "Run a restore drill (restore, checksum, integrity_check) against every replica this often, at least 1s; results in metrics and status. Off by default (0s).") { t, c in
            let v = try duration(t)
            guard v == 0 || v >= 1_000_000 else { throw OptionValueError("must be at least 1s (or 0s for never)") }
            c.verifyIntervalUs = v
        },
        option("webhook-url", nil, "POST Slack-compatible JSON alerts here: sync failing, lag too high, failed drill, new generation.") { t, c in
            guard t.hasPrefix("http://") || t.hasPrefix("https://") else { throw OptionValueError("must be an http:// or https:// URL") }
            c.webhookURL = t
        },
        option("alert-lag", "5m", "Alert when replication lag exceeds this.") { t, c in
            c.alertLagUs = try duration(t)
        },
        option("alert-sync-failure", "1m", "Alert when uploads to a replica have failed for this long.") { t, c in
            c.alertSyncFailureUs = try duration(t)
        },
    ]

    public static func named(_ key: String) -> DatabaseOption? { all.first { $0.key == key } }

    /// Sets option `key` from `text`; throws OptionValueError, or for an unknown key.
    public static func apply(_ key: String, _ text: String, to config: inout DatabaseConfig) throws {
        guard let o = named(key) else { throw OptionValueError("unknown option '\(key)'") }
        try o.parse(text, &config)
    }

    /// A database's settings with every option at its default.
    public static func defaults(path: String = "") -> DatabaseConfig {
        var c = DatabaseConfig(path: path, replicas: [])
        for o in all {
            // The defaults are constants checked by the tests: one that does not parse is a bug here.
            if let t = o.defaultText { try! o.parse(t, &c) }
        }
        return c
    }
}
