import WalshipFormat
import WalshipStorage
import WalshipSystem

/// The YAML configuration file (read with MiniYAML): many databases, each with replicas in order of preference.
///
///     defaults:            # optional
///       sync-interval: 1s
///       snapshot-interval: 24h
///       checkpoint-frames: 1000
///     databases:
///       - path: /var/lib/app/app.db
///         sync-interval: 1s        # optional overrides
///         replicas:
///           - url: s3://bucket/app?region=eu-west-1
///             access-key-id: ${AWS_ACCESS_KEY_ID}
///             secret-access-key: ${AWS_SECRET_ACCESS_KEY}
///           - url: file:///var/backups/app
public struct WalshipConfig {
    public var databases: [DatabaseConfig]
    /// `metrics-addr: HOST:PORT`, one endpoint for the whole process.
    public var metricsAddress: String?
}

public struct DatabaseConfig {
    public var path: String
    public var syncIntervalUs: Int64 = 1_000_000
    public var snapshotIntervalUs: Int64 = 86_400_000_000
    public var checkpointFrames = 1000
    public var readDelayUs: Int64 = 100_000
    public var spoolDirectory: String?
    public var spoolLimitBytes: Int64 = 1 << 30
    public var retentionUs: Int64 = OperationsDefaults.retentionUs
    public var fineWindowUs: Int64 = OperationsDefaults.fineWindowUs
    public var compactionLevelsUs: [Int64] = OperationsDefaults.compactionLevelsUs
    public var verifyIntervalUs: Int64 = 0
    public var webhookURL: String?
    public var alertLagUs: Int64 = OperationsDefaults.alertLagUs
    public var alertSyncFailureUs: Int64 = OperationsDefaults.alertSyncFailureUs
    public var replicas: [ReplicaConfig]
    /// `encryption: {key-file: PATH}`: the 32-byte key objects are sealed with.
    public var encryptionKeyFile: String?
    /// `database-id: HEX` (per database): the id recorded in every object and insisted on by
    /// restores made with this file.
    public var databaseID: UInt64?
}

public struct ReplicaConfig {
    public var url: String
    /// Credentials for this replica; nil means the process environment.
    public var environment: [String: String]?
    public init(url: String, environment: [String: String]?) { self.url = url; self.environment = environment }
}

/// A configuration error: where in the file, and what to write instead.
public struct ConfigError: Error, CustomStringConvertible {
    public let file: String
    public let location: String
    public let problem: String
    /// The value names an environment variable that is not set.
    public var unsetVariable = false
    public var description: String { "\(file): \(location.isEmpty ? "" : location + ": ")\(problem)" }
}

public enum ConfigLoader {
    static let topKeys: Set<String> = ["defaults", "databases", "metrics-addr"]
    /// Keys allowed under `defaults:` and per database: the shared options, and `encryption`.
    static let intervalKeys: Set<String> = Set(DatabaseOptions.all.map(\.key)).union(["encryption"])
    static let databaseKeys: Set<String> = intervalKeys.union(["path", "spool-dir", "replicas", "database-id"])
    static let replicaKeys: Set<String> = ["url", "access-key-id", "secret-access-key", "session-token", "region"]

    /// What the file is read for. `replicate` uses every key. The other commands use only a
    /// database's path, spool, replicas, key and id: a variable they do not need (a webhook's,
    /// say) may be unset for them.
    public enum Purpose: Sendable { case replicate, read }

    /// Keys the commands other than `replicate` use.
    static let readKeys: Set<String> = ["path", "spool-dir", "replicas", "encryption", "database-id"]

    public static func load(path: String, purpose: Purpose = .replicate,
                            environment env: [String: String] = ProcessEnvironment.all()) throws -> WalshipConfig {
        let text: String
        do { text = String(decoding: try FS.readAll(path), as: UTF8.self) } catch {
            throw ConfigError(file: path, location: "", problem: "cannot read the config file (\(error))")
        }
        return try parse(text, file: path, purpose: purpose, environment: env)
    }

