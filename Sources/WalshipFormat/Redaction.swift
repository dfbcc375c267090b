// What walship prints of a URL: never a password or token. URLs reach messages from the
// command line, the config file and errors; each goes through here first.

public enum Redact {
    /// `url` with the user:password@ part of every URL in it (its own, and one given as a
    /// query parameter, plain or percent-encoded) replaced by `***@`.
    public static func url(_ url: String) -> String {
        var s = Array(url.utf8)
        var out: [UInt8] = []
        out.reserveCapacity(s.count)
        var i = 0
        while i < s.count {
            // A scheme separator, plain or percent-encoded (%3A%2F%2F).
            let plain = match(s, i, "://"), encoded = match(s, i, "%3a%2f%2f")
            guard plain || encoded else { out.append(s[i]); i += 1; continue }
            let sepLen = plain ? 3 : 9
            out += s[i..<i + sepLen]
            i += sepLen
            // The user:password part ends at the last @ before the URL's query, fragment or
            // the next query parameter (a password may hold "/", so a slash does not end it).
            var end = i
            while end < s.count, ![UInt8(ascii: "?"), UInt8(ascii: "&"), UInt8(ascii: "#")].contains(s[end]),
                  !match(s, end, "%3f"), !match(s, end, "%26") { end += 1 }
            var at: Int?, atLen = 0
            var j = i
            while j < end {
                if s[j] == UInt8(ascii: "@") { at = j; atLen = 1 } else if match(s, j, "%40") { at = j; atLen = 3 }
                j += 1
            }
            if let a = at {
                out += Array("***".utf8) + s[a..<a + atLen]
                i = a + atLen
            }
        }
        s = out
        return String(decoding: s, as: UTF8.self)
    }

    /// Scheme, host and port only: the rest of a webhook's URL (path, query) is often its token.
    public static func origin(_ url: String) -> String {
        let b = Array(url.utf8)
        guard let sep = (0..<b.count).first(where: { match(b, $0, "://") }) else { return "(url)" }
        // Credentials end at the last @ before the query or fragment (a password may hold
        // "/"); the host then runs to the next "/".
        var limit = sep + 3
        while limit < b.count, b[limit] != UInt8(ascii: "?"), b[limit] != UInt8(ascii: "#") { limit += 1 }
        var hostStart = sep + 3
        for k in hostStart..<limit where b[k] == UInt8(ascii: "@") { hostStart = k + 1 }
        var end = hostStart
        while end < b.count, ![UInt8(ascii: "/"), UInt8(ascii: "?"), UInt8(ascii: "#")].contains(b[end]) { end += 1 }
        return String(decoding: b[0..<sep + 3] + b[hostStart..<end], as: UTF8.self) + (end < b.count ? "/…" : "")
    }

    private static func match(_ s: [UInt8], _ i: Int, _ lower: String) -> Bool {
        let p = Array(lower.utf8)
        guard i + p.count <= s.count else { return false }
        for k in 0..<p.count {
            var c = s[i + k]
            if c >= 65 && c <= 90 { c += 32 }
            if c != p[k] { return false }
        }
        return true
    }
}
