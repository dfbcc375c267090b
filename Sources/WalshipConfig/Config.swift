#if canImport(Glibc)
import Glibc
#endif
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
///     status-file: /run/walship/status.json   # optional: one status file for the process
///     directories:                 # optional: every database found in a directory
///       - path: /var/lib/tenants
///         pattern: "*.db"          # the default
///         replicas:
///           - url: s3://bucket/tenants/{name}   # {name}: the database's file name
public struct WalshipConfig {
    public var databases: [DatabaseConfig]
    /// `directories:`: every database that matches a pattern in a directory, found while running.
    public var directories: [DirectoryConfig] = []
    /// `metrics-addr: HOST:PORT`, one endpoint for the whole process.
    public var metricsAddress: String?
    /// `status-file: PATH`: one status file for the whole process, read by `walship status`.
    public var statusFile: String?
}

extension WalshipConfig {
    /// The settings of the database at `path`: listed under `databases:`, or in one of the
    /// `directories:` (its name matching there).
    public func database(at path: String) -> DatabaseConfig? {
        if let d = databases.first(where: { $0.path == path }) { return d }
        let dir = FS.dirname(path), name = FS.basename(path)
        return directories.first { $0.path == dir && $0.matches(name: name) }?.database(named: name)
    }
}

public struct DatabaseConfig: Sendable {
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

public struct ReplicaConfig: Sendable {
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
    static let topKeys: Set<String> = ["defaults", "databases", "directories", "metrics-addr", "status-file"]
    /// Keys allowed under `defaults:` and per database: the shared options, and `encryption`.
    static let intervalKeys: Set<String> = Set(DatabaseOptions.all.map(\.key)).union(["encryption"])
    static let databaseKeys: Set<String> = intervalKeys.union(["path", "spool-dir", "replicas", "database-id"])
    static let replicaKeys: Set<String> = ["url", "access-key-id", "secret-access-key", "session-token", "region"]
    static let directoryKeys: Set<String> = intervalKeys.union(["path", "pattern", "replicas"])

    /// What the file is read for. `replicate` uses every key. The other commands use only a
    /// database's path, spool, replicas, key and id: a variable they do not need (a webhook's,
    /// say) may be unset for them.
    public enum Purpose: Sendable { case replicate, read }

