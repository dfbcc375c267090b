// swift-tools-version:6.2
import PackageDescription

// Module layout (see docs/ARCHITECTURE.md):
//   CSQLite / CLZ4 / CCurl / CCrypto   system libraries, each imported by exactly one Swift module
//   CLinux                   two Linux calls Glibc does not import (filesystem type, zero range)
//   WalshipFormat            pure formats: WAL parsing, checksums, segment/snapshot encoding, names, time
//   WalshipLZ4 / WalshipSQLite / WalshipCurl / WalshipCrypto   thin owners of the C handles
//   WalshipSystem            syscalls (one errno/EINTR helper), clocks, threads and locks, inotify
//                            (ChangeHub) and the signal relay, the environment
//   WalshipStorage           the Replica protocol, the registry of backends by URL scheme, the
//                            directory backend
//   WalshipS3                the S3 backend (registers s3://)
//   WalshipRestore           reading a replica back: objects (decrypt, decompress, check),
//                            restore, prefetch, verify, encryption keys
//   WalshipConfig            one options schema for the command line and the config file
//   WalshipAgent             the agent: tailer, pin, cutter, spool, shippers, housekeeping,
//                            status, metrics, alerts
//   walship                  the command-line tool
let package = Package(
    name: "walship",
    platforms: [.macOS(.v13)],
    products: [
        .executable(name: "walship", targets: ["walship"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
    ],
    targets: [
        .systemLibrary(name: "CSQLite", path: "Sources/CSQLite", pkgConfig: "sqlite3",
                       providers: [.apt(["libsqlite3-dev"])]),
        .systemLibrary(name: "CLZ4", path: "Sources/CLZ4", pkgConfig: "liblz4",
                       providers: [.apt(["liblz4-dev"])]),
        .systemLibrary(name: "CCurl", path: "Sources/CCurl", pkgConfig: "libcurl",
                       providers: [.apt(["libcurl4-openssl-dev"])]),
        .systemLibrary(name: "CCrypto", path: "Sources/CCrypto", pkgConfig: "libcrypto",
                       providers: [.apt(["libssl-dev"])]),
        .systemLibrary(name: "CLinux", path: "Sources/CLinux"),
        .target(name: "WalshipFormat"),
        .target(name: "WalshipLZ4", dependencies: ["CLZ4"]),
        .target(name: "WalshipSQLite", dependencies: ["CSQLite"]),
        .target(name: "WalshipCurl", dependencies: ["CCurl", "WalshipFormat"]),
        .target(name: "WalshipCrypto", dependencies: ["CCrypto"]),
        .target(name: "WalshipSystem", dependencies: ["CLinux"],
                swiftSettings: [.swiftLanguageMode(.v6)]),
        .target(name: "WalshipStorage", dependencies: ["WalshipSystem", "WalshipFormat"],
                swiftSettings: [.swiftLanguageMode(.v6)]),
        .target(name: "WalshipS3", dependencies: ["WalshipStorage", "WalshipSystem", "WalshipFormat", "WalshipCurl", "WalshipCrypto"],
                swiftSettings: [.swiftLanguageMode(.v6)]),
        .target(name: "WalshipRestore", dependencies: [
            "WalshipSystem", "WalshipStorage", "WalshipFormat", "WalshipLZ4", "WalshipSQLite", "WalshipCrypto",
        ], swiftSettings: [.swiftLanguageMode(.v6)]),
        .target(name: "WalshipConfig", dependencies: ["WalshipSystem", "WalshipStorage", "WalshipFormat"],
                swiftSettings: [.swiftLanguageMode(.v6)]),
        .target(name: "WalshipAgent", dependencies: [
            "WalshipSystem", "WalshipStorage", "WalshipRestore", "WalshipConfig",
            "WalshipFormat", "WalshipLZ4", "WalshipSQLite", "WalshipCurl", "WalshipCrypto", "CLinux",
            .product(name: "Logging", package: "swift-log"),
        ]),
        .executableTarget(name: "walship", dependencies: [
            "WalshipAgent", "WalshipConfig", "WalshipRestore", "WalshipFormat", "WalshipSystem", "WalshipStorage", "WalshipS3",
            .product(name: "ArgumentParser", package: "swift-argument-parser"),
            .product(name: "Logging", package: "swift-log"),
        ]),
        .testTarget(name: "WalshipFormatTests", dependencies: ["WalshipFormat", "WalshipLZ4", "WalshipSQLite", "WalshipCrypto"]),
        .testTarget(name: "WalshipSystemTests", dependencies: ["WalshipSystem"]),
        .testTarget(name: "WalshipStorageTests", dependencies: ["WalshipStorage"]),
        .testTarget(name: "WalshipAgentTests", dependencies: ["WalshipAgent", "WalshipFormat", "WalshipCurl", "WalshipSQLite",
                                                            "WalshipSystem", "WalshipStorage", "WalshipS3", "WalshipRestore", "WalshipConfig"]),
    ],
    swiftLanguageModes: [.v5]
)
