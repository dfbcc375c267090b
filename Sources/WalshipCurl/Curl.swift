import CCurl
import WalshipFormat
#if canImport(Glibc)
import Glibc
#endif

/// libcurl's global state and version.
public enum Curl {
    private static let once: Bool = {
        curl_global_init(Int(CURL_GLOBAL_DEFAULT)) == CURLE_OK
    }()

    @discardableResult
    public static func initialize() -> Bool { once }

    public static var version: String { String(cString: curl_version()) }
}

/// A transport-level failure (no HTTP status): connection refused, timeout, TLS, DNS...
public struct CurlError: Error, CustomStringConvertible {
    public let code: Int32
    public let message: String
    public let url: String
    /// Names the server only (scheme, host, port): a URL's path or credentials may be secret.
    public var description: String { "\(Redact.origin(url)): \(message) (curl error \(code))" }
    /// Worth retrying: connection, timeout, send/receive errors.
    public var isTransient: Bool {
        [CURLE_COULDNT_CONNECT, CURLE_OPERATION_TIMEDOUT, CURLE_SEND_ERROR, CURLE_RECV_ERROR,
         CURLE_GOT_NOTHING, CURLE_PARTIAL_FILE, CURLE_COULDNT_RESOLVE_HOST, CURLE_SSL_CONNECT_ERROR,
         CURLE_HTTP2, CURLE_HTTP2_STREAM].map { Int32($0.rawValue) }.contains(code)
    }
    /// What to check: the server's certificate for TLS failures, else whether it can be reached.
    public func hint(endpoint: String) -> String {
        let tls = [CURLE_PEER_FAILED_VERIFICATION, CURLE_SSL_CACERT_BADFILE, CURLE_SSL_CERTPROBLEM]
            .map { Int32($0.rawValue) }.contains(code)
        return tls ? "the TLS certificate of \(endpoint) is not trusted: point AWS_CA_BUNDLE (or CURL_CA_BUNDLE, SSL_CERT_FILE) at a PEM bundle holding its CA"
                   : "is the endpoint \(endpoint) reachable?"
    }
}

public enum RequestBody {
    case none
    case bytes([UInt8])
    /// `length` bytes of a file from `offset`, streamed (never held in memory).
    case file(path: String, offset: Int, length: Int)
}

public struct HTTPResponse {
    public var status: Int
    public var headers: [String: String]   // lower-cased names
    public var body: [UInt8]                // only when no body sink was given
}

/// SigV4 signing parameters, handed to libcurl's built-in signer.
public struct SigV4 {
    public var accessKey: String
    public var secretKey: String
    public var region: String
    public var service = "s3"
    public init(accessKey: String, secretKey: String, region: String) {
        self.accessKey = accessKey; self.secretKey = secretKey; self.region = region
    }
}

/// One libcurl easy handle, reused across requests so connections are kept alive. Not
/// thread-safe: callers serialise their use of one client.
public final class HTTPClient {
    private let handle: UnsafeMutableRawPointer
    public var caBundle: String?
    public var verifyTLS = true
    public var timeoutSeconds = 60

    public init() {
        Curl.initialize()
        handle = curl_easy_init()!
    }

    deinit { curl_easy_cleanup(handle) }

    final class Context {
        var sink: ((UnsafeRawBufferPointer) throws -> Void)?
        var collected: [UInt8] = []
        var sinkError: Error?
        var headers: [String: String] = [:]
        var file: Int32 = -1
        var fileOffset = 0
        var fileRemaining = 0
        var bytes: [UInt8] = []
        var bytesOffset = 0
        var status = 0
        var onHeaders: ((Int, [String: String]) throws -> Void)?
        var headersDelivered = false
    }

    /// libcurl refused an option (an unknown one in an older libcurl, a string too long): the
    /// request is not made with part of its settings missing, such as its signature.
    private func check(_ rc: CURLcode, _ option: String, _ url: String) throws {
        guard rc == CURLE_OK else {
            throw CurlError(code: Int32(rc.rawValue), message: "libcurl refused \(option): \(String(cString: curl_easy_strerror(rc)))", url: url)
        }
    }

