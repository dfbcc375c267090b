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

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List a replica's generations, snapshots, segments and time ranges.")
    @Argument(help: "Replica URL; with --config, the database path from the file (each of its replicas is listed).") var replica: String
    @Option(help: "YAML config file: list every replica of the database named by the argument, checked against the file's key.") var config: String?
    @Flag(help: "Print JSON (with --config, an object keyed by replica URL).") var json = false
    @Option(help: ArgumentHelp("Check each generation against this key (32-byte file): its id must match the one the generation was encrypted with.", valueName: "path"))
    var encryptionKeyFile: String?

    /// Restore granularity of a generation: exact per transaction, except squashed history.
    static func granularity(_ g: GenerationListing) -> String {
        guard let edge = g.segments.filter(\.squashed).map(\.lastTimeMs).max() else { return "transaction" }
        return "transaction after \(Timestamp.format(milliseconds: edge)); compacted boundaries before"
    }

    func run() throws {
        do {
            var key = try loadKey(encryptionKeyFile)
            guard let file = config else { try list(try ReplicaBackends.open(replica), key: key, json: json); return }
            let d = try configuredDatabase(FS.absolute(replica), in: file)
            if key == nil { key = try loadKey(d.encryptionKeyFile) }
            if json { print("{") }
            for (i, rc) in d.replicas.enumerated() {
                let r = try ReplicaBackends.open(rc.url, environment: rc.environment)
                if json {
                    print("\(try jsonString(r.displayURL)): ", terminator: "")
                    try list(r, key: key, json: true)
                    if i + 1 < d.replicas.count { print(",") }
                } else {
                    if i > 0 { print("") }
                    try list(r, key: key, json: false)
                }
            }
            if json { print("}") }
        } catch { fail(error) }
    }

    /// JSON text of a string (quotes and escapes).
    func jsonString(_ s: String) throws -> String {
        let enc = JSONEncoder()
        enc.outputFormatting = [.withoutEscapingSlashes]
        return String(decoding: try enc.encode(s), as: UTF8.self)
    }

    func list(_ r: Replica, key: EncryptionKey?, json: Bool) throws {
        do {
            try r.checkReadable()
            let gens = try listGenerations(r)
            var keyNotes: [String: String] = [:]
            if let k = key {
                for g in gens {
                    var bytes: [UInt8] = []
                    try? r.get(key: "generations/\(g.id)/generation.json") { bytes += $0 }
                    let text = String(decoding: bytes, as: UTF8.self)
                    if text.contains("\"encryption_key_id\":\"\(k.idText)\"") { keyNotes[g.id] = "encrypted with this key (id \(k.idText))" }
                    else if text.contains("encryption_key_id") { keyNotes[g.id] = "encrypted with ANOTHER key (this key's id is \(k.idText))" }
                    else if text.isEmpty { keyNotes[g.id] = "no generation.json" }
                    else { keyNotes[g.id] = "not encrypted" }
                }
            }
            if json {
                var out: [[String: AnyEncodable]] = []
                for g in gens {
                    out.append([
                        "generation": AnyEncodable(g.id),
                        "snapshots": AnyEncodable(g.snapshots.map { ["key": $0.key, "txid": "\($0.txid)", "time": Timestamp.format(milliseconds: $0.timeMs)] }),
                        "segments": AnyEncodable(g.segments.map { ["key": $0.key, "first_txid": "\($0.firstTxid)", "last_txid": "\($0.lastTxid)",
                                                                    "first_time": Timestamp.format(milliseconds: $0.firstTimeMs),
                                                                    "last_time": Timestamp.format(milliseconds: $0.lastTimeMs), "level": "\($0.level)",
                                                                    "granularity": $0.squashed ? "boundary" : "transaction"] }),
                        "first_txid": AnyEncodable(g.snapshots.first.map { "\($0.txid)" } ?? ""),
                        "last_txid": AnyEncodable(g.lastTxid.map { "\($0)" } ?? ""),
                        "first_time": AnyEncodable(g.firstTimeMs.map { Timestamp.format(milliseconds: $0) } ?? ""),
                        "last_time": AnyEncodable(g.lastTimeMs.map { Timestamp.format(milliseconds: $0) } ?? ""),
                        "granularity": AnyEncodable(List.granularity(g)),
                        "encryption": AnyEncodable(keyNotes[g.id] ?? ""),
                    ])
                }
                try printJSON(out)
                return
            }
            if gens.isEmpty { print("no generations in \(r.displayURL)"); return }
            print("replica \(r.displayURL)")
            for g in gens {
                let first = g.firstTimeMs.map { Timestamp.format(milliseconds: $0) } ?? "-"
                let last = g.lastTimeMs.map { Timestamp.format(milliseconds: $0) } ?? "-"
                print("generation \(g.id)  txids \(g.snapshots.first.map { "\($0.txid)" } ?? "-")..\(g.lastTxid.map { "\($0)" } ?? "-")  \(first) .. \(last)  \(g.snapshots.count) snapshot(s), \(g.segments.count) segment(s), restore points: \(List.granularity(g))\(keyNotes[g.id].map { ", " + $0 } ?? "")")
                for s in g.snapshots { print("  snapshot txid \(s.txid)  \(Timestamp.format(milliseconds: s.timeMs))  \(s.key)") }
                for s in g.segments {
                    print("  segment  txids \(s.firstTxid)..\(s.lastTxid)  \(Timestamp.format(milliseconds: s.firstTimeMs)) .. \(Timestamp.format(milliseconds: s.lastTimeMs))  level \(s.level)\(s.squashed ? " (boundaries only)" : "")")
                }
            }
        } catch { fail(error) }
    }
}

struct AnyEncodable: Encodable {
    let value: Encodable
    init(_ v: Encodable) { value = v }
    func encode(to encoder: Encoder) throws { try value.encode(to: encoder) }
}