    public static func parse(_ text: String, file: String, purpose: Purpose = .replicate,
                             environment env: [String: String]) throws -> WalshipConfig {
        /// Runs `body` for `key`; when the key is not one this purpose uses, its errors are
        /// ignored instead of failing.
        func unlessUnneeded(_ key: String, _ body: () throws -> Void) throws {
            // A command that only reads the replicas does not fail over a setting only
            // `replicate` uses: neither an unset variable nor a value `replicate` would refuse.
            do { try body() } catch is ConfigError where purpose == .read && !readKeys.contains(key) {}
        }
        func fail(_ loc: String, _ msg: String) -> ConfigError { ConfigError(file: file, location: loc, problem: msg) }
        /// A relative path in the file is relative to the file's directory, not to wherever
        /// the command runs.
        let baseDir = FS.dirname(FS.absolute(file))
        func resolved(_ p: String) -> String { FS.absolute(p.hasPrefix("/") ? p : baseDir + "/" + p) }
        var metricsAddress: String?
        let root: YAMLNode
        do { root = try MiniYAML.parse(text) } catch {
            throw fail("", "not valid YAML: \(error)")
        }
        if case .empty = root { throw fail("", "the file is empty; it needs a `databases:` list") }
        func mapping(_ n: YAMLNode, _ loc: String, allowed: Set<String>) throws -> [(String, YAMLNode)] {
            guard case .mapping(let m, _) = n else { throw fail(loc, "expected a mapping of keys to values") }
            var out: [(String, YAMLNode)] = []
            for (key, v) in m {
                guard allowed.contains(key) else {
                    throw fail(loc, "unknown key '\(key)' (allowed: \(allowed.sorted().joined(separator: ", ")))")
                }
                out.append((key, v))
            }
            return out
        }
        func scalar(_ n: YAMLNode, _ loc: String) throws -> String {
            guard case .scalar(let s, _) = n else { throw fail(loc, "expected a single value") }
            return try expand(s, loc)
        }
        func expand(_ s: String, _ loc: String) throws -> String {
            var out = ""
            var rest = Substring(s)
            while let start = rest.firstIndex(of: "$") {
                out += rest[..<start]
                let after = rest[rest.index(after: start)...]
                guard after.first == "{", let close = after.firstIndex(of: "}") else { out += "$"; rest = after; continue }
                let inner = String(after[after.index(after: after.startIndex)..<close])
                // ${NAME}, or ${NAME:-default} for a value that may be unset (or empty).
                if let colon = inner.firstIndex(of: ":"), inner[inner.index(after: colon)...].hasPrefix("-") {
                    let name = String(inner[..<colon])
                    let value = env[name] ?? ""
                    out += value.isEmpty ? String(inner[inner.index(colon, offsetBy: 2)...]) : value
                } else {
                    guard let value = env[inner] else {
                        var e = fail(loc, "${\(inner)} is not set in the environment (write ${\(inner):-} for a value that may be empty)")
                        e.unsetVariable = true
                        throw e
                    }
                    out += value
                }
                rest = after[after.index(after: close)...]
            }
            return out + rest
        }
        /// Keys allowed both under `defaults:` and per database.
        func applyCommon(_ k: String, _ v: YAMLNode, _ l: String, _ cfg: inout DatabaseConfig) throws {
            switch k {
            case "encryption":
                for (ek, ev) in try mapping(v, l, allowed: ["key-file"]) {
                    _ = ek
                    // Only its presence is checked here (readers such as `walship status` may not
                    // be allowed to read it); the commands that use it load it.
                    let path = resolved(try scalar(ev, "\(l).key-file"))
                    guard FS.exists(path) else { throw fail("\(l).key-file", "encryption key file \(path) does not exist") }
                    cfg.encryptionKeyFile = path
                }
            default:
                // The options the command line shares (DatabaseOptions): the same rules.
                let text = try scalar(v, l)
                do { try DatabaseOptions.apply(k, text, to: &cfg) } catch { throw fail(l, "\(error)") }
            }
        }
        var template = DatabaseOptions.defaults()
        var databasesNode: YAMLNode?
        for (k, v) in try mapping(root, "", allowed: topKeys) {
            if k == "databases" { databasesNode = v; continue }
            if k == "metrics-addr" { try unlessUnneeded(k) { metricsAddress = try scalar(v, k) }; continue }
            for (dk, dv) in try mapping(v, "defaults", allowed: intervalKeys) {
                try unlessUnneeded(dk) { try applyCommon(dk, dv, "defaults.\(dk)", &template) }
            }
        }
        guard case .sequence(let dbs, _)? = databasesNode, !dbs.isEmpty else { throw fail("databases", "a non-empty list of databases is required") }
        var out: [DatabaseConfig] = []
        var seen: [String: Int] = [:]
        for (i, dbNode) in dbs.enumerated() {
            let loc = "databases[\(i)]"
            var path: String?
            var cfg = template
            var replicaNodes: [YAMLNode]?
            for (k, v) in try mapping(dbNode, loc, allowed: databaseKeys) {
                let l = "\(loc).\(k)"
                switch k {
                case "path": path = try scalar(v, l)
                case "spool-dir": cfg.spoolDirectory = resolved(try scalar(v, l))
                case "database-id":
                    do { cfg.databaseID = try DatabaseID.parse(try scalar(v, l)) } catch { throw fail(l, "\(error)") }
                case "replicas":
                    guard case .sequence(let seq, _) = v else { throw fail(l, "expected a list of replicas") }
                    replicaNodes = seq
                default: try unlessUnneeded(k) { try applyCommon(k, v, l, &cfg) }
                }
            }
            guard let p = path, !p.isEmpty else { throw fail(loc, "'path' (the database file) is required") }
            cfg.path = resolved(p)
            // The same file under two names (a symlink) is the same database too.
            let real = FS.resolved(cfg.path)
            if let j = seen[real] { throw fail(loc, "database \(cfg.path) is listed twice (also databases[\(j)])") }
            seen[real] = i
            if let id = cfg.databaseID, let j = out.firstIndex(where: { $0.databaseID == id }) {
                throw fail("\(loc).database-id", "databases[\(j)] has the same id; each database needs its own")
            }
            for (j, rn) in (replicaNodes ?? []).enumerated() {
                let rl = "\(loc).replicas[\(j)]"
                var url: String?
                var creds: [String: String] = [:]
                for (k, v) in try mapping(rn, rl, allowed: replicaKeys) {
                    let value = try scalar(v, "\(rl).\(k)")
                    // An empty value (`${NAME:-}` unset) gives nothing, rather than hiding
                    // what the process environment has.
                    if k != "url" && value.isEmpty { continue }
                    switch k {
                    case "url": url = value
                    case "access-key-id": creds["AWS_ACCESS_KEY_ID"] = value
                    case "secret-access-key": creds["AWS_SECRET_ACCESS_KEY"] = value
                    case "session-token": creds["AWS_SESSION_TOKEN"] = value
                    default: creds["AWS_REGION"] = value
                    }
                }
                guard let u = url, !u.isEmpty else { throw fail(rl, "'url' is required (file:///path or s3://bucket/prefix)") }
                let backend: ReplicaBackend
                do { backend = try ReplicaBackends.backend(for: u) } catch { throw fail(rl, "\(error)") }
                if !creds.isEmpty && !backend.takesCredentials {
                    throw fail(rl, "access-key-id, secret-access-key, session-token and region do not apply to \(backend.scheme) replicas")
                }
                let replicaEnv = creds.isEmpty ? nil : env.merging(creds) { _, b in b }
                // Validate the URL now, so a typo fails at start-up with its location.
                do { try backend.validate(u, replicaEnv ?? env) } catch { throw fail(rl, "\(error)") }
                cfg.replicas.append(ReplicaConfig(url: u, environment: replicaEnv))
            }
            if cfg.replicas.isEmpty {
                cfg.replicas.append(ReplicaConfig(url: DatabaseConfig.defaultReplicaURL(forDatabase: cfg.path), environment: nil))
            }
            out.append(cfg)
        }
        return WalshipConfig(databases: out, metricsAddress: metricsAddress)
    }
}

/// Defaults of the operations settings (retention, compaction, alerts).
public enum OperationsDefaults {
    public static let retentionUs: Int64 = 7 * 86_400_000_000
    public static let fineWindowUs: Int64 = 86_400_000_000
    public static let compactionLevelsUs: [Int64] = [300_000_000, 3_600_000_000]
    public static let alertLagUs: Int64 = 300_000_000
    public static let alertSyncFailureUs: Int64 = 60_000_000
}

extension DatabaseConfig {
    /// The replica of a database given none: a directory beside it, `<db>-replica`.
    public static func defaultReplicaURL(forDatabase db: String) -> String {
        "file://" + FS.dirname(db) + "/" + FS.basename(db) + "-replica"
    }
}