    /// Performs one request. The response body goes to `sink` if given (for status 2xx only;
    /// error bodies are collected so their message can be reported).
    /// `onHeaders` sees a 2xx response's status and headers before its first body byte.
    public func perform(method: String, url: String, headers: [String] = [], body: RequestBody = .none,
                        sign: SigV4?, onHeaders: ((Int, [String: String]) throws -> Void)? = nil,
                        sink: ((UnsafeRawBufferPointer) throws -> Void)? = nil) throws -> HTTPResponse {
        curl_easy_reset(handle)
        let ctx = Context()
        ctx.sink = sink
        ctx.onHeaders = onHeaders
        let unmanaged = Unmanaged.passUnretained(ctx).toOpaque()
        var list: UnsafeMutablePointer<curl_slist>? = nil
        defer {
            curl_slist_free_all(list)
            if ctx.file >= 0 { close(ctx.file) }
        }
        try check(walship_curl_setopt_string(handle, CURLOPT_URL, url), "CURLOPT_URL", url)
        try check(walship_curl_setopt_long(handle, CURLOPT_NOSIGNAL, 1), "CURLOPT_NOSIGNAL", url)
        try check(walship_curl_setopt_long(handle, CURLOPT_CONNECTTIMEOUT, 10), "CURLOPT_CONNECTTIMEOUT", url)
        try check(walship_curl_setopt_long(handle, CURLOPT_LOW_SPEED_LIMIT, 1), "CURLOPT_LOW_SPEED_LIMIT", url)
        try check(walship_curl_setopt_long(handle, CURLOPT_LOW_SPEED_TIME, timeoutSeconds), "CURLOPT_LOW_SPEED_TIME", url)
        try check(walship_curl_setopt_long(handle, CURLOPT_SSL_VERIFYPEER, verifyTLS ? 1 : 0), "CURLOPT_SSL_VERIFYPEER", url)
        try check(walship_curl_setopt_long(handle, CURLOPT_SSL_VERIFYHOST, verifyTLS ? 2 : 0), "CURLOPT_SSL_VERIFYHOST", url)
        if let ca = caBundle { try check(walship_curl_setopt_string(handle, CURLOPT_CAINFO, ca), "CURLOPT_CAINFO", url) }
        if let s = sign {
            try check(walship_curl_setopt_string(handle, CURLOPT_AWS_SIGV4, "aws:amz:\(s.region):\(s.service)"), "CURLOPT_AWS_SIGV4", url)
            try check(walship_curl_setopt_string(handle, CURLOPT_USERNAME, s.accessKey), "CURLOPT_USERNAME", url)
            try check(walship_curl_setopt_string(handle, CURLOPT_PASSWORD, s.secretKey), "CURLOPT_PASSWORD", url)
        }
        try check(walship_curl_setopt_pointer(handle, CURLOPT_WRITEDATA, unmanaged), "CURLOPT_WRITEDATA", url)
        try check(walship_curl_setopt_write(handle) { ptr, size, n, ud in
            let ctx = Unmanaged<HTTPClient.Context>.fromOpaque(ud!).takeUnretainedValue()
            let count = size * n
            let buf = UnsafeRawBufferPointer(start: ptr, count: count)
            if let s = ctx.sink, (200..<300).contains(ctx.status) {
                do {
                    if !ctx.headersDelivered { ctx.headersDelivered = true; try ctx.onHeaders?(ctx.status, ctx.headers) }
                    try s(buf)
                } catch { ctx.sinkError = error; return 0 }
            } else {
                if ctx.collected.count < 1 << 20 { ctx.collected.append(contentsOf: buf) }
            }
            return count
        }, "CURLOPT_WRITEFUNCTION", url)
        try check(walship_curl_setopt_pointer(handle, CURLOPT_HEADERDATA, unmanaged), "CURLOPT_HEADERDATA", url)
        try check(walship_curl_setopt_header(handle) { ptr, size, n, ud in
            let ctx = Unmanaged<HTTPClient.Context>.fromOpaque(ud!).takeUnretainedValue()
            let count = size * n
            let line = String(decoding: UnsafeRawBufferPointer(start: ptr, count: count), as: UTF8.self)
            if line.hasPrefix("HTTP/") {
                let parts = line.split(separator: " ")
                if parts.count >= 2, let code = Int(parts[1]) { ctx.status = code }
                ctx.headers.removeAll()
            } else if let colon = line.firstIndex(of: ":") {
                let name = line[..<colon].lowercased()
                var value = line[line.index(after: colon)...]
                while value.first == " " { value = value.dropFirst() }
                while let c = value.last, c.isNewline || c == " " { value = value.dropLast() }   // "\r\n" is one Character
                ctx.headers[name] = String(value)
            }
            return count
        }, "CURLOPT_HEADERFUNCTION", url)
        let allHeaders = headers
        switch method {
        case "GET": break
        case "HEAD": try check(walship_curl_setopt_long(handle, CURLOPT_NOBODY, 1), "CURLOPT_NOBODY", url)
        default: try check(walship_curl_setopt_string(handle, CURLOPT_CUSTOMREQUEST, method), "CURLOPT_CUSTOMREQUEST", url)
        }
        switch body {
        case .none:
            if method == "PUT" || method == "POST" {
                try check(walship_curl_setopt_long(handle, CURLOPT_UPLOAD, 1), "CURLOPT_UPLOAD", url)
                try check(walship_curl_setopt_offset(handle, CURLOPT_INFILESIZE_LARGE, 0), "CURLOPT_INFILESIZE_LARGE", url)
                ctx.bytes = []
                try installReader(ctx, unmanaged, url)
            }
        case .bytes(let b):
            ctx.bytes = b
            try check(walship_curl_setopt_long(handle, CURLOPT_UPLOAD, 1), "CURLOPT_UPLOAD", url)
            try check(walship_curl_setopt_offset(handle, CURLOPT_INFILESIZE_LARGE, curl_off_t(b.count)), "CURLOPT_INFILESIZE_LARGE", url)
            try installReader(ctx, unmanaged, url)
        case .file(let path, let offset, let length):
            let fd = open(path, O_RDONLY | O_CLOEXEC)
            guard fd >= 0 else { throw CurlError(code: -1, message: "cannot open \(path): \(String(cString: strerror(errno)))", url: url) }
            ctx.file = fd; ctx.fileOffset = offset; ctx.fileRemaining = length
            try check(walship_curl_setopt_long(handle, CURLOPT_UPLOAD, 1), "CURLOPT_UPLOAD", url)
            try check(walship_curl_setopt_offset(handle, CURLOPT_INFILESIZE_LARGE, curl_off_t(length)), "CURLOPT_INFILESIZE_LARGE", url)
            try installReader(ctx, unmanaged, url)
        }
        // No 100-continue round trip. (An empty "Expect:" header would do it too, but libcurl
        // 7.88's SigV4 signer signs that header while never sending it.)
        try check(walship_curl_setopt_long(handle, CURLOPT_EXPECT_100_TIMEOUT_MS, 0), "CURLOPT_EXPECT_100_TIMEOUT_MS", url)
        for h in allHeaders { list = curl_slist_append(list, h) }
        try check(walship_curl_setopt_slist(handle, CURLOPT_HTTPHEADER, list), "CURLOPT_HTTPHEADER", url)
        let rc = curl_easy_perform(handle)
        if let e = ctx.sinkError { throw e }
        guard rc == CURLE_OK else {
            throw CurlError(code: Int32(rc.rawValue), message: String(cString: curl_easy_strerror(rc)), url: url)
        }
        var code: Int = 0
        try check(walship_curl_getinfo_long(handle, CURLINFO_RESPONSE_CODE, &code), "CURLINFO_RESPONSE_CODE", url)
        return HTTPResponse(status: code, headers: ctx.headers, body: ctx.collected)
    }

