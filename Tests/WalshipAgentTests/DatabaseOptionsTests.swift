import XCTest
@testable import WalshipAgent
@testable import WalshipConfig
@testable import WalshipRestore
@testable import WalshipStorage
@testable import WalshipSystem

/// The shared options' defaults are the ones the settings and the agent start from, and every
/// default parses under its own rule.
final class DatabaseOptionsTests: XCTestCase {
    func testDefaultsAgreeEverywhere() {
        let schema = DatabaseOptions.defaults(path: "/x.db")
        let plain = DatabaseConfig(path: "/x.db", replicas: [])
        let agent = AgentOptions(databasePath: "/x.db", replicaURLs: [])
        let fromSchema = AgentOptions(schema, encryptionKey: nil)
        XCTAssertEqual(schema.syncIntervalUs, plain.syncIntervalUs)
        XCTAssertEqual(schema.snapshotIntervalUs, plain.snapshotIntervalUs)
        XCTAssertEqual(schema.checkpointFrames, plain.checkpointFrames)
        XCTAssertEqual(schema.readDelayUs, plain.readDelayUs)
        XCTAssertEqual(schema.spoolLimitBytes, plain.spoolLimitBytes)
        XCTAssertEqual(schema.retentionUs, plain.retentionUs)
        XCTAssertEqual(schema.compactionLevelsUs, plain.compactionLevelsUs)
        XCTAssertEqual(schema.fineWindowUs, plain.fineWindowUs)
        XCTAssertEqual(schema.verifyIntervalUs, plain.verifyIntervalUs)
        XCTAssertEqual(schema.alertLagUs, plain.alertLagUs)
        XCTAssertEqual(schema.alertSyncFailureUs, plain.alertSyncFailureUs)
        XCTAssertEqual(fromSchema.syncIntervalUs, agent.syncIntervalUs)
        XCTAssertEqual(fromSchema.snapshotIntervalUs, agent.snapshotIntervalUs)
        XCTAssertEqual(fromSchema.checkpointFrames, agent.checkpointFrames)
        XCTAssertEqual(fromSchema.readDelayUs, agent.readDelayUs)
        XCTAssertEqual(fromSchema.spoolLimitBytes, agent.spoolLimitBytes)
        XCTAssertEqual(fromSchema.retentionUs, agent.retentionUs)
        XCTAssertEqual(fromSchema.compactionLevelsUs, agent.compactionLevelsUs)
        XCTAssertEqual(fromSchema.fineWindowUs, agent.fineWindowUs)
        XCTAssertEqual(fromSchema.verifyIntervalUs, agent.verifyIntervalUs)
        XCTAssertEqual(fromSchema.alertLagUs, agent.alertLagUs)
        XCTAssertEqual(fromSchema.alertSyncFailureUs, agent.alertSyncFailureUs)
    }

    func testEveryKeyIsUniqueAndHasHelp() {
        let keys = DatabaseOptions.all.map(\.key)
        XCTAssertEqual(Set(keys).count, keys.count)
        for o in DatabaseOptions.all { XCTAssertFalse(o.help.isEmpty, o.key) }
    }
}
