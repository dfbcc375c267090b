#if canImport(Glibc)
import Glibc
#endif
import WalshipCurl
import WalshipFormat
import WalshipCrypto
import WalshipStorage
import WalshipSystem

/// Where an S3 replica lives and how to reach it, parsed from
/// s3://bucket/prefix?endpoint=URL&region=R&path-style=true plus the environment.
public struct S3Location: Sendable {
    public var bucket: String
    public var prefix: String
    public var endpoint: String     // scheme://host[:port], no trailing slash
    public var region: String
    public var pathStyle: Bool
    public var accessKey: String
    public var secretKey: String
    public var sessionToken: String?
    public var caBundle: String?

    public static func parse(_ url: String, environment env: [String: String] = ProcessEnvironment.all()) throws -> S3Location {
        guard url.hasPrefix("s3://") else { throw ReplicaError.badURL(url, "an S3 URL starts with s3://") }
        var rest = String(url.dropFirst(5))
        var query = ""
        if let q = rest.firstIndex(of: "?") { query = String(rest[rest.index(after: q)...]); rest = String(rest[..<q]) }
        let slash = rest.firstIndex(of: "/")
        let bucket = String(slash.map { rest[..<$0] } ?? Substring(rest))
        guard !bucket.isEmpty else { throw ReplicaError.badURL(url, "the bucket name is missing: use s3://bucket/prefix") }
        var prefix = slash.map { URIEncoding.decode(String(rest[rest.index(after: $0)...])) } ?? ""
        while prefix.hasSuffix("/") { prefix.removeLast() }
        while prefix.hasPrefix("/") { prefix.removeFirst() }
        var params: [String: String] = [:]
        var unknown: String?
        for item in query.split(separator: "&") where !item.isEmpty {
            let kv = item.split(separator: "=", maxSplits: 1).map(String.init)
            let key = URIEncoding.decode(kv[0], plusAsSpace: true)
            guard ["endpoint", "region", "path-style"].contains(key) else { unknown = unknown ?? key; continue }
            params[key] = kv.count > 1 ? URIEncoding.decode(kv[1], plusAsSpace: true) : ""
        }
        if params["endpoint"]?.contains("@") == true {
            // Whatever precedes it may be a secret: the URL is shown without the endpoint.
            let shown = "s3://\(bucket)/\(prefix)?endpoint=(withheld)"
            throw ReplicaError.badURL(shown, "the endpoint holds credentials (user:password@): give them in AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, never in the URL")
        }
        if let key = unknown { throw ReplicaError.badURL(url, "unknown parameter '\(key)': use endpoint, region or path-style") }
        let region = params["region"] ?? env["AWS_REGION"] ?? env["AWS_DEFAULT_REGION"] ?? "us-east-1"
        // An empty endpoint (`endpoint=${S3_ENDPOINT:-}` in a config, unset) means AWS.
        if params["endpoint"]?.isEmpty == true { params["endpoint"] = nil }
        var endpoint = params["endpoint"] ?? "https://s3.\(region).amazonaws.com"
        while endpoint.hasSuffix("/") { endpoint.removeLast() }
        guard endpoint.hasPrefix("http://") || endpoint.hasPrefix("https://") else {
            throw ReplicaError.badURL(url, "endpoint must start with http:// or https://")
        }
        var pathStyle = params["endpoint"] != nil
        if let p = params["path-style"] {
            guard let v = ["true": true, "false": false, "1": true, "0": false][p.lowercased()] else {
                throw ReplicaError.badURL(url, "path-style must be true or false")
            }
            pathStyle = v
        }
        guard let ak = env["AWS_ACCESS_KEY_ID"], !ak.isEmpty, let sk = env["AWS_SECRET_ACCESS_KEY"], !sk.isEmpty else {
            throw ReplicaError.badURL(url, "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        }
        return S3Location(bucket: bucket, prefix: prefix, endpoint: endpoint, region: region, pathStyle: pathStyle,
                          accessKey: ak, secretKey: sk, sessionToken: env["AWS_SESSION_TOKEN"].flatMap { $0.isEmpty ? nil : $0 },
                          caBundle: env["AWS_CA_BUNDLE"] ?? env["CURL_CA_BUNDLE"] ?? env["SSL_CERT_FILE"])
    }

    /// The display form: no credentials.
    public var display: String {
        "s3://\(bucket)/\(prefix)?endpoint=\(endpoint)&region=\(region)&path-style=\(pathStyle)"
    }
}

/// An S3 error answer: HTTP status plus S3's code and message.
public struct S3Error: ReplicaOutageTelling, CustomStringConvertible {
    public let status: Int
    public let code: String
    public let message: String
    public let operation: String
    public let endpoint: String

    /// Server errors, a request timeout and throttling (S3 may answer those with 400 or 200
    /// and a code): the store is down or busy.
    public var isOutage: Bool { status >= 500 || status == 408 || status == 429 || code == "SlowDown" || code == "RequestTimeout" }

    public var isRetryable: Bool { status >= 500 || status == 429 || code == "SlowDown" || code == "RequestTimeout" }

    public var description: String {
        var hint = ""
        switch code {
        case "SignatureDoesNotMatch", "InvalidAccessKeyId", "AccessDenied", "InvalidToken", "ExpiredToken":
            hint = ": check AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) for this endpoint"
        case "NoSuchBucket": hint = ": the bucket does not exist at this endpoint; create it or fix the URL"
        default: if status == 403 { hint = ": access denied; check the credentials and the bucket policy" }
        }
        return "S3 \(operation) at \(endpoint) failed: HTTP \(status) \(code.isEmpty ? "" : code + " ")\(message)\(hint)"
    }
}

/// A replica in an S3-compatible bucket, over libcurl with its built-in SigV4 signing.
public final class S3Replica: Replica {
    public let location: S3Location
    private let client = HTTPClient()
    private let mutex = Mutex()
    public var multipartThreshold = 64 << 20
    public var partSize = 16 << 20
    public var maxAttempts = 6
    /// Requests made, by kind (for metrics and the bench).
    public let requestCounts = Counters()

    public init(location: S3Location, environment env: [String: String] = ProcessEnvironment.all()) {
        self.location = location
        client.caBundle = location.caBundle
        // Tuning knobs, mostly for tests: sizes in bytes.
        if let t = env["WALSHIP_S3_MULTIPART_THRESHOLD"].flatMap(Int.init), t >= 5 << 20 { multipartThreshold = t }
        if let p = env["WALSHIP_S3_PART_SIZE"].flatMap(Int.init), p >= 5 << 20 { partSize = p }
    }

    public var displayURL: String { location.display }
    public var readsAhead: Bool { true }
    public func failFast() { maxAttempts = 2 }
    /// A new handle (its own connection): one handle serves one request at a time.
    public func anotherHandle() throws -> Replica { S3Replica(location: location) }

    private var sign: SigV4 { SigV4(accessKey: location.accessKey, secretKey: location.secretKey, region: location.region) }

    private func fullKey(_ key: String) -> String { location.prefix.isEmpty ? key : location.prefix + "/" + key }

    private func url(key: String?, query: [(String, String)] = []) -> String {
        let path = key.map { "/" + URIEncoding.encode(fullKey($0), keepSlash: true) } ?? "/"
        var base: String
        if location.pathStyle {
            base = location.endpoint + "/" + URIEncoding.encode(location.bucket, keepSlash: false) + path
        } else {
            let scheme = location.endpoint.hasPrefix("https://") ? "https://" : "http://"
            base = scheme + location.bucket + "." + String(location.endpoint.dropFirst(scheme.count)) + path
        }
        if !query.isEmpty { base += "?" + URIEncoding.canonicalQuery(query) }
        return base
    }

    private func headers(_ extra: [String] = []) -> [String] {
        var h = extra
        if let t = location.sessionToken { h.append("x-amz-security-token: \(t)") }
        return h
    }

    /// One request with retries (capped exponential backoff with jitter) on 5xx, 429,
    /// timeouts and connection errors. Non-2xx answers that are not retryable throw S3Error.
    @discardableResult
    private func request(_ kind: String, _ method: String, key: String?, query: [(String, String)] = [],
                         headers extra: [String] = [], body: RequestBody = .none, describe: String,
                         okStatuses: Set<Int> = [], sink: ((UnsafeRawBufferPointer) throws -> Void)? = nil,
                         beforeRetry: () -> Void = {}) throws -> HTTPResponse {
        var attempt = 0
        var delayMs = 200
        while true {
            attempt += 1
            requestCounts.add(kind)
            do {
                let r = try client.perform(method: method, url: url(key: key, query: query), headers: headers(extra),
                                           body: body, sign: sign, sink: sink)
                if (200..<300).contains(r.status) || okStatuses.contains(r.status) { return r }
                let err = S3Error(status: r.status, code: xmlValue(r.body, "Code") ?? "", message: xmlValue(r.body, "Message") ?? "",
                                  operation: describe, endpoint: location.endpoint)
                if !err.isRetryable || attempt >= maxAttempts { throw err }
            } catch let e as CurlError {
                if !e.isTransient || attempt >= maxAttempts {
                    throw ReplicaError.io(displayURL, "\(describe): \(e.message) (curl error \(e.code)); \(e.hint(endpoint: location.endpoint))")
                }
            }
            beforeRetry()
            let jitter = Int.random(in: 0...(delayMs / 2))
            usleep(UInt32((delayMs + jitter) * 1000))
            delayMs = min(delayMs * 2, 5_000)
        }
    }

    // MARK: Replica

    public func prepareForWriting() throws {
        try mutex.locked {
            let keys = try topLevelLocked()
            let foreign = keys.filter { $0 != "generations/" && $0 != replicaMarkerKey }
            if !foreign.isEmpty {
                throw ReplicaError.notAReplica(displayURL, "the prefix holds other objects (\(foreign.prefix(3).joined(separator: ", "))); choose an empty or new prefix")
            }
            if !keys.contains(replicaMarkerKey) {
                try putBytesLocked(key: replicaMarkerKey, bytes: Array("{\"format\":\"walship-replica\",\"version\":1}\n".utf8))
            }
        }
    }

    public func checkReadable() throws {
        try mutex.locked {
            let keys = try topLevelLocked()
            guard keys.contains(replicaMarkerKey) || keys.contains("generations/") else {
                throw ReplicaError.notAReplica(displayURL, keys.isEmpty ? "nothing is stored under this prefix" : "it holds other objects and no \(replicaMarkerKey)")
            }
        }
    }

    public func isEmpty() throws -> Bool {
        try mutex.locked {
            let keys = try topLevelLocked()
            if keys.isEmpty { return true }
            guard keys.contains(replicaMarkerKey) || keys.contains("generations/") else {
                throw ReplicaError.notAReplica(displayURL, "it holds other objects (\(keys.prefix(3).joined(separator: ", "))) and no \(replicaMarkerKey): is the prefix right?")
            }
            return false
        }
    }

    public func put(key: String, bytes: [UInt8]) throws {
        try mutex.locked { try putBytesLocked(key: key, bytes: bytes) }
    }

    private func putBytesLocked(key: String, bytes: [UInt8]) throws {
        try request("PUT", "PUT", key: key, headers: ["x-amz-content-sha256: \(SHA256.hexDigest(bytes))", "Content-Type: application/octet-stream"],
                    body: .bytes(bytes), describe: "PUT \(location.bucket)/\(fullKey(key))")
    }

    public func put(key: String, fromFile path: String) throws {
        guard let size = FS.fileSize(path) else { throw SystemError(errno: ENOENT, context: "upload source \(path)") }
        try mutex.locked {
            if size > multipartThreshold {
                try multipartUpload(key: key, path: path, size: size)
            } else {
                let sum = try sha256(path: path, offset: 0, length: size)
                try request("PUT", "PUT", key: key, headers: ["x-amz-content-sha256: \(sum)", "Content-Type: application/octet-stream"],
                            body: .file(path: path, offset: 0, length: size), describe: "PUT \(location.bucket)/\(fullKey(key))")
            }
        }
    }

    private func sha256(path: String, offset: Int, length: Int) throws -> String {
        let f = try RawFile(path: path, flags: O_RDONLY)
        var h = SHA256()
        var buf = [UInt8](repeating: 0, count: 1 << 18)
        var done = 0
        while done < length {
            let n = try buf.withUnsafeMutableBytes { try f.read(at: offset + done, into: UnsafeMutableRawBufferPointer(rebasing: $0[0..<min($0.count, length - done)])) }
            if n == 0 { break }
            buf.withUnsafeBytes { h.update(UnsafeRawBufferPointer(rebasing: $0[0..<n])) }
            done += n
        }
        return SHA256.hex(h.finalize())
    }

    /// Multipart upload: parts stream from the file, so memory stays bounded whatever the size.
    /// A failed upload is aborted so no parts are left behind.
    private func multipartUpload(key: String, path: String, size: Int) throws {
        let what = "\(location.bucket)/\(fullKey(key))"
        let created = try request("POST", "POST", key: key, query: [("uploads", "")],
                                  headers: ["x-amz-content-sha256: \(SHA256.hexDigest([]))"], describe: "create multipart upload \(what)")
        guard let uploadID = xmlValue(created.body, "UploadId") else {
            throw ReplicaError.io(displayURL, "create multipart upload \(what): no UploadId in the answer")
        }
        do {
            var parts: [(Int, String)] = []
            var offset = 0
            var number = 1
            while offset < size {
                let len = min(partSize, size - offset)
                let sum = try sha256(path: path, offset: offset, length: len)
                let r = try request("PUT", "PUT", key: key, query: [("partNumber", "\(number)"), ("uploadId", uploadID)],
                                    headers: ["x-amz-content-sha256: \(sum)"], body: .file(path: path, offset: offset, length: len),
                                    describe: "upload part \(number) of \(what)")
                guard let etag = r.headers["etag"] else { throw ReplicaError.io(displayURL, "upload part \(number) of \(what): no ETag") }
                parts.append((number, etag))
                offset += len; number += 1
            }
            var xml = "<CompleteMultipartUpload>"
            for (n, e) in parts { xml += "<Part><PartNumber>\(n)</PartNumber><ETag>\(xmlEscape(e))</ETag></Part>" }
            xml += "</CompleteMultipartUpload>"
            let body = Array(xml.utf8)
            let done = try request("POST", "POST", key: key, query: [("uploadId", uploadID)],
                                   headers: ["x-amz-content-sha256: \(SHA256.hexDigest(body))", "Content-Type: application/xml"],
                                   body: .bytes(body), describe: "complete multipart upload \(what)")
            if xmlValue(done.body, "Code") != nil {   // S3 can answer 200 with an error body
                throw S3Error(status: 200, code: xmlValue(done.body, "Code") ?? "", message: xmlValue(done.body, "Message") ?? "",
                              operation: "complete multipart upload \(what)", endpoint: location.endpoint)
            }
        } catch {
            _ = try? request("DELETE", "DELETE", key: key, query: [("uploadId", uploadID)], describe: "abort multipart upload \(what)", okStatuses: [404])
            throw error
        }
    }

    public func get(key: String, _ handle: (UnsafeRawBufferPointer) throws -> Void) throws {
        try withoutActuallyEscaping(handle) { handle in try getLocked(key: key, handle) }
    }

    private func getLocked(key: String, _ handle: @escaping (UnsafeRawBufferPointer) throws -> Void) throws {
        try mutex.locked {
            var received = 0
            let what = "GET \(location.bucket)/\(fullKey(key))"
            var attempt = 0
            while true {
                attempt += 1
                do {
                    let range = received > 0 ? ["Range: bytes=\(received)-"] : []
                    // A server may ignore Range and send the whole object again (status 200,
                    // no Content-Range): then the bytes already handed on are skipped.
                    var skip = 0
                    let r = try client.perform(method: "GET", url: url(key: key), headers: headers(range + ["x-amz-content-sha256: \(SHA256.hexDigest([]))"]),
                                               sign: sign, onHeaders: { _, h in
                        guard received > 0 else { return }
                        let start = h["content-range"].flatMap { cr -> Int? in
                            guard cr.hasPrefix("bytes "), let dash = cr.firstIndex(of: "-") else { return nil }
                            return Int(cr[cr.index(cr.startIndex, offsetBy: 6)..<dash])
                        } ?? 0
                        guard start == received || start == 0 else {
                            throw ReplicaError.io(self.displayURL, "\(what): asked to resume at byte \(received), the server answered from byte \(start)")
                        }
                        skip = received - start
                    }) { chunk in
                        var c = chunk
                        if skip > 0 {
                            let n = min(skip, c.count)
                            skip -= n
                            c = UnsafeRawBufferPointer(rebasing: c[n...])
                            if c.isEmpty { return }
                        }
                        try handle(c)
                        received += c.count
                    }
                    requestCounts.add("GET")
                    if (200..<300).contains(r.status) { return }
                    if r.status == 404 { throw ReplicaError.missingObject(displayURL, key) }
                    let err = S3Error(status: r.status, code: xmlValue(r.body, "Code") ?? "", message: xmlValue(r.body, "Message") ?? "",
                                      operation: what, endpoint: location.endpoint)
                    if !err.isRetryable || attempt >= maxAttempts { throw err }
                } catch let e as CurlError {
                    requestCounts.add("GET")
                    if !e.isTransient || attempt >= maxAttempts {
                        throw ReplicaError.io(displayURL, "\(what): \(e.message) (curl error \(e.code)); \(e.hint(endpoint: location.endpoint))")
                    }
                }
                usleep(UInt32(min(200 << attempt, 5000) * 1000))   // then resume from `received`
            }
        }
    }

    public func list(prefix: String) throws -> [String] {
        try mutex.locked { try listLocked(prefix: prefix, maxKeys: 1000, stopEarly: false) }
    }

    /// The objects and "folders" (common prefixes, ending in "/") right under the replica's prefix.
    private func topLevelLocked() throws -> [String] {
        var out: [String] = []
        var token: String?
        let base = location.prefix.isEmpty ? "" : location.prefix + "/"
        repeat {
            var q: [(String, String)] = [("delimiter", "/"), ("list-type", "2"), ("prefix", base)]
            if let t = token { q.append(("continuation-token", t)) }
            let r = try request("LIST", "GET", key: nil, query: q, headers: ["x-amz-content-sha256: \(SHA256.hexDigest([]))"],
                                describe: "LIST \(location.bucket)/\(base)")
            for k in xmlValues(r.body, "Key") + xmlValues(r.body, "Prefix") where k.hasPrefix(base) && k.count > base.count {
                out.append(String(k.dropFirst(base.count)))
            }
            token = xmlValue(r.body, "IsTruncated") == "true" ? xmlValue(r.body, "NextContinuationToken") : nil
        } while token != nil
        return out
    }

    private func listLocked(prefix: String, maxKeys: Int, stopEarly: Bool) throws -> [String] {
        var keys: [String] = []
        var token: String?
        let base = location.prefix.isEmpty ? "" : location.prefix + "/"
        repeat {
            var q: [(String, String)] = [("list-type", "2"), ("prefix", base + prefix), ("max-keys", "\(maxKeys)")]
            if let t = token { q.append(("continuation-token", t)) }
            let r = try request("LIST", "GET", key: nil, query: q, headers: ["x-amz-content-sha256: \(SHA256.hexDigest([]))"],
                                describe: "LIST \(location.bucket)/\(base + prefix)")
            for k in xmlValues(r.body, "Key") where k.hasPrefix(base) { keys.append(String(k.dropFirst(base.count))) }
            token = xmlValue(r.body, "IsTruncated") == "true" ? xmlValue(r.body, "NextContinuationToken") : nil
        } while token != nil && !stopEarly
        return keys.sorted()
    }

    /// Deletes with DeleteObjects, 1000 keys a request; falls back to one DELETE a key on
    /// servers without it (GCS's XML API, for one).
    public func delete(keys: [String]) throws {
        try mutex.locked {
            var rest = keys[...]
            while !rest.isEmpty {
                let batch = Array(rest.prefix(1000))
                rest = rest.dropFirst(batch.count)
                if batchDeleteUnsupported || batch.count == 1 { try deleteOneByOne(batch); continue }
                var xml = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Delete xmlns=\"http://s3.amazonaws.com/doc/2006-03-01/\"><Quiet>true</Quiet>"
                for k in batch { xml += "<Object><Key>\(xmlEscape(fullKey(k)))</Key></Object>" }
                xml += "</Delete>"
                let body = Array(xml.utf8)
                let r = try request("DELETE", "POST", key: nil, query: [("delete", "")],
                                    headers: ["x-amz-content-sha256: \(SHA256.hexDigest(body))", "Content-MD5: \(Base64.encode(md5Digest(body)))",
                                              "Content-Type: application/xml"],
                                    body: .bytes(body), describe: "DeleteObjects \(location.bucket) (\(batch.count) keys)",
                                    okStatuses: [400, 405, 501])
                if r.status != 200 {
                    batchDeleteUnsupported = true
                    try deleteOneByOne(batch)
                    continue
                }
                let failed = xmlValues(r.body, "Error")
                if !failed.isEmpty {
                    let code = xmlValue(r.body, "Code") ?? "", key = xmlValue(r.body, "Key") ?? ""
                    throw ReplicaError.io(displayURL, "DeleteObjects could not delete \(failed.count) of \(batch.count) keys (first: \(key): \(code))")
                }
            }
        }
    }

    private var batchDeleteUnsupported = false

    private func deleteOneByOne(_ keys: [String]) throws {
        for k in keys {
            try request("DELETE", "DELETE", key: k, headers: ["x-amz-content-sha256: \(SHA256.hexDigest([]))"],
                        describe: "DELETE \(location.bucket)/\(fullKey(k))", okStatuses: [404])
        }
    }

    /// A 404 is confirmed by a LIST of the key's prefix before it counts as gone: a store
    /// (or a cache in front of one) that answers a HEAD wrongly must not make the agent drop
    /// a generation that is there.
    public func contains(key: String) throws -> Bool {
        let found: Bool = try mutex.locked {
            let r = try request("HEAD", "HEAD", key: key, headers: ["x-amz-content-sha256: \(SHA256.hexDigest([]))"],
                                describe: "HEAD \(location.bucket)/\(fullKey(key))", okStatuses: [404])
            return r.status != 404
        }
        if found { return true }
        return try list(prefix: key).contains(key)
    }

    public func head(key: String) throws -> Int? {
        try mutex.locked {
            let r = try request("HEAD", "HEAD", key: key, headers: ["x-amz-content-sha256: \(SHA256.hexDigest([]))"],
                                describe: "HEAD \(location.bucket)/\(fullKey(key))", okStatuses: [404])
            return r.status == 404 ? nil : Int(r.headers["content-length"] ?? "")
        }
    }
}

/// The S3 backend (s3://bucket/prefix?endpoint=URL&region=R&path-style=true), for the
/// replica registry.
public enum S3Backend {
    public static let backend = ReplicaBackend(
        scheme: "s3", usage: "s3://bucket/prefix?endpoint=URL", takesCredentials: true,
        validate: { url, env in _ = try S3Location.parse(url, environment: env) },
        open: { url, env in S3Replica(location: try S3Location.parse(url, environment: env), environment: env) })

    /// Makes s3:// URLs work wherever replicas are named.
    public static func register() { ReplicaBackends.register(backend) }
}