    private func installReader(_ ctx: Context, _ unmanaged: UnsafeMutableRawPointer, _ url: String) throws {
        try check(walship_curl_setopt_pointer(handle, CURLOPT_READDATA, unmanaged), "CURLOPT_READDATA", url)
        try check(walship_curl_setopt_read(handle) { ptr, size, n, ud in
            let ctx = Unmanaged<HTTPClient.Context>.fromOpaque(ud!).takeUnretainedValue()
            let room = size * n
            if ctx.file >= 0 {
                let want = min(room, ctx.fileRemaining)
                if want == 0 { return 0 }
                let got = pread(ctx.file, ptr, want, off_t(ctx.fileOffset))
                if got <= 0 { return Int(CURL_READFUNC_ABORT) }
                ctx.fileOffset += got; ctx.fileRemaining -= got
                return got
            }
            let left = ctx.bytes.count - ctx.bytesOffset
            let take = min(room, left)
            if take > 0 {
                ctx.bytes.withUnsafeBytes { b in
                    ptr!.withMemoryRebound(to: UInt8.self, capacity: take) { dst in
                        dst.update(from: b.baseAddress!.assumingMemoryBound(to: UInt8.self) + ctx.bytesOffset, count: take)
                    }
                }
                ctx.bytesOffset += take
            }
            return take
        }, "CURLOPT_READFUNCTION", url)
    }
}
