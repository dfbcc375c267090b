"""A small HTTP/1.1 relay on loopback, put between walship (or Litestream) and the S3 server to
see every request: the protocol tests read what was asked and can cut answers short, the bench
counts requests and times uploads. Also the two socket helpers both need.

Every byte is relayed unchanged (the Host header too, so SigV4 signatures stay valid);
keep-alive, Content-Length and chunked bodies, `Expect: 100-continue` and interim 1xx answers
are handled."""
import socket
import threading
import time


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_answers(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def read_head(f):
    """One request or status line with its headers: (raw bytes, first line, lower-cased headers),
    or (None, None, None) at end of stream."""
    raw = b""
    while True:
        line = f.readline(65537)
        if not line:
            return None, None, None
        raw += line
        if line in (b"\r\n", b"\n"):
            break
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for h in lines[1:]:
        if ":" in h:
            k, v = h.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return raw, lines[0], headers


def relay_body(src, dst, headers, limit=None, to_eof=False):
    """Relays one message body; returns (bytes relayed, complete). With `limit`, stops after that
    many body bytes (Content-Length bodies only)."""
    n = 0
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = src.readline(65537)
            if not line:
                return n, False   # the sender went away mid-body
            dst.sendall(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:   # trailers up to the blank line
                    t = src.readline(65537)
                    dst.sendall(t)
                    if t in (b"\r\n", b"\n", b""):
                        return n, True
            data = src.read(size + 2)
            dst.sendall(data)
            n += size
    left = -1 if to_eof else int(headers.get("content-length", "0") or 0)
    if limit is not None and left >= 0:
        left = min(left, limit)
    while left != 0:
        data = src.read(65536 if left < 0 else min(left, 65536))
        if not data:
            return n, to_eof
        dst.sendall(data)
        n += len(data)
        if left > 0:
            left -= len(data)
    return n, limit is None


class RelayProxy:
    """Relays 127.0.0.1:port to an upstream port and records each exchange as a dict:
    t (when its head arrived), method, target, headers, status (None until answered; 0 when the
    client went away mid-exchange, e.g. killed), response_headers, request_bytes, body_bytes
    (response body relayed), dur (head to end of answer), cut.

    cut_rule(record, response_headers) -> int | None: when it returns N for a response, only N
    bytes of that response's body are relayed, then both connections are closed."""

    def __init__(self, upstream_port, cut_rule=None, timeout=60):
        """timeout: seconds a relayed connection may wait on either side (None: no limit)."""
        self.upstream_port = upstream_port
        self.cut_rule = cut_rule
        self.timeout = timeout
        self.requests = []
        self.errors = []
        self.connections = 0   # accepted from the client: fewer than requests when it reuses them
        self.lock = threading.Lock()
        self.lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.closed = True
        try:
            self.lsock.close()
        except OSError:
            pass

    def read_request_head(self, f):
        """Reads a request's head before it is relayed; a subclass may act on it first."""
        return read_head(f)

    def _accept(self):
        while not self.closed:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            with self.lock:
                self.connections += 1
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c):
        u = rec = None
        try:
            u = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=self.timeout)
            c.settimeout(self.timeout)
            for sk in (c, u):   # no Nagle: relayed heads and bodies must not wait for delayed ACKs
                sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cf, uf = c.makefile("rb"), u.makefile("rb")
            while True:
                raw, line, hdrs = self.read_request_head(cf)
                if raw is None:
                    return
                method, target = line.split(" ")[:2]
                rec = {"t": time.time(), "method": method, "target": target, "headers": hdrs, "status": None,
                       "response_headers": {}, "request_bytes": 0, "body_bytes": 0, "dur": None, "cut": False}
                with self.lock:
                    self.requests.append(rec)
                u.sendall(raw)
                rraw = None
                if hdrs.get("expect", "").lower() == "100-continue":
                    # The client waits for an interim answer before it sends the body.
                    rraw, rline, rhdrs = read_head(uf)
                    if rraw is None:
                        raise ConnectionError("upstream closed")
                    c.sendall(rraw)
                    if int(rline.split(" ")[1]) == 100:
                        rec["request_bytes"], complete = relay_body(cf, u, hdrs)
                        if not complete:
                            raise ConnectionError("client went away mid-body")
                        rraw = None
                    else:
                        hdrs["connection"] = "close"   # body state unknown: end this connection after
                elif "content-length" in hdrs or "transfer-encoding" in hdrs:
                    rec["request_bytes"], complete = relay_body(cf, u, hdrs)
                    if not complete:
                        raise ConnectionError("client went away mid-body")
                while rraw is None or int(rline.split(" ")[1]) < 200:   # interim answers, then the final one
                    rraw, rline, rhdrs = read_head(uf)
                    if rraw is None:
                        raise ConnectionError("upstream closed")
                    c.sendall(rraw)
                status = int(rline.split(" ")[1])
                rec["response_headers"] = rhdrs
                if method != "HEAD" and status not in (204, 304):
                    limit = self.cut_rule(rec, rhdrs) if self.cut_rule else None
                    to_eof = "content-length" not in rhdrs and "chunked" not in rhdrs.get("transfer-encoding", "")
                    rec["body_bytes"], _ = relay_body(uf, c, rhdrs, limit=limit, to_eof=to_eof)
                    if limit is not None:
                        rec.update(status=status, cut=True, dur=time.time() - rec["t"])
                        c.shutdown(socket.SHUT_RDWR)   # FIN after the relayed bytes: the client sees a short body
                        return
                    if to_eof:
                        hdrs["connection"] = "close"
                rec.update(status=status, dur=time.time() - rec["t"])
                rec = None
                if "close" in (hdrs.get("connection", "") + rhdrs.get("connection", "")).lower():
                    return
        except Exception as e:   # recorded; the callers look at what the client saw
            with self.lock:
                self.errors.append(f"{type(e).__name__}: {e}")
                if rec is not None and rec["status"] is None:   # cut off mid-exchange, never answered
                    rec.update(status=0, dur=time.time() - rec["t"])
        finally:
            for s in (c, u):
                if s is not None:
                    try:
                        s.close()
                    except OSError:
                        pass
