// Durations ("500ms", "1s", "15m", "24h", "7d", "1h30m") and RFC 3339 timestamps, both to
// integer microseconds so that comparisons against commit times are exact.

public enum DurationText {
    /// Parses a duration into microseconds. Accepts one or more <number><unit> groups; units
    /// us, ms, s, m, h, d; the number may have a fraction ("1.5s").
    public static func parseMicroseconds(_ text: String) throws -> Int64 {
        let s = text.trimmingSpaces()
        guard !s.isEmpty else { throw FormatError.invalidArgument("empty duration: use forms like 500ms, 1s, 15m, 24h, 7d") }
        var total: Double = 0
        var chars = Array(s.unicodeScalars)
        var i = 0
        while i < chars.count {
            var num = ""
            while i < chars.count, chars[i].properties.numericType != nil || chars[i] == "." { num.unicodeScalars.append(chars[i]); i += 1 }
            var unit = ""
            while i < chars.count, chars[i].properties.isAlphabetic { unit.unicodeScalars.append(chars[i]); i += 1 }
            guard let value = Double(num), !unit.isEmpty else {
                throw FormatError.invalidArgument("bad duration '\(text)': use forms like 500ms, 1s, 15m, 24h, 7d")
            }
            let scale: Double
            switch unit {
            case "us", "µs": scale = 1
            case "ms": scale = 1_000
            case "s": scale = 1_000_000
            case "m": scale = 60_000_000
            case "h": scale = 3_600_000_000
            case "d": scale = 86_400_000_000
            default: throw FormatError.invalidArgument("bad duration unit '\(unit)' in '\(text)': use ms, s, m, h or d")
            }
            total += value * scale
        }
        chars.removeAll()
        guard total >= 0, total < 9e18 else { throw FormatError.invalidArgument("duration '\(text)' is out of range") }
        return Int64(total.rounded())
    }

    public static func format(microseconds us: Int64) -> String {
        if us % 86_400_000_000 == 0 && us > 0 { return "\(us / 86_400_000_000)d" }
        if us % 3_600_000_000 == 0 && us > 0 { return "\(us / 3_600_000_000)h" }
        if us % 60_000_000 == 0 && us > 0 { return "\(us / 60_000_000)m" }
        if us % 1_000_000 == 0 { return "\(us / 1_000_000)s" }
        if us % 1_000 == 0 { return "\(us / 1_000)ms" }
        return "\(us)us"
    }
}

public enum Timestamp {
    /// Parses RFC 3339 ("2024-12-14T14:00:00Z", "2024-12-14T14:00:00.250+01:00") to
    /// microseconds since the Unix epoch.
    public static func parseMicroseconds(_ text: String) throws -> Int64 {
        let bad = FormatError.invalidArgument("bad timestamp '\(text)': use RFC 3339, e.g. 2024-12-14T14:00:00Z or 2024-12-14T14:00:00.250+01:00")
        let b = Array(text.trimmingSpaces().utf8)
        func num(_ from: Int, _ len: Int) throws -> Int {
            guard from + len <= b.count else { throw bad }
            var v = 0
            for k in from..<from + len {
                guard b[k] >= 48 && b[k] <= 57 else { throw bad }
                v = v * 10 + Int(b[k] - 48)
            }
            return v
        }
        guard b.count >= 20, b[4] == 45, b[7] == 45, b[10] == 84 || b[10] == 116 || b[10] == 32, b[13] == 58, b[16] == 58 else { throw bad }
        let y = try num(0, 4), mo = try num(5, 2), d = try num(8, 2)
        let h = try num(11, 2), mi = try num(14, 2), s = try num(17, 2)
        guard (1...12).contains(mo), (1...31).contains(d), h < 24, mi < 60, s < 61 else { throw bad }
        var i = 19
        var fracUs = 0
        if i < b.count && b[i] == 46 {
            i += 1
            var digits = 0
            while i < b.count, b[i] >= 48, b[i] <= 57 {
                if digits < 6 { fracUs = fracUs * 10 + Int(b[i] - 48) }
                digits += 1; i += 1
            }
            guard digits > 0 else { throw bad }
            for _ in min(digits, 6)..<6 { fracUs *= 10 }
        }
        guard i < b.count else { throw bad }
        var offsetSec = 0
        if b[i] == 90 || b[i] == 122 { i += 1 } else if b[i] == 43 || b[i] == 45 {
            let sign = b[i] == 43 ? 1 : -1
            guard i + 6 == b.count, b[i + 3] == 58 else { throw bad }
            let oh = try num(i + 1, 2), om = try num(i + 4, 2)
            offsetSec = sign * (oh * 3600 + om * 60); i += 6
        } else { throw bad }
        guard i == b.count else { throw bad }
        let days = daysFromCivil(y, mo, d)
        let secs = Int64(days) * 86400 + Int64(h * 3600 + mi * 60 + s) - Int64(offsetSec)
        return secs * 1_000_000 + Int64(fracUs)
    }