    /// Keys the commands other than `replicate` use.
    static let readKeys: Set<String> = ["path", "spool-dir", "replicas", "encryption", "database-id", "status-file"]

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
        var statusFile: String?
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
        /// The replicas under `loc` (`nameTemplate`: their URLs hold `{name}`, filled in per
        /// database found in a directory).
        func replicaList(_ nodes: [YAMLNode], _ loc: String, nameTemplate: Bool) throws -> [ReplicaConfig] {
            var list: [ReplicaConfig] = []
            for (j, rn) in nodes.enumerated() {
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
                if nameTemplate, let problem = DirectoryConfig.templateProblem(u) {
                    throw fail("\(rl).url", "a directory's replica URL: \(problem)")
                }
                let backend: ReplicaBackend
                do { backend = try ReplicaBackends.backend(for: u) } catch { throw fail(rl, "\(error)") }
                if !creds.isEmpty && !backend.takesCredentials {
                    throw fail(rl, "access-key-id, secret-access-key, session-token and region do not apply to \(backend.scheme) replicas")
                }
                let replicaEnv = creds.isEmpty ? nil : env.merging(creds) { _, b in b }
                // Validate the URL now, so a typo fails at start-up with its location.
                let sample = nameTemplate ? DirectoryConfig.fill(u, name: "example.db") : u
                do { try backend.validate(sample, replicaEnv ?? env) } catch { throw fail(rl, "\(error)") }
                list.append(ReplicaConfig(url: u, environment: replicaEnv))
            }
            return list
        }
        var template = DatabaseOptions.defaults()
        var databasesNode: YAMLNode?
        var directoriesNode: YAMLNode?
        for (k, v) in try mapping(root, "", allowed: topKeys) {
            if k == "databases" { databasesNode = v; continue }
            if k == "directories" { directoriesNode = v; continue }
            if k == "status-file" { try unlessUnneeded(k) { statusFile = resolved(try scalar(v, k)) }; continue }
            if k == "metrics-addr" { try unlessUnneeded(k) { metricsAddress = try scalar(v, k) }; continue }
            for (dk, dv) in try mapping(v, "defaults", allowed: intervalKeys) {
                try unlessUnneeded(dk) { try applyCommon(dk, dv, "defaults.\(dk)", &template) }
            }
        }
        var dbs: [YAMLNode] = []
        if let n = databasesNode {
            guard case .sequence(let list, _) = n, !list.isEmpty else { throw fail("databases", "expected a non-empty list of databases") }
            dbs = list
        }
        var dirs: [YAMLNode] = []
        if let n = directoriesNode {
            guard case .sequence(let list, _) = n, !list.isEmpty else { throw fail("directories", "expected a non-empty list of directories") }
            dirs = list
        }
        if dbs.isEmpty && dirs.isEmpty { throw fail("databases", "a non-empty list of databases (or of directories) is required") }
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
            cfg.replicas = try replicaList(replicaNodes ?? [], loc, nameTemplate: false)
            if cfg.replicas.isEmpty {
                cfg.replicas.append(ReplicaConfig(url: DatabaseConfig.defaultReplicaURL(forDatabase: cfg.path), environment: nil))
            }
            out.append(cfg)
        }
        var directories: [DirectoryConfig] = []
        for (i, node) in dirs.enumerated() {
            let loc = "directories[\(i)]"
            var path: String?
            var pattern = DirectoryConfig.defaultPattern
            var cfg = template
            var replicaNodes: [YAMLNode] = []
            for (k, v) in try mapping(node, loc, allowed: directoryKeys) {
                let l = "\(loc).\(k)"
                switch k {
                case "path": path = try scalar(v, l)
                case "pattern":
                    pattern = try scalar(v, l)
                    if pattern.isEmpty || pattern.contains("/") { throw fail(l, "a pattern matches file names in the directory (like *.db): no '/', not empty") }
                case "replicas":
                    guard case .sequence(let seq, _) = v else { throw fail(l, "expected a list of replicas") }
                    replicaNodes = seq
                default: try unlessUnneeded(k) { try applyCommon(k, v, l, &cfg) }
                }
            }
            guard let p = path, !p.isEmpty else { throw fail(loc, "'path' (the directory) is required") }
            let dir = resolved(p)
            cfg.replicas = try replicaList(replicaNodes, loc, nameTemplate: true)
            if let j = directories.firstIndex(where: { FS.resolved($0.path) == FS.resolved(dir) && $0.pattern == pattern }) {
                throw fail(loc, "directory \(dir) with pattern \(pattern) is listed twice (also directories[\(j)])")
            }
            directories.append(DirectoryConfig(path: dir, pattern: pattern, settings: cfg))
        }
        return WalshipConfig(databases: out, directories: directories, metricsAddress: metricsAddress, statusFile: statusFile)
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
    /// A plain path, never percent-decoded (a `file://` URL would decode `%2F` in a name).
    public static func defaultReplicaURL(forDatabase db: String) -> String {
        FS.dirname(db) + "/" + FS.basename(db) + "-replica"
    }
}

/// A directory whose databases are replicated as they appear (`replicate --dir`, or a config
/// file's `directories:`). `settings` applies to each; its replica URLs hold `{name}`.
public struct DirectoryConfig: Sendable {
    public static let namePlaceholder = "{name}"
    public static let defaultPattern = "*.db"

    public var path: String
    public var pattern: String
    /// Every database's settings; `path` is unset and replica URLs are templates.
    public var settings: DatabaseConfig

    public init(path: String, pattern: String, settings: DatabaseConfig) {
        self.path = path
        self.pattern = pattern
        self.settings = settings
    }

    /// Why a replica URL template would not give each database a place of its own, or nil:
    /// `{name}` must be in its path (before any `?`), not in the query (an endpoint or a
    /// region chosen by a file name would send the credentials, or every database, elsewhere).
    public static func templateProblem(_ template: String) -> String? {
        let path = template.split(separator: "?", maxSplits: 1, omittingEmptySubsequences: false).first.map(String.init) ?? ""
        if path.firstRange(of: namePlaceholder) == nil {
            return "put {name} where the database's file name goes, in the URL's path (not its query), so that each database has a replica of its own"
        }
        if let q = template.firstIndex(of: "?"), template[q...].firstRange(of: namePlaceholder) != nil {
            return "{name} may appear only in the URL's path, not in its query"
        }
        // In scheme://host-or-bucket/path, the name goes in the path: a bucket (or host)
        // chosen by a file name would send every database, and the credentials, elsewhere.
        if let r = template.firstRange(of: "://") {
            let rest = template[r.upperBound...]
            let authority = rest.prefix { $0 != "/" }
            if authority.firstRange(of: namePlaceholder) != nil {
                return "{name} may appear only in the URL's path, not in its bucket or host"
            }
        }
        return nil
    }

