import ArgumentParser
import Logging
import WalshipConfig
import WalshipAgent
import WalshipFormat
import WalshipRestore
import WalshipS3
import WalshipStorage
import WalshipSystem
#if canImport(Glibc)
import Glibc
#endif
#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif

// One clear line on every error, exit 1; --help and --version print as usual.
// A peer that closes early (a metrics scraper, a webhook) must not kill the process.
signal(SIGPIPE, SIG_IGN)
// Memory: buffers of 128 KiB and more (LZ4 blocks, read buffers) are mapped and unmapped
// instead of staying in the heap once freed (glibc otherwise raises this threshold as it
// goes), and the few threads share two malloc arenas rather than one each.
_ = glibcMallopt(-3 /* M_MMAP_THRESHOLD */, 128 * 1024)
_ = glibcMallopt(-8 /* M_ARENA_MAX */, 2)
// One process may replicate thousands of databases, each with about a dozen open files: the
// soft limit on open files (often 1,024) is raised towards the hard limit the process was
// given, up to 1,048,576 (some containers allow far more than any fleet needs).
var openFiles = rlimit()
if getrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &openFiles) == 0 && openFiles.rlim_cur < min(openFiles.rlim_max, 1 << 20) {
    openFiles.rlim_cur = min(openFiles.rlim_max, 1 << 20)
    _ = setrlimit(__rlimit_resource_t(RLIMIT_NOFILE.rawValue), &openFiles)
}
// The replica backends beside the built-in directory one: each registers its URL scheme.
S3Backend.register()
do {
    var command = try Walship.parseAsRoot()
    try command.run()
} catch {
    if Walship.exitCode(for: error) == .success { Walship.exit(withError: error) }
    let message = Walship.message(for: error).split(separator: "\n").first.map(String.init) ?? "\(error)"
    // Point at the help of the subcommand that was typed, if one was.
    let names = Walship.configuration.subcommands.map { $0._commandName }
    let help = CommandLine.arguments.dropFirst().first(where: names.contains).map { "walship \($0) --help" } ?? "walship --help"
    FileHandleStderr.write("walship: error: \(message) (see `\(help)`)\n")
    exit(1)
}
