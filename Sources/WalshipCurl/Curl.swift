import CCurl

/// libcurl's global state and version. The S3 client (a later module) builds on this; the
/// agent calls `Curl.initialize()` once at start so the dependency is proven at run time.
public enum Curl {
    private static let once: Bool = {
        curl_global_init(Int(CURL_GLOBAL_DEFAULT)) == CURLE_OK
    }()

    @discardableResult
    public static func initialize() -> Bool { once }

    public static var version: String { String(cString: curl_version()) }
}
