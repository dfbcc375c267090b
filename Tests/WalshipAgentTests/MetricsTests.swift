import XCTest
@testable import WalshipAgent

/// The metrics endpoint's series stay bounded: past `perDatabaseLimit` databases, only those
/// that lag or fail have series of their own, and the process's totals cover every database.
final class MetricsTests: XCTestCase {
    private func report(_ i: Int, lag: Double = 0, failing: Bool = false) -> StatusReport {
        var r = StatusReport(database: String(format: "/data/t%05d.db", i))
        r.txid = UInt64(i)
        r.alertLagSeconds = 60
        var rep = ReplicaStatus(url: "file:///r/\(i)")
        rep.lagSeconds = lag
        rep.shippedBytes = 10
        if failing { rep.failingSinceUnix = 1; rep.lastError = "down" }
        r.replicas = [rep]
        return r
    }

    private func series(_ text: String, _ name: String) -> [String] {
        text.split(separator: "\n").map(String.init).filter { $0.hasPrefix(name + "{") || $0.hasPrefix(name + " ") }
    }

    func testAFewDatabasesEachHaveTheirSeries() {
        let text = PrometheusText.render((0..<3).map { report($0) })
        XCTAssertEqual(series(text, "walship_txid").count, 3)
        XCTAssertEqual(series(text, "walship_replication_lag_seconds").count, 3)
        XCTAssertTrue(text.contains("walship_databases{state=\"ok\"} 3\n"), text)
        XCTAssertTrue(text.contains("walship_all_shipped_bytes_total 30\n"), text)
    }

    func testManyDatabasesHaveSeriesOnlyForThoseInTrouble() {
        var reports = (0..<5_000).map { report($0) }
        reports[10] = report(10, failing: true)
        reports[20] = report(20, lag: 61)
        reports[4_000] = report(4_000, lag: 500)
        let text = PrometheusText.render(reports)
        let txids = series(text, "walship_txid")
        XCTAssertEqual(txids.count, 3, txids.joined(separator: "\n"))
        for i in [10, 20, 4_000] {
            XCTAssertTrue(txids.contains { $0.contains(String(format: "t%05d.db", i)) }, "database \(i) in trouble has no series")
        }
        XCTAssertTrue(text.contains("walship_databases{state=\"ok\"} 4997\n"), text)
        XCTAssertTrue(text.contains("walship_databases{state=\"lagging\"} 2\n"), text)
        XCTAssertTrue(text.contains("walship_databases{state=\"failing\"} 1\n"), text)
        XCTAssertTrue(text.contains("walship_all_replication_lag_seconds_max 500\n"), text)
        XCTAssertTrue(text.contains("walship_all_shipped_bytes_total 50000\n"), text)
        XCTAssertLessThan(text.utf8.count, 64 * 1024, "a scrape of 5,000 healthy databases grew with them")
    }

    func testTotalsNeverGoDownWhenAnAgentRestartsOrRetires() {
        let a = AgentStatus(database: "/x/a.db"), b = AgentStatus(database: "/x/b.db")
        a.update { var rep = ReplicaStatus(url: "r"); rep.shippedBytes = 700; $0.replicas = [rep]; $0.errors = ["upload": 2] }
        b.update { var rep = ReplicaStatus(url: "r"); rep.shippedBytes = 300; $0.replicas = [rep] }
        StatusBoard.register(a, for: "/x/a.db")
        StatusBoard.register(b, for: "/x/b.db")
        defer { StatusBoard.unregister(database: "/x/a.db"); StatusBoard.unregister(database: "/x/b.db") }
        func totals() -> (String, String) {
            let text = PrometheusText.render(StatusBoard.reports.filter { $0.database.hasPrefix("/x/") }, carried: StatusBoard.carried)
            let line = { (n: String) in text.split(separator: "\n").first { $0.hasPrefix(n + " ") }.map(String.init) ?? "" }
            return (line("walship_all_shipped_bytes_total"), line("walship_all_errors_total"))
        }
        let before = StatusBoard.carried
        func expect(_ bytes: Double, _ errors: Double, _ why: String) {
            let (b, e) = totals()
            XCTAssertEqual(b, "walship_all_shipped_bytes_total \(PrometheusText.number(bytes + before.shippedBytes))", why)
            XCTAssertEqual(e, "walship_all_errors_total \(PrometheusText.number(errors + before.errors))", why)
        }
        expect(1000, 2, "both running")
        StatusBoard.register(AgentStatus(database: "/x/a.db"), for: "/x/a.db")   // a restarts from zero
        expect(1000, 2, "after a restart")
        StatusBoard.unregister(database: "/x/b.db")                              // b retires
        expect(1000, 2, "after a retirement")
    }

    func testTroubleBeyondTheLimitShowsTheWorstFirst() {
        var reports = (0..<1_000).map { report($0, lag: Double($0)) }   // 939 of them past 60 s
        reports[3] = report(3, failing: true)
        let shown = PrometheusText.shown(reports)
        XCTAssertEqual(shown.count, PrometheusText.perDatabaseLimit)
        XCTAssertTrue(shown.contains { $0.database.hasSuffix("t00003.db") }, "the failing database was left out")
        XCTAssertTrue(shown.contains { $0.database.hasSuffix("t00999.db") }, "the most lagging database was left out")
        XCTAssertFalse(shown.contains { $0.database.hasSuffix("t00100.db") })
    }
}
