#if canImport(Glibc)
import Glibc
#endif

/// The process's environment, read once per call.
public enum ProcessEnvironment {
    public static func all() -> [String: String] {
        var out: [String: String] = [:]
        var p = environ
        while let e = p.pointee {
            let s = String(cString: e)
            if let i = s.firstIndex(of: "=") { out[String(s[..<i])] = String(s[s.index(after: i)...]) }
            p += 1
        }
        return out
    }
}
