#if canImport(Glibc)
import Glibc
#endif
import Dispatch
import WalshipFormat
import WalshipConfig
import WalshipRestore
import WalshipStorage
import WalshipSystem

public enum MetricsServerError: Error, CustomStringConvertible {
    case badAddress(String)
    case cannotListen(String, String)
    public var description: String {
        switch self {
        case .badAddress(let a): return "--metrics-addr '\(a)' is not HOST:PORT (for example 127.0.0.1:9090 or :9090)"
        case .cannotListen(let a, let why): return "cannot serve metrics on \(a): \(why); choose another port or stop what holds it"
        }
    }
}

/// A minimal HTTP/1.1 server for Prometheus: GET /metrics (text format) and GET /healthz.
/// One request per connection. The accept loop only accepts: each connection is served on a
/// worker, at most `maxConnections` at once (one more gets 503 and is closed), and a whole
/// request must arrive within `requestDeadlineUs`, so a client that trickles bytes (or none)
/// holds one slot for two seconds at most and never blocks the others. The response too must be
/// taken within `responseDeadlineUs`.
public final class MetricsServer {
    public let address: String
    public private(set) var port: Int = 0
    private var fd: Int32 = -1
    private let queue = DispatchQueue(label: "walship.metrics")
    private let workers = DispatchQueue(label: "walship.metrics.connection", attributes: .concurrent)
    static let maxConnections = 16
    static let requestDeadlineUs: Int64 = 2_000_000
    /// The response must be taken by the client within this (it is a few KiB per database).
    static let responseDeadlineUs: Int64 = 5_000_000
    private let slots = DispatchSemaphore(value: MetricsServer.maxConnections)

    public init(address: String) { self.address = address }

    public func start() throws {
        guard let colon = address.lastIndex(of: ":"), let p = Int(address[address.index(after: colon)...]), (0...65535).contains(p) else {
            throw MetricsServerError.badAddress(address)
        }
        var host = String(address[..<colon])
        if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
        var hints = addrinfo()
        hints.ai_family = AF_UNSPEC
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = AI_PASSIVE
        var res: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host.isEmpty ? nil : host, String(p), &hints, &res)
        guard rc == 0, let ai = res else { throw MetricsServerError.cannotListen(address, String(cString: gai_strerror(rc))) }
        defer { freeaddrinfo(res) }
        let s = socket(ai.pointee.ai_family, ai.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), ai.pointee.ai_protocol)
        guard s >= 0 else { throw MetricsServerError.cannotListen(address, String(cString: strerror(errno))) }
        var one: Int32 = 1
        setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        guard bind(s, ai.pointee.ai_addr, ai.pointee.ai_addrlen) == 0, listen(s, 16) == 0 else {
            let why = String(cString: strerror(errno)); close(s)
            throw MetricsServerError.cannotListen(address, why)
        }
        var ss = sockaddr_storage()
        var len = socklen_t(MemoryLayout<sockaddr_storage>.size)
        withUnsafeMutablePointer(to: &ss) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { _ = getsockname(s, $0, &len) } }
        port = Int(withUnsafeBytes(of: &ss) { b -> UInt16 in UInt16(b[2]) << 8 | UInt16(b[3]) })   // sin_port / sin6_port, network order
        fd = s
        queue.async { self.serve() }
    }

    private func serve() {
        while true {
            let c = accept(fd, nil, nil)
            if c < 0 { if errno == EINTR { continue }; usleep(10_000); continue }
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            var tv = timeval(tv_sec: 2, tv_usec: 0)
            setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            guard slots.wait(timeout: .now()) == .success else {
                // Every slot is busy: say so at once, without waiting on this client either.
                let busy = Array("HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".utf8)
                _ = busy.withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
                close(c)
                continue
            }
            workers.async { [self] in
                defer { close(c); slots.signal() }
                handle(c)
            }
        }
    }

    /// Reads a request head until its blank line, 16 KiB, or the deadline; nil when the
    /// client gave up or ran out of time.
    private func readRequest(_ c: Int32) -> [UInt8]? {
        let deadline = monotonicMicroseconds() + Self.requestDeadlineUs
        var req: [UInt8] = []
        var buf = [UInt8](repeating: 0, count: 4096)
        while req.count < 16384 {
            let left = deadline - monotonicMicroseconds()
            if left <= 0 { return nil }
            var p = pollfd(fd: c, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, Int32((left + 999) / 1000))
            if r < 0 { if errno == EINTR { continue }; return nil }
            if r == 0 { return nil }
            let n = read(c, &buf, buf.count)
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            req += buf[0..<n]
            if req.count >= 4 && req.suffix(4) == [13, 10, 13, 10] { break }
            if let text = String(validating: req, as: UTF8.self), text.contains("\r\n\r\n") { break }
        }
        return req
    }

    private func handle(_ c: Int32) {
        guard let req = readRequest(c) else { return }
        let line = String(decoding: req.prefix { $0 != 13 && $0 != 10 }, as: UTF8.self).split(separator: " ")
        let method = line.first.map(String.init) ?? "", target = line.count > 1 ? String(line[1]) : ""
        let path = String(target.split(separator: "?", omittingEmptySubsequences: false).first ?? "")
        let (status, type, body): (String, String, String)
        switch (method, path) {
        case ("GET", "/metrics"), ("HEAD", "/metrics"):
            (status, type, body) = ("200 OK", "text/plain; version=0.0.4; charset=utf-8", PrometheusText.render(StatusBoard.reports, carried: StatusBoard.carried))
        case ("GET", "/healthz"), ("HEAD", "/healthz"):
            (status, type, body) = ("200 OK", "text/plain; charset=utf-8", "ok\n")
        case ("GET", _), ("HEAD", _):
            (status, type, body) = ("404 Not Found", "text/plain; charset=utf-8", "walship serves /metrics and /healthz\n")
        default:
            (status, type, body) = ("405 Method Not Allowed", "text/plain; charset=utf-8", "GET only\n")
        }
        let bytes = Array(body.utf8)
        var out = Array("HTTP/1.1 \(status)\r\nContent-Type: \(type)\r\nContent-Length: \(bytes.count)\r\nConnection: close\r\n\r\n".utf8)
        if method != "HEAD" { out += bytes }
        sendWithin(out, to: c, deadlineUs: monotonicMicroseconds() + Self.responseDeadlineUs)
    }

    /// Writes `bytes` unless the client is too slow to take them before the deadline: a
    /// client that reads a byte now and then is dropped, not waited for.
    private func sendWithin(_ bytes: [UInt8], to c: Int32, deadlineUs: Int64) {
        var off = 0
        while off < bytes.count {
            let left = deadlineUs - monotonicMicroseconds()
            if left <= 0 { return }
            var p = pollfd(fd: c, events: Int16(POLLOUT), revents: 0)
            let r = poll(&p, 1, Int32((left + 999) / 1000))
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { return }
            let n = bytes[off...].withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
            if n < 0 && (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) { continue }
            if n <= 0 { return }
            off += n
        }
    }
}