    /// Formats microseconds since the epoch as RFC 3339 UTC with microsecond precision.
    public static func format(microseconds us: Int64) -> String {
        let secs = us >= 0 ? us / 1_000_000 : (us - 999_999) / 1_000_000
        let frac = Int(us - secs * 1_000_000)
        let days = secs >= 0 ? secs / 86400 : (secs - 86399) / 86400
        let sod = Int(secs - days * 86400)
        let (y, m, d) = civilFromDays(Int(days))
        func p2(_ v: Int) -> String { v < 10 ? "0\(v)" : "\(v)" }
        var f = String(frac); while f.count < 6 { f = "0" + f }
        return "\(y)-\(p2(m))-\(p2(d))T\(p2(sod / 3600)):\(p2(sod / 60 % 60)):\(p2(sod % 60)).\(f)Z"
    }

    /// Millisecond precision (".650Z"): for times that object names carry, floored to the
    /// millisecond, so that nothing finer than what is known is printed.
    public static func format(milliseconds ms: Int64) -> String {
        let full = format(microseconds: ms * 1000)   // "...ss.ffffffZ"
        return String(full.dropLast(4)) + "Z"
    }

    // Howard Hinnant's civil-calendar algorithms (public domain description).
    static func daysFromCivil(_ y0: Int, _ m: Int, _ d: Int) -> Int {
        let y = m <= 2 ? y0 - 1 : y0
        let era = (y >= 0 ? y : y - 399) / 400
        let yoe = y - era * 400
        let doy = (153 * (m + (m > 2 ? -3 : 9)) + 2) / 5 + d - 1
        let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy
        return era * 146097 + doe - 719468
    }

    static func civilFromDays(_ z0: Int) -> (Int, Int, Int) {
        let z = z0 + 719468
        let era = (z >= 0 ? z : z - 146096) / 146097
        let doe = z - era * 146097
        let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100)
        let mp = (5 * doy + 2) / 153
        let d = doy - (153 * mp + 2) / 5 + 1
        let m = mp < 10 ? mp + 3 : mp - 9
        return (yoe + era * 400 + (m <= 2 ? 1 : 0), m, d)
    }
}

extension String {
    func trimmingSpaces() -> String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\t" || c == "\n" { s = s.dropFirst() }
        while let c = s.last, c == " " || c == "\t" || c == "\n" { s = s.dropLast() }
        return String(s)
    }
}

public enum ByteSize {
    /// Parses sizes like 512MB, 1GB, 100MiB, 4096 (bytes). K/M/G/T are powers of 1024.
    public static func parse(_ text: String) throws -> Int64 {
        let s = text.trimmingSpaces().uppercased()
        var digits = ""
        var rest = Substring(s)
        while let c = rest.first, c.isNumber || c == "." { digits.append(c); rest = rest.dropFirst() }
        let unit = rest.trimmingCharacters()
        let scale: Double
        switch unit {
        case "", "B": scale = 1
        case "K", "KB", "KIB": scale = 1024
        case "M", "MB", "MIB": scale = 1024 * 1024
        case "G", "GB", "GIB": scale = 1024 * 1024 * 1024
        case "T", "TB", "TIB": scale = 1024 * 1024 * 1024 * 1024
        default: throw FormatError.invalidArgument("bad size '\(text)': use forms like 512MB or 2GB")
        }
        guard let v = Double(digits), v >= 0 else { throw FormatError.invalidArgument("bad size '\(text)': use forms like 512MB or 2GB") }
        // Checked before converting: a size past Int64 would trap, not fail.
        guard v * scale < 9e18 else { throw FormatError.invalidArgument("size '\(text)' is out of range") }
        return Int64(v * scale)
    }

    /// 1536 → "1.5 KiB".
    public static func format(_ bytes: Int64) -> String {
        let units = ["B", "KiB", "MiB", "GiB", "TiB"]
        var v = Double(bytes), i = 0
        while v >= 1024 && i < units.count - 1 { v /= 1024; i += 1 }
        if i == 0 { return "\(bytes) B" }
        let tenths = Int64((v * 10).rounded())
        return "\(tenths / 10).\(tenths % 10) \(units[i])"
    }
}

extension Substring {
    func trimmingCharacters() -> String { String(self).trimmingSpaces() }
}
