import XCTest
@testable import WalshipAgent
import WalshipFormat
#if canImport(Glibc)
import Glibc
#endif
@testable import WalshipConfig
@testable import WalshipRestore
@testable import WalshipStorage
@testable import WalshipSystem

/// The restore's output file, mapped and written: growth without writes reads as zeros, a
/// truncation removes what lies beyond it (also when the database grows back over it), and
/// the file ends with the length asked for.
final class RestoreOutputTests: XCTestCase {
    func page(_ fill: UInt8, _ size: Int) -> [UInt8] { [UInt8](repeating: fill, count: size) }

    func run(map: Bool, pageSize: Int, script: (RestoreOutput) throws -> Int) throws -> [UInt8] {
        let dir = try FS.makePrivateDirectory(beside: NSTemporaryDirectory() + "/walship-output-test")
        defer { FS.removeTree(dir) }
        let f = try RawFile(path: dir + "/db", flags: O_RDWR | O_CREAT | O_EXCL, mode: 0o600)
        for i in 1...3 { try page(UInt8(i), pageSize).withUnsafeBytes { try f.write(at: (i - 1) * pageSize, $0) } }
        let out = try RestoreOutput(file: f, pageSize: pageSize, pages: 3, map: map)
        if map { XCTAssertTrue(out.mapped, "the test directory is expected on ext4, XFS or tmpfs") }
        let pages = try script(out)
        try out.finish(pages: pages)
        XCTAssertEqual(try f.size(), pages * pageSize)
        return try f.read(at: 0, count: pages * pageSize)
    }

    func history(_ o: RestoreOutput) throws -> Int {
        let ps = o.pageSize
        try page(9, ps).withUnsafeBytes { try o.write(page: 6, $0) }     // grows over 4 and 5 unwritten
        try o.truncate(toPages: 2)                                      // 3..6 gone
        try page(7, ps).withUnsafeBytes { try o.write(page: 4, $0) }     // 3 grows back as zeros
        try page(8, ps).withUnsafeBytes { try o.write(page: 1, $0) }
        return 7
    }

    func testMappedAndWrittenOutputsAgree() throws {
        let ps = 512
        var expected = page(8, ps) + page(2, ps) + page(0, ps) + page(7, ps)
        expected += page(0, 3 * ps)
        XCTAssertEqual(try run(map: false, pageSize: ps, script: history), expected)
        XCTAssertEqual(try run(map: true, pageSize: ps, script: history), expected)
    }

    func testALargeTruncationReadsAsZerosWhenTheDatabaseGrowsBack() throws {
        // Past 1 MiB the mapped output zeroes through the filesystem, not by copying.
        let ps = 4096
        func script(_ o: RestoreOutput) throws -> Int {
            try page(5, ps).withUnsafeBytes { try o.write(page: 600, $0) }
            try o.truncate(toPages: 1)
            try page(6, ps).withUnsafeBytes { try o.write(page: 2, $0) }
            return 600
        }
        let expected = page(1, ps) + page(6, ps) + page(0, 598 * ps)
        XCTAssertEqual(try run(map: true, pageSize: ps, script: script), expected)
        XCTAssertEqual(try run(map: false, pageSize: ps, script: script), expected)
    }
}
