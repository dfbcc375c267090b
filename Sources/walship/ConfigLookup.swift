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

func configuredDatabase(_ db: String, in file: String) throws -> DatabaseConfig {
    guard let d = try ConfigLoader.load(path: file, purpose: .read).database(at: db) else {
        throw ValidationError("\(db) is not a database in \(file) (neither under databases: nor matching a pattern under directories:)")
    }
    return d
}

/// The first replica, in config order, that answers a LIST and holds a generation. When every
/// replica answers and holds nothing, the first one (a restore then finds it empty); when some
/// fail and the rest are empty, nobody can say there is no backup: that is an error.
func firstHealthyReplica(_ replicas: [ReplicaConfig]) throws -> Replica {
    var problems: [String] = []
    var empty: [Replica] = []
    for rc in replicas {
        do {
            let r = try ReplicaBackends.open(rc.url, environment: rc.environment)
            if try r.isEmpty() || listGenerations(r).isEmpty {
                empty.append(r)
                problems.append("\(r.displayURL): holds no backup yet")
                continue
            }
            return r
        } catch { problems.append("\(error)") }
    }
    if let first = empty.first, empty.count == replicas.count { return first }
    throw ValidationError("no healthy replica: " + problems.joined(separator: "; "))
}
