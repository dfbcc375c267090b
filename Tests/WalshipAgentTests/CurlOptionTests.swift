import XCTest
import WalshipCurl
@testable import WalshipConfig
@testable import WalshipRestore
@testable import WalshipStorage
@testable import WalshipSystem

/// A request libcurl cannot be configured for is refused before it is sent, naming the option,
/// instead of going out with that option missing.
final class CurlOptionTests: XCTestCase {
    func testARefusedOptionIsAnErrorNamingIt() {
        // libcurl refuses strings longer than 8 MB (CURLE_BAD_FUNCTION_ARGUMENT).
        let url = "http://127.0.0.1:9/" + String(repeating: "a", count: 9 << 20)
        XCTAssertThrowsError(try HTTPClient().perform(method: "GET", url: url, sign: nil)) { e in
            XCTAssertTrue("\(e)".contains("libcurl refused CURLOPT_URL"), "\(e)")
        }
    }
}
