import XCTest
@testable import WalshipStorage

/// Replicas are reached through a registry of backends by URL scheme: the directory backend is
/// built in, others register themselves, and a URL no backend takes gets one clear error.
final class ReplicaBackendsTests: XCTestCase {
    func testDirectoryURLsOpenTheBuiltInBackend() throws {
        let a = try ReplicaBackends.open("file:///var/backups/app%20replica/", environment: [:])
        XCTAssertEqual(a.displayURL, "file:///var/backups/app replica")
        let b = try ReplicaBackends.open("/var/backups//app", environment: [:])
        XCTAssertEqual(b.displayURL, "file:///var/backups/app")
        XCTAssertThrowsError(try ReplicaBackends.open("file://relative/path", environment: [:])) { e in
            XCTAssertTrue("\(e)".contains("needs an absolute path"), "\(e)")
        }
    }

    func testAnUnknownSchemeIsRefusedWithTheFormsThatWork() {
        for url in ["gs://bucket/p", "relative/path", "", "s4://x"] {
            XCTAssertThrowsError(try ReplicaBackends.open(url, environment: [:])) { e in
                XCTAssertTrue("\(e)".contains("use file:///absolute/path"), "\(url): \(e)")
            }
            XCTAssertThrowsError(try ReplicaBackends.validate(url, environment: [:]))
        }
    }

    func testARegisteredBackendTakesItsSchemeAndIsListedInErrors() throws {
        final class Opened: @unchecked Sendable { var urls: [String] = [] }
        let opened = Opened()
        ReplicaBackends.register(ReplicaBackend(
            scheme: "testmem", usage: "testmem://name", takesCredentials: true,
            validate: { url, _ in if url.hasSuffix("/") { throw ReplicaError.badURL(url, "no trailing slash") } },
            open: { url, env in opened.urls.append(url + " " + (env["K"] ?? "")); return FileReplica(root: "/nowhere") }))
        _ = try ReplicaBackends.open("testmem://a", environment: ["K": "v"])
        XCTAssertEqual(opened.urls, ["testmem://a v"])
        XCTAssertTrue(try ReplicaBackends.backend(for: "testmem://a").takesCredentials)
        XCTAssertFalse(try ReplicaBackends.backend(for: "/a").takesCredentials)
        XCTAssertThrowsError(try ReplicaBackends.validate("testmem://a/", environment: [:]))
        XCTAssertThrowsError(try ReplicaBackends.open("gs://b", environment: [:])) { e in
            XCTAssertTrue("\(e)".contains("testmem://name"), "\(e)")
        }
    }
}