    /// A replica URL template with `{name}` replaced by a file name. In a URL the name is
    /// percent-encoded (the URL's path is decoded when it is read), so that no file name can
    /// add a query, a fragment or another directory to it; in a plain path it goes as is.
    public static func fill(_ template: String, name: String) -> String {
        let value = template.hasPrefix("/") ? name : URIEncoding.encode(name, keepSlash: false)
        var out = ""
        var rest = Substring(template)
        while let r = rest.firstRange(of: namePlaceholder) {
            out += rest[..<r.lowerBound] + value
            rest = rest[r.upperBound...]
        }
        return out + rest
    }

    /// Whether a file name is one of this directory's databases: it matches the pattern, is
    /// not hidden (the agent's own spools and scratch files start with a dot), and is not a
    /// database's companion file (-wal, -shm, -journal).
    public func matches(name: String) -> Bool {
        if name.hasPrefix(".") || name.hasSuffix("-wal") || name.hasSuffix("-shm") || name.hasSuffix("-journal") { return false }
        return fnmatch(pattern, name, 0) == 0
    }

    /// The databases in the directory now: matching names that are regular files (a symbolic
    /// link is not followed: the directory may be writable by others) and start with SQLite's
    /// header. A file still being created (shorter than the header) is not one yet.
    ///
    /// Reading the header opens the file, and closing any descriptor of a database drops every
    /// POSIX lock this process holds on it (SQLite's among them): so a name in `known` (its
    /// agent runs in this process) is only looked up, never opened, and neither is a file whose
    /// identity (device, inode) is in `taken` (a hard link to a database replicated here).
    public func databasesPresent(known: Set<String> = [], taken: Set<FileIdentity> = [],
                                 skipped: (String, String) -> Void = { _, _ in }) throws -> [String] {
        var out: [String] = []
        for name in try FS.list(path).sorted() where matches(name: name) {
            var st = stat()
            guard lstat(path + "/" + name, &st) == 0, (st.st_mode & S_IFMT) == S_IFREG else { continue }
            if known.contains(name) { out.append(name); continue }
            // A file with another name (a hard link) may be a database replicated here, or its
            // -wal or -shm: never opened, and not replicated (said once through `skipped`).
            guard st.st_size >= 100, !taken.contains(FileIdentity(st)) else { continue }
            if st.st_nlink > 1 {
                skipped(name, "it has \(st.st_nlink) names (hard links): a database is replicated under one name only, so give it one")
                continue
            }
            guard let f = try? RawFile.openIfExists(path + "/" + name, flags: O_RDONLY | O_NOFOLLOW | O_NONBLOCK) else { continue }
            // Swapped between the look and the open: the file opened is not the one looked
            // at, and may be one whose locks this process holds; its descriptor stays open.
            var opened = stat()
            guard fstat(f.fd, &opened) == 0, FileIdentity(opened) == FileIdentity(st), opened.st_nlink == 1 else {
                f.keepOpenIfHeld()
                continue
            }
            guard let head = try? f.read(at: 0, count: 16), head == Array("SQLite format 3\0".utf8) else { continue }
            out.append(name)
        }
        return out
    }

    /// The settings of the database `name` in this directory.
    public func database(named name: String) -> DatabaseConfig {
        var d = settings
        d.path = path + "/" + name
        d.replicas = settings.replicas.map { ReplicaConfig(url: Self.fill($0.url, name: name), environment: $0.environment) }
        if d.replicas.isEmpty {
            // A plain path, which is never percent-decoded: a name like `a%2F..%2Fb.db` stays
            // one name (as a file:// URL it would climb out of the directory).
            d.replicas = [ReplicaConfig(url: d.path + "-replica", environment: nil)]
        }
        return d
    }
}
