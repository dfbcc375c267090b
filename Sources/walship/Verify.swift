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

struct Verify: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a restore drill against a replica; exit 0 when it is healthy, 1 otherwise (for cron).",
        discussion: """
        Restores the latest state (or --timestamp / --txid) into a temporary directory, checks the \
        recorded whole-database checksum and PRAGMA integrity_check, counts the rows of every table, \
        reads every other stored object through (decryption, LZ4 checksums, segment structure), and \
        reports the restorable window. Nothing is written outside the temporary directory.
        """)
    @Argument(help: "Replica URL; with --config, the database path from the file (every replica of it is verified).") var replica: String
    @Option(help: "YAML config file: verify every replica of the database named by the argument, with the file's key and database id.") var config: String?
    @OptionGroup var point: RestorePointOptions
    @Flag(help: "Print the report as JSON (with --config, a list of reports).") var json = false
    @Option(help: "Objects to read through besides the restore: all, segments or none.") var scrub: String = "all"
    @Option(help: "Directory for the temporary restore (default: $TMPDIR or /tmp).") var tempDir: String?
    @OptionGroup var key: ReadKeyOptions
    @OptionGroup var log: LogOptions

    func validate() throws {
        guard ScrubScope(rawValue: scrub) != nil else { throw ValidationError("--scrub must be all, segments or none") }
    }

    func run() throws {
        log.bootstrap()
        let target = try point.target()
        var reports: [VerifyReport] = []
        do {
            var masterKey = try loadKey(key.encryptionKeyFile)
            var databaseID = try key.databaseID()
            let dir = FS.absolute(tempDir ?? ProcessEnvironment.all()["TMPDIR"] ?? "/tmp")
            guard FS.isDirectory(dir) else { throw ValidationError("temporary directory \(dir) does not exist") }
            var replicas: [Replica] = []
            if let file = config {
                let d = try configuredDatabase(FS.absolute(replica), in: file)
                if masterKey == nil { masterKey = try loadKey(d.encryptionKeyFile) }
                if databaseID == nil { databaseID = d.databaseID }
                replicas = try d.replicas.map { try ReplicaBackends.open($0.url, environment: $0.environment) }
            } else {
                replicas = [try ReplicaBackends.open(replica)]
            }
            for r in replicas {
                reports.append(Verifier.run(replica: r, target: target, encryptionKey: masterKey, tempDir: dir, scrub: ScrubScope(rawValue: scrub)!,
                                            allowUnencrypted: key.allowUnencrypted, databaseID: databaseID))
            }
        } catch { fail(error) }
        if json {
            if config != nil { try printJSON(reports) } else { try printJSON(reports[0]) }
        } else {
            for report in reports {
                print("verify \(report.replica): \(report.ok ? "OK" : "FAILED")")
                if let t = report.txid {
                    print("  restored \(report.target): txid \(t) of generation \(report.generation ?? "-") (database \(report.databaseID ?? "-")), committed \(report.commitTime ?? "-"), checksum \(report.checksum ?? "-") verified, integrity \(report.integrity ?? "-")")
                    print("  tables: " + report.tables.sorted { $0.key < $1.key }.map { "\($0.key) \($0.value)" }.joined(separator: ", "))
                }
                print("  restorable window: \(report.oldestRestorable ?? "-") (txid \(report.oldestTxid.map { "\($0)" } ?? "-")) .. \(report.newestRestorable ?? "-") (txid \(report.newestTxid.map { "\($0)" } ?? "-"))")
                print("  objects checked: \(report.objectsChecked) in \(oneDecimal(report.seconds)) s")
                for p in report.problems { print("  problem: \(p)") }
                for n in report.notes { print("  note: \(n)") }
            }
        }
        let failed = reports.filter { !$0.ok }
        if let first = failed.first {
            FileHandleStderr.write("walship: error: verify failed\(reports.count > 1 ? " for \(failed.count) of \(reports.count) replicas" : ""): \(first.problems.first ?? "unknown problem")\n")
            Glibc.exit(1)
        }
    }
}
