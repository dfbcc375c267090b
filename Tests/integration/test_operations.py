"""walship's operations features with real SQLite, separate writer processes, real directory
replicas and a real `rclone serve s3` with authentication (s3server.py). Nothing is mocked.

  1. verify: a good replica passes (row counts, window); one flipped byte fails, naming the object
  2. encryption at rest: no plaintext in any stored object; no key / wrong key restore nothing
  3. /metrics: lag rises while S3 is down and writes go on, back to 0 after; upload errors counted
  4. retention: old snapshots and the segments only they need go; the window stays restorable
  5. webhook alerts: FIRING then RESOLVED around an S3 outage; the webhook path never logged
  6. compaction: level-1 merges exact per transaction and keeping up with closed windows; squashed
     history beyond the fine window; PITR exact inside it; boundaries only
     (and a clear failure) in squashed history; latest exact; verify passes
  7. security: spool 0700 / files 0600; no S3 secret and no key bytes in logs, status or metrics
  8. status: replica and lag while an agent runs (exit 0); exit 3 once it is gone
"""
import base64
import json
import os
import re
import sqlite3
import stat
import threading
import time
import urllib.request
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from conftest import (HERE, checkpoint_truncate, create_ticket_db, file_bytes_equal, run_walship,
                      table_contents)
from s3server import s3server  # noqa: F401  (fixture)
from test_s3 import run_py
from workload import chain_problems, digest_of, rfc3339, start_writer

WRITER = HERE / "writer.py"
WORKLOAD = HERE / "workload.py"
SUMMARY_RE = re.compile(r"^restored (.+): generation (\S+)(?: \(database [0-9a-f]{16}\))?, txid (\d+), committed (\S+),", re.M)
METRICS_URL_RE = re.compile(r"metrics\.url=(http://127\.0\.0\.1:\d+/metrics)")
META_BYTES = 136   # LZ4 skippable frame header (8) + walship metadata body (128), docs/FORMAT.md


# ---------------------------------------------------------------- helpers

def furl(path):
    return "file://" + str(path)


def restore(url, out, *args, env=None):
    """Restores, checks the summary line, returns (generation, txid)."""
    p = run_walship("restore", url, "-o", out, *args, env=env, timeout=120)
    assert p.returncode == 0, f"restore {args} from {url} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    m = SUMMARY_RE.search(p.stdout)
    assert m, f"no summary line in restore output:\n{p.stdout}\n{p.stderr}"
    return m.group(2), int(m.group(3))


def list_json(url, *args, env=None):
    p = run_walship("list", url, "--json", *args, env=env, timeout=120)
    assert p.returncode == 0, f"list {url} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def verify_json(url, *args, env=None):
    p = run_walship("verify", url, "--json", *args, env=env, timeout=120)
    try:
        report = json.loads(p.stdout)
    except ValueError:
        report = None
    return p, report


def write_key(path, data=None):
    data = os.urandom(32) if data is None else data
    fd = os.open(str(path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return data


def stop_writer(stop_file, writer, log_path=None):
    Path(stop_file).write_text("stop")
    writer.wait(timeout=60)
    assert writer.returncode == 0, Path(log_path).read_text() if log_path else writer.returncode


def read_instants(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def source_row_counts(db):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    names = [r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'")]
    out = {n: con.execute(f'SELECT count(*) FROM "{n}"').fetchone()[0] for n in names}
    con.close()
    return out


def replica_files(root):
    return sorted(p for p in Path(root).rglob("*") if p.is_file())


def parse_snapshot(path):
    """(txid, unix ms) from <txid:016x>-<unixMs>.snap.lz4."""
    txid, ms = Path(path).name[:-len(".snap.lz4")].split("-")
    return int(txid, 16), int(ms)


def parse_segment(path):
    """(level, first, last, firstMs, lastMs, squashed) from a segment's path."""
    name = Path(path).name
    squashed = name.endswith("-s.seg.lz4")
    stem = name[:-len("-s.seg.lz4")] if squashed else name[:-len(".seg.lz4")]
    first, last, fms, lms = stem.split("-")[:4]
    return int(Path(path).parent.name), int(first, 16), int(last, 16), int(fms), int(lms), squashed


def parse_time(text):
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc).timestamp()


def metrics_url(agent, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = METRICS_URL_RE.search(agent.read_log())
        if m:
            return m.group(1)
        time.sleep(0.05)
    raise AssertionError(f"no metrics.url= line in the agent log:\n{agent.read_log()[-3000:]}")


LINE_RE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)$')
LABEL_RE = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(url):
    """Prometheus text -> {(name, frozenset(labels)): value}, plus the raw text."""
    with urllib.request.urlopen(url, timeout=5) as r:
        assert r.status == 200
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = LINE_RE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        labels = frozenset(LABEL_RE.findall(m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out, text


def metric(samples, name, **labels):
    """The sum of every sample of `name` whose labels include `labels` (None if there is none)."""
    want = set(labels.items())
    vals = [v for (n, ls), v in samples.items() if n == name and want <= set(ls)]
    return sum(vals) if vals else None


def wait_until(pred, timeout, what, interval=0.2):
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        last = pred()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} (not within {timeout}s; last value {last!r})")


class WebhookReceiver:
    """A Slack-style webhook endpoint on loopback that records every POST."""

    def __init__(self):
        self.posts = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = {"unparseable": body.decode(errors="replace")}
                with receiver.lock:
                    receiver.posts.append({"path": self.path, "content_type": self.headers.get("Content-Type"),
                                           "json": doc, "at": time.time()})
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def find(self, state, condition_prefix):
        with self.lock:
            return [p for p in self.posts
                    if p["json"].get("walship", {}).get("state") == state
                    and p["json"].get("walship", {}).get("condition", "").startswith(condition_prefix)]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------- 1. verify

def test_verify_good_replica_then_one_flipped_byte(tmp_path, agent_factory):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=30)
    agent = agent_factory(db, [furl(replica)], ["--sync-interval", "200ms"]).start().wait_ready()
    run_py(WRITER, "bursts", db, "--bursts", "4", "--per-burst", "30", "--pause", "0.4", "--seed", "5")
    run_py(WORKLOAD, "mixed", db, "--seed", 6, "--tx", 80)
    time.sleep(0.6)
    agent.stop()

    gens = list_json(furl(replica))
    assert len(gens) == 1 and not chain_problems(gens), (chain_problems(gens), gens)
    last_txid = int(gens[0]["last_txid"])

    # a good replica: exit 0, ok, the source's row counts, the restorable window
    p, rep = verify_json(furl(replica))
    assert p.returncode == 0, f"verify of a good replica failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    assert rep and rep["ok"] is True and rep["problems"] == [], p.stdout
    assert rep["tables"] == source_row_counts(db), (rep["tables"], source_row_counts(db))
    assert rep["txid"] == last_txid and rep["newestTxid"] == last_txid, (rep, last_txid)
    assert rep["oldestTxid"] == 0, rep
    oldest, newest = parse_time(rep["oldestRestorable"]), parse_time(rep["newestRestorable"])
    assert oldest <= newest <= time.time(), rep
    assert rep["integrity"] == "ok" and re.fullmatch(r"[0-9a-f]{16}", rep["checksum"]), rep
    segs = sorted(replica.glob("generations/*/segments/*/*.seg.lz4"))
    snaps = sorted(replica.glob("generations/*/snapshots/*.snap.lz4"))
    assert len(segs) >= 4, segs
    assert rep["objectsChecked"] >= len(segs) + len(snaps), (rep["objectsChecked"], len(segs), len(snaps))
    p = run_walship("verify", furl(replica))
    assert p.returncode == 0 and "OK" in p.stdout, p.stdout + p.stderr

    # one flipped byte in the middle of a segment's compressed part
    victim = max(segs, key=lambda s: s.stat().st_size)
    key = str(victim.relative_to(replica))
    data = bytearray(victim.read_bytes())
    assert len(data) > META_BYTES + 64, len(data)
    off = META_BYTES + (len(data) - META_BYTES) // 2
    data[off] ^= 0xFF
    victim.write_bytes(bytes(data))

    p = run_walship("verify", furl(replica))
    out = p.stdout + p.stderr
    assert p.returncode != 0, f"verify passed with a corrupted segment {key}:\n{out}"
    assert key in out, f"verify output does not name the corrupted object {key}:\n{out}"

    p, rep = verify_json(furl(replica))
    assert p.returncode != 0, p.stdout
    assert rep is not None and rep["ok"] is False, p.stdout + p.stderr
    assert any(key in pr for pr in rep["problems"]), f"no problem names {key}: {rep['problems']}"
    # only the segments scrub still finds it too
    p = run_walship("verify", furl(replica), "--scrub", "segments")
    assert p.returncode != 0 and key in p.stdout + p.stderr, p.stdout + p.stderr
    # a drill to the last txid of the corrupted segment fails on it as well (one to a txid in
    # its middle may stop reading before the flipped byte, and rightly pass)
    _, first, last, _, _, _ = parse_segment(victim)
    p = run_walship("verify", furl(replica), "--txid", last, "--scrub", "none")
    assert p.returncode != 0 and key in p.stdout + p.stderr, p.stdout + p.stderr


# ---------------------------------------------------------------- 2. encryption at rest

def test_encryption_hides_plaintext_and_needs_the_key(tmp_path, agent_factory):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    key, wrong, short = tmp_path / "key", tmp_path / "wrong.key", tmp_path / "short.key"
    write_key(key)
    write_key(wrong)
    write_key(short, os.urandom(31))
    secret = f"TOPSECRET-{uuid.uuid4().hex}"
    create_ticket_db(db, rows=20)
    agent = agent_factory(db, [furl(replica)], ["--sync-interval", "200ms", "--encryption-key-file", key])
    agent.start().wait_ready()
    run_py(WRITER, "insert", db, "--text", secret + "-1")
    run_py(WORKLOAD, "mixed", db, "--seed", 9, "--tx", 60)
    time.sleep(0.5)
    p = run_walship("snapshot", db, timeout=60)   # the agent takes it: the secret is in a snapshot too
    assert p.returncode == 0, p.stdout + p.stderr
    run_py(WRITER, "insert", db, "--text", secret + "-2")
    time.sleep(0.6)
    agent.stop()
    assert secret.encode() in Path(db).read_bytes() + Path(str(db) + "-wal").read_bytes()

    files = replica_files(replica)
    snaps = [f for f in files if f.name.endswith(".snap.lz4")]
    segs = [f for f in files if f.name.endswith(".seg.lz4")]
    assert len(snaps) >= 2 and len(segs) >= 2, [str(f.relative_to(replica)) for f in files]
    leaked = [str(f.relative_to(replica)) for f in files if secret.encode() in f.read_bytes()]
    assert not leaked, f"plaintext {secret} found in stored objects: {leaked}"
    # no silent downgrade: with the agent stopped, a snapshot without the key is refused (the
    # spool knows the database is replicated encrypted) and nothing is stored
    plain = tmp_path / "plain-replica"
    checkpoint_truncate(db)
    before = sorted(str(f) for f in replica_files(replica))
    p = run_walship("snapshot", db, furl(replica), timeout=60)
    assert p.returncode == 1 and "is replicated encrypted" in p.stderr and "--encryption-key-file" in p.stderr, p.stdout + p.stderr
    assert sorted(str(f) for f in replica_files(replica)) == before
    # positive control: the same database shipped without a key (its own spool) shows the string in the clear
    p = run_walship("snapshot", db, furl(plain), "--spool-dir", tmp_path / "plain-spool", timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    assert any(secret.encode() in f.read_bytes() for f in replica_files(plain)), \
        "positive control failed: the secret is not visible in an unencrypted replica either"

    url = furl(replica)
    for name, args, words in [("no key", [], ["encrypted", "--encryption-key-file"]),
                              ("wrong key", ["--encryption-key-file", wrong], ["key"]),
                              ("31-byte key", ["--encryption-key-file", short], ["32"])]:
        outdir = tmp_path / f"out-{name.replace(' ', '-')}"
        outdir.mkdir()
        p = run_walship("restore", url, "-o", outdir / "restored.db", *args, timeout=60)
        err = p.stderr
        assert p.returncode != 0, f"restore with {name} succeeded:\n{p.stdout}\n{err}"
        assert "walship: error:" in err and all(w in err for w in words), f"restore with {name}: unclear error:\n{err}"
        assert os.listdir(outdir) == [], f"restore with {name} left files: {os.listdir(outdir)}"
        p = run_walship("verify", url, *args, timeout=60)
        assert p.returncode != 0, f"verify with {name} passed:\n{p.stdout}\n{p.stderr}"

    out = tmp_path / "restored.db"
    restore(url, out, "--encryption-key-file", key)
    assert table_contents(out) == table_contents(db)
    assert file_bytes_equal(out, db), "restore with the key is not byte-identical to the checkpointed source"
    assert any(r[1] == secret + "-2" for r in table_contents(out)["usuarios"])
    p, rep = verify_json(url, "--encryption-key-file", key)
    assert p.returncode == 0 and rep["ok"], p.stdout + p.stderr


def test_encrypted_point_in_time_restore_authenticates_the_whole_last_object(tmp_path, agent_factory):
    """A restore that stops inside an encrypted segment still reads it to the end: only the
    final chunk's tag authenticates the whole object. A segment of about 480 KB (two 256 KiB LZ4
    blocks, eight 64 KiB sealed chunks) has its final tag altered; a restore to its first
    transaction, which needs only the first block, must fail."""
    db, replica, key = tmp_path / "app.db", tmp_path / "replica", tmp_path / "key"
    write_key(key)
    create_ticket_db(db, rows=5)
    agent = agent_factory(db, [furl(replica)], ["--sync-interval", "3s", "--encryption-key-file", key])
    agent.start().wait_ready()
    con = sqlite3.connect(db, isolation_level=None)
    con.execute("CREATE TABLE blobs(id INTEGER PRIMARY KEY, b BLOB NOT NULL)")
    for _ in range(16):   # random bytes: LZ4 cannot shrink them
        con.execute("INSERT INTO blobs(b) VALUES(randomblob(30000))")
    con.close()
    time.sleep(3.5)
    agent.stop()
    [g] = list_json(furl(replica), "--encryption-key-file", key)
    big = [s for s in g["segments"] if int(s["last_txid"]) - int(s["first_txid"]) >= 15]
    assert big, f"no segment holds the 16 inserts: {g['segments']}"
    seg, first = big[0], int(big[0]["first_txid"])
    path = replica / seg["key"]
    assert path.stat().st_size > 256 * 1024 + 2 * 65536, path.stat().st_size

    good = tmp_path / "good.db"
    restore(furl(replica), good, "--txid", str(first), "--encryption-key-file", key)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01   # the final chunk's tag
    path.write_bytes(bytes(data))
    out = tmp_path / "tampered.db"
    p = run_walship("restore", furl(replica), "-o", out, "--txid", str(first), "--encryption-key-file", key)
    assert p.returncode != 0, f"a restore through an altered object succeeded:\n{p.stdout}{p.stderr}"
    assert "fails authentication" in p.stderr and seg["key"] in p.stderr, p.stderr
    assert not out.exists()


# ---------------------------------------------------------------- 3. metrics

def test_metrics_lag_rises_during_s3_outage_and_returns_to_zero(tmp_path, agent_factory, s3server):
    srv = s3server
    env = srv.env()
    url = srv.url("walship", "metrics")
    db = tmp_path / "app.db"
    create_ticket_db(db, rows=20)
    agent = agent_factory(db, [url], ["--sync-interval", "200ms", "--metrics-addr", "127.0.0.1:0"], env=env)
    agent.start().wait_ready()
    murl = metrics_url(agent)
    stop_file, wlog = tmp_path / "stop-writer", tmp_path / "writer.log"
    writer = start_writer("tickets", db, "--seed", 13, "--stop-file", stop_file, "--rate", 40, log_path=wlog)
    try:
        time.sleep(1.5)
        m0, text0 = scrape(murl)
        for name in ("walship_replication_lag_seconds", "walship_last_sync_timestamp_seconds", "walship_txid",
                     "walship_shipped_bytes_total", "walship_shipped_objects_total", "walship_wal_bytes",
                     "walship_spool_bytes", "walship_snapshot_age_seconds"):
            assert metric(m0, name) is not None, f"{name} missing from /metrics:\n{text0}"
        lag0 = metric(m0, "walship_replication_lag_seconds", db=str(db))
        assert lag0 is not None and lag0 < 2.0, f"lag {lag0} while S3 is up:\n{text0}"
        assert metric(m0, "walship_requests_total", type="PUT") > 0, text0
        assert (metric(m0, "walship_errors_total", kind="upload") or 0) == 0, text0
        txid0 = metric(m0, "walship_txid")

        srv.stop()
        down_at = time.time()
        time.sleep(2.0)
        m1, _ = scrape(murl)
        lag1 = metric(m1, "walship_replication_lag_seconds")
        time.sleep(3.0)
        m2, text2 = scrape(murl)
        lag2 = metric(m2, "walship_replication_lag_seconds")
        assert agent.proc.poll() is None, agent.read_log()
        assert lag2 >= 4.0 and lag2 - lag1 >= 2.0, f"lag did not rise during the outage: {lag1} then {lag2}"
        assert metric(m2, "walship_txid") > txid0, "walship_txid did not move while writes went on"
        assert metric(m2, "walship_spool_bytes") > 0, text2
        assert metric(m2, "walship_requests_total", type="PUT") > metric(m0, "walship_requests_total", type="PUT")
        # An upload counts as failed once the agent's S3 client has tried twice (then the
        # shipper's own backoff takes over), so the counter moves within seconds. The status
        # is refreshed every 250 ms: scrape again only after that.
        time.sleep(0.6)
        def upload_errors():
            m, _ = scrape(murl)
            return m if (metric(m, "walship_errors_total", kind="upload") or 0) > 0 else None
        m4 = wait_until(upload_errors, 15, f"no upload errors counted during a {time.time() - down_at:.0f} s outage")
        print(f"first upload error counted {time.time() - down_at:.1f} s into the outage")
        errs = metric(m4, "walship_errors_total", kind="upload")
        lag4 = metric(m4, "walship_replication_lag_seconds")
        assert lag4 > lag2, (lag2, lag4)
        last_sync_down = metric(m4, "walship_last_sync_timestamp_seconds")
        assert last_sync_down < down_at + 1, "a sync succeeded while the server was down"

        srv.restart()
        up_at = time.time()
    finally:
        stop_writer(stop_file, writer, wlog)

    def caught_up():
        m, _ = scrape(murl)
        lag = metric(m, "walship_replication_lag_seconds")
        return m if lag == 0 else None
    m3 = wait_until(caught_up, 30, "lag did not return to 0 after S3 came back and writes stopped")
    assert metric(m3, "walship_last_sync_timestamp_seconds") > max(last_sync_down, up_at - 1)
    assert metric(m3, "walship_errors_total", kind="upload") >= errs
    assert metric(m3, "walship_spool_bytes") == 0
    agent.stop()

    checkpoint_truncate(db)
    restore(url, tmp_path / "latest.db", env=env)
    assert table_contents(tmp_path / "latest.db") == table_contents(db)


# ---------------------------------------------------------------- 4. retention

def test_retention_deletes_old_snapshots_and_their_segments(tmp_path, agent_factory):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    retention = 6.0
    create_ticket_db(db, rows=20)
    agent = agent_factory(db, [furl(replica)], ["--sync-interval", "200ms", "--snapshot-interval", "3s",
                                                 "--retention", "6s"]).start().wait_ready()
    stop_file, instants_file, wlog = tmp_path / "stop-writer", tmp_path / "instants.jsonl", tmp_path / "writer.log"
    writer = start_writer("tickets", db, "--seed", 21, "--stop-file", stop_file, "--rate", 60,
                          "--instants-file", instants_file, "--instant-every", 0.5, log_path=wlog)
    try:
        time.sleep(15.0)
    finally:
        stop_writer(stop_file, writer, wlog)
    time.sleep(0.8)
    t_sigterm = time.time()
    agent.stop()
    t_stopped = time.time()
    log = agent.read_log()

    taken = re.findall(r"snapshot\.key=(\S+\.snap\.lz4)", log)
    assert len(taken) >= 5, f"only {len(taken)} snapshots taken in 15 s at --snapshot-interval 3s"
    assert "retention deleted old objects" in log, log[-3000:]

    snaps = sorted(parse_snapshot(p) for p in replica.glob("generations/*/snapshots/*.snap.lz4"))
    segs = [parse_segment(p) for p in replica.glob("generations/*/segments/*/*.seg.lz4")]
    assert snaps, "retention deleted every snapshot"
    assert snaps[0][0] > 0, f"the first snapshot (txid 0) is still there: {snaps}"
    assert len(snaps) < len(taken), (snaps, taken)
    # housekeeping runs every 1.5 s (retention / 4) on the shipper's queue: allow 3 s for it
    old = [s for s in snaps if s[1] < (t_sigterm - retention - 3.0) * 1000]
    assert len(old) <= 1, f"more than one snapshot older than the retention window is kept: {old}"
    base_txid, base_ms = snaps[0]
    assert base_ms <= (t_stopped - retention) * 1000, \
        f"oldest kept snapshot {snaps[0]} is newer than the retention cutoff: the window is not restorable"
    needless = [s for s in segs if s[2] <= base_txid]
    assert not needless, f"segments only deleted snapshots needed are still stored: {needless}"
    assert min(s[1] for s in segs) == base_txid + 1, (base_txid, sorted(segs)[:3])
    gens = list_json(furl(replica))
    assert len(gens) == 1 and not chain_problems(gens), chain_problems(gens)

    # every point of the retention window is still restorable, exactly
    instants = read_instants(instants_file)
    inside = [x for x in instants if t_stopped - retention + 0.5 < x["t_commit"]]
    assert len(inside) >= 4, (len(inside), len(instants))
    for k, x in enumerate(inside[::2]):
        out = tmp_path / f"pitr-{k}.db"
        restore(furl(replica), out, "--timestamp", rfc3339(x["t"]), "--integrity", "quick")
        assert digest_of(table_contents(out)) == x["digest"], f"--timestamp {rfc3339(x['t'])} differs"
        out.unlink()
    p, rep = verify_json(furl(replica))
    assert p.returncode == 0 and rep["ok"], p.stdout + p.stderr
    assert rep["oldestTxid"] == base_txid, (rep["oldestTxid"], base_txid)

    checkpoint_truncate(db)
    restore(furl(replica), tmp_path / "latest.db")
    assert file_bytes_equal(tmp_path / "latest.db", db), "latest restore differs from the checkpointed source"


# ---------------------------------------------------------------- 5. webhook alerts

def test_webhook_firing_then_resolved_and_path_never_logged(tmp_path, agent_factory, s3server):
    srv = s3server
    env = srv.env()
    url = srv.url("walship", "alerts")
    token = "T0ALERTS/B0SECRET/" + uuid.uuid4().hex
    hook = WebhookReceiver()
    try:
        webhook = f"http://127.0.0.1:{hook.port}/services/{token}"
        db = tmp_path / "app.db"
        create_ticket_db(db, rows=20)
        agent = agent_factory(db, [url], ["--sync-interval", "200ms", "--webhook-url", webhook,
                                          "--alert-sync-failure", "1s", "--alert-lag", "3s"], env=env)
        agent.start().wait_ready()
        stop_file, wlog = tmp_path / "stop-writer", tmp_path / "writer.log"
        writer = start_writer("tickets", db, "--seed", 17, "--stop-file", stop_file, "--rate", 30, log_path=wlog)
        try:
            time.sleep(1.5)
            assert hook.posts == [], f"alerts while everything is healthy: {hook.posts}"
            srv.stop()
            down_at = time.time()
            wait_until(lambda: hook.find("FIRING", "lag:"), 15, "no FIRING lag alert during the S3 outage")
            # uploads count as failing once the S3 client's retries (~6-9 s) are exhausted
            fired = wait_until(lambda: hook.find("FIRING", "sync:"), 20, "no FIRING sync alert during the S3 outage")
            print(f"sync alert fired {fired[0]['at'] - down_at:.1f} s into the outage (--alert-sync-failure 1s)")
            assert not hook.find("RESOLVED", ""), hook.posts
            srv.restart()
            resolved = wait_until(lambda: hook.find("RESOLVED", "sync:"), 20, "no RESOLVED sync alert after S3 came back")
            wait_until(lambda: hook.find("RESOLVED", "lag:"), 20, "no RESOLVED lag alert after S3 came back")
        finally:
            stop_writer(stop_file, writer, wlog)
        agent.stop()
    finally:
        hook.close()

    f, r = fired[0], resolved[0]
    assert f["path"] == f"/services/{token}", f["path"]
    assert (f["content_type"] or "").startswith("application/json"), f
    assert f["json"]["text"].startswith("[walship FIRING]"), f["json"]
    assert r["json"]["text"].startswith("[walship RESOLVED]"), r["json"]
    assert f["json"]["walship"]["condition"] == r["json"]["walship"]["condition"]
    assert str(db) in f["json"]["text"], f["json"]["text"]
    assert r["at"] > f["at"]
    # each condition fires once per outage (repeats are hourly), then resolves once
    assert len(hook.find("FIRING", "sync:")) == 1 and len(hook.find("RESOLVED", "sync:")) == 1, hook.posts
    log = agent.read_log()
    assert "alert firing" in log and "alert resolved" in log, log[-3000:]
    for secret in (token, "B0SECRET", "/services/T0ALERTS"):
        assert secret not in log, f"webhook path ({secret}) appears in the agent log"


# ---------------------------------------------------------------- 6. compaction

def restore_chain_end(g):
    """Follows the restore chain (newest segment reaching furthest) from the first snapshot."""
    by_first = {}
    for s in g["segments"]:
        by_first.setdefault(int(s["first_txid"]), []).append(s)
    pos = min(int(s["txid"]) for s in g["snapshots"])
    while pos + 1 in by_first:
        pos = max(int(s["last_txid"]) for s in by_first[pos + 1])
    return pos


def uncompacted_closed_windows(segs, window_s, closed_before):
    """Closed level-1 windows (ended before `closed_before`, unix s) still holding two or more
    level-0 segments wholly inside them: level 1 should have merged those."""
    per_window = {}
    for s in segs:
        if s["level"] != "0":
            continue
        a, b = parse_time(s["first_time"]), parse_time(s["last_time"])
        w = int(a // window_s)
        if b < (w + 1) * window_s and (w + 1) * window_s <= closed_before:
            per_window.setdefault(w, []).append(s["key"].rsplit("/", 1)[-1])
    return {f"[{w * window_s:.0f}, {(w + 1) * window_s:.0f})": keys for w, keys in sorted(per_window.items())
            if len(keys) >= 2}


def check_instants_exact(url, instants, tmp_path, tag):
    bad = []
    for k, x in enumerate(instants):
        out = tmp_path / f"{tag}-{k}.db"
        p = run_walship("restore", url, "-o", out, "--timestamp", rfc3339(x["t"]), "--integrity", "quick")
        if p.returncode != 0:
            bad.append(f"t={rfc3339(x['t'])}: restore failed: {p.stderr.strip()}")
            continue
        if digest_of(table_contents(out)) != x["digest"]:
            bad.append(f"t={rfc3339(x['t'])}: contents differ from the writer's copy; {p.stdout.strip()}")
        out.unlink()
    assert not bad, "\n".join(bad)


# a level-1 window closes one sync interval + 1 s after its end; the agent merges it at its
# next cut (every 0.2 s here); level 2 (housekeeping, every half smallest window) within ~4 s
SETTLE_SLACK = 2 * 0.2 + 2.0 + 1.0 + 1.5


def test_level1_compaction_merges_closed_windows_exactly(tmp_path, agent_factory):
    """Level 1 only (the last level's window is an hour, so nothing is squashed): level-0
    segments are merged per closed 2 s window, and every transaction stays a restore point."""
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=20)
    agent = agent_factory(db, [furl(replica)], ["--sync-interval", "200ms", "--compaction", "2s,1h",
                                                 "--fine-window", "1h"]).start().wait_ready()
    stop_file, instants_file, wlog = tmp_path / "stop-writer", tmp_path / "instants.jsonl", tmp_path / "writer.log"
    writer = start_writer("tickets", db, "--seed", 37, "--stop-file", stop_file, "--rate", 50,
                          "--instants-file", instants_file, "--instant-every", 0.3, log_path=wlog)
    try:
        time.sleep(11.0)
    finally:
        stop_writer(stop_file, writer, wlog)
    time.sleep(0.8)
    t_sigterm = time.time()
    agent.stop()

    [g] = list_json(furl(replica))
    segs = g["segments"]
    level1 = [s for s in segs if s["level"] == "1"]
    assert level1, "no level-1 segment after 11 s of writes with --compaction 2s,1h:\n" + \
        "\n".join(s["key"] for s in segs)
    assert not any(s["key"].endswith("-s.seg.lz4") or s["granularity"] != "transaction" for s in segs), segs
    assert g["granularity"] == "transaction", g["granularity"]
    assert restore_chain_end(g) == int(g["last_txid"])
    for c in level1:
        lo, hi = int(c["first_txid"]), int(c["last_txid"])
        # a segment belongs to the window its first transaction falls in, and ends within one
        # sync interval (0.2 s) of the cut after it: a merged run may overrun its window that much
        w_end = (parse_time(c["first_time"]) // 2 + 1) * 2
        assert hi > lo and parse_time(c["last_time"]) < w_end + 0.5, c
        covered = [s["key"] for s in segs if s["level"] == "0" and lo <= int(s["first_txid"]) and int(s["last_txid"]) <= hi]
        assert not covered, f"{c['key']} left the level-0 segments it covers: {covered[:3]}"

    # every recorded instant restores exactly, those inside level-1 segments included
    instants = read_instants(instants_file)
    ranges = [(parse_time(s["first_time"]), parse_time(s["last_time"])) for s in level1]
    in_l1 = [x for x in instants if any(a <= x["t_commit"] - 0.01 and x["t"] + 0.01 < b for a, b in ranges)]
    assert len(in_l1) >= 2, f"only {len(in_l1)} instants fell inside level-1 segments {ranges}"
    check_instants_exact(furl(replica), instants, tmp_path, "l1")
    # txid by txid inside one level-1 segment: each restores, and consecutive ones differ
    c = level1[0]
    states = []
    for t in range(int(c["first_txid"]), min(int(c["last_txid"]), int(c["first_txid"]) + 4) + 1):
        _, got = restore(furl(replica), tmp_path / f"tx-{t}.db", "--txid", t, "--integrity", "none")
        assert got == t
        states.append(digest_of(table_contents(tmp_path / f"tx-{t}.db")))
    assert len(set(states)) == len(states), "restores to consecutive txids inside a level-1 segment are not distinct"

    p, rep = verify_json(furl(replica))
    assert p.returncode == 0 and rep["ok"], p.stdout + p.stderr
    checkpoint_truncate(db)
    restore(furl(replica), tmp_path / "latest.db")
    assert file_bytes_equal(tmp_path / "latest.db", db), "latest restore differs from the checkpointed source"

    # level 1 kept up: no closed window still holds several level-0 segments
    stuck = uncompacted_closed_windows(segs, 2.0, t_sigterm - SETTLE_SLACK)
    assert not stuck, (f"{len(stuck)} closed 2 s windows were never merged into level 1 "
                       f"(agent stopped at {t_sigterm:.1f}):\n" + json.dumps(stuck, indent=1)[:4000])


def test_compaction_keeps_fine_window_exact_and_squashes_older_history(tmp_path, agent_factory):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    fine = 6.0
    create_ticket_db(db, rows=20)
    agent = agent_factory(db, [furl(replica)], ["--sync-interval", "200ms", "--compaction", "2s,4s",
                                                 "--fine-window", "6s", "--snapshot-interval", "7s"])
    agent.start().wait_ready()
    stop_file, instants_file, wlog = tmp_path / "stop-writer", tmp_path / "instants.jsonl", tmp_path / "writer.log"
    writer = start_writer("tickets", db, "--seed", 31, "--stop-file", stop_file, "--rate", 50,
                          "--instants-file", instants_file, "--instant-every", 0.4, log_path=wlog)

    def levels_present():
        found = [parse_segment(p) for p in replica.glob("generations/*/segments/*/*.seg.lz4")]
        return {s[0] for s in found} >= {1, 2} and any(s[5] for s in found)
    try:
        time.sleep(10.0)
        wait_until(levels_present, 15, "no level-1 and squashed level-2 segments appeared", interval=0.5)
        time.sleep(1.0)
    finally:
        stop_writer(stop_file, writer, wlog)
    time.sleep(0.8)
    t_sigterm = time.time()
    agent.stop()
    t_stopped = time.time()

    gens = list_json(furl(replica))
    assert len(gens) == 1, gens
    g = gens[0]
    segs = g["segments"]
    squashed = [s for s in segs if s["key"].endswith("-s.seg.lz4")]
    assert squashed, json.dumps(segs, indent=1)[:3000]
    assert all(s["granularity"] == "boundary" and s["level"] == "2" for s in squashed), squashed
    assert all(s["granularity"] == "transaction" for s in segs if s not in squashed)
    assert g["granularity"].startswith("transaction after "), g["granularity"]
    # squashed history is older than the fine window (as of the agent's last housekeeping)
    edge = max(parse_time(s["last_time"]) for s in squashed)
    assert edge < t_stopped - fine, (edge, t_stopped)
    # the restore chain covers every txid: snapshot, then segments first = previous last + 1
    assert restore_chain_end(g) == int(g["last_txid"]), (restore_chain_end(g), g["last_txid"])
    # never across a snapshot: no compacted segment holds both txid S and S+1 of a snapshot S
    snaps = sorted(int(s["txid"]) for s in g["snapshots"])
    assert len(snaps) >= 2, g["snapshots"]
    for s in segs:
        for t in snaps:
            assert not (int(s["first_txid"]) <= t < int(s["last_txid"])), f"{s['key']} spans snapshot txid {t}"
    # compacted segments really replaced the lower-level ones they cover
    for c in segs:
        if c["level"] == "0":
            continue
        lo, hi = int(c["first_txid"]), int(c["last_txid"])
        covered = [s["key"] for s in segs if int(s["level"]) < int(c["level"])
                   and lo <= int(s["first_txid"]) and int(s["last_txid"]) <= hi]
        assert not covered, f"{c['key']} left covered segments: {covered[:3]}"

    # PITR inside the fine window stays exact per transaction
    instants = read_instants(instants_file)
    inside = [x for x in instants if x["t_commit"] > t_stopped - fine + 0.7]
    assert len(inside) >= 5, (len(inside), len(instants))
    check_instants_exact(furl(replica), inside, tmp_path, "fine")

    # squashed history: its boundaries restore, a txid inside fails clearly and writes nothing
    sq = max(squashed, key=lambda s: int(s["last_txid"]) - int(s["first_txid"]))
    lo, hi = int(sq["first_txid"]), int(sq["last_txid"])
    assert hi - lo >= 2, sq
    _, t = restore(furl(replica), tmp_path / "boundary.db", "--txid", hi)
    assert t == hi
    outdir = tmp_path / "inside-squashed"
    outdir.mkdir()
    p = run_walship("restore", furl(replica), "-o", outdir / "x.db", "--txid", (lo + hi) // 2)
    assert p.returncode != 0, f"restore to txid {(lo + hi) // 2} inside squashed {sq['key']} succeeded:\n{p.stdout}"
    assert "walship: error:" in p.stderr and re.search(r"compact|squash|boundar", p.stderr), p.stderr
    assert os.listdir(outdir) == [], os.listdir(outdir)
    p = run_walship("list", furl(replica))
    assert "boundaries only" in p.stdout, p.stdout[:3000]

    p, rep = verify_json(furl(replica))
    assert p.returncode == 0 and rep["ok"], p.stdout + p.stderr
    checkpoint_truncate(db)
    restore(furl(replica), tmp_path / "latest.db")
    assert file_bytes_equal(tmp_path / "latest.db", db), "latest restore differs from the checkpointed source"

    # compaction kept up: no closed level-1 window still holds several level-0 segments
    stuck = uncompacted_closed_windows(segs, 2.0, t_sigterm - SETTLE_SLACK)
    assert not stuck, (f"{len(stuck)} closed 2 s windows were never compacted (agent stopped at {t_sigterm:.1f}):\n"
                       + json.dumps(stuck, indent=1)[:4000])


# ---------------------------------------------------------------- 7. security

def test_spool_permissions_and_no_secrets_in_logs_status_metrics(tmp_path, agent_factory, s3server):
    srv = s3server
    env = srv.env()
    url = srv.url("walship", "sec")
    db, key = tmp_path / "app.db", tmp_path / "key"
    keybytes = write_key(key)
    create_ticket_db(db, rows=20)
    agent = agent_factory(db, [url], ["--sync-interval", "200ms", "--encryption-key-file", key,
                                      "--metrics-addr", "127.0.0.1:0", "--log-level", "debug"], env=env)
    agent.start().wait_ready()
    murl = metrics_url(agent)
    spool = tmp_path / f".{db.name}-walship"
    stop_file, wlog = tmp_path / "stop-writer", tmp_path / "writer.log"
    writer = start_writer("tickets", db, "--seed", 41, "--stop-file", stop_file, "--rate", 40, log_path=wlog)
    outputs = []
    plaintext = f"TOPSECRET-{uuid.uuid4().hex}"
    try:
        run_py(WRITER, "insert", db, "--text", plaintext + "-before")
        time.sleep(1.0)
        srv.stop()            # objects wait in the outbox; upload errors get logged
        run_py(WRITER, "insert", db, "--text", plaintext + "-during")
        wait_until(lambda: "upload failed" in agent.read_log(), 20, "no upload failure logged during the S3 outage")
        assert (spool / "outbox").is_dir() and os.listdir(spool / "outbox"), "nothing waits in the outbox"
        bad = []
        for p in [spool, *spool.rglob("*")]:
            try:
                mode = stat.S_IMODE(p.lstat().st_mode)
            except FileNotFoundError:
                continue      # shipped and removed meanwhile
            want = 0o700 if p.is_dir() else 0o600
            if mode != want:
                bad.append(f"{p.relative_to(tmp_path)}: {oct(mode)} (want {oct(want)})")
        assert not bad, "spool permissions:\n" + "\n".join(bad)
        p = run_walship("status", db, "--json")
        assert p.returncode == 0, p.stdout + p.stderr
        outputs.append(("status --json during the outage", p.stdout + p.stderr))
        outputs.append(("status during the outage", run_walship("status", db).stdout))
        outputs.append(("/metrics during the outage", scrape(murl)[1]))
        srv.restart()
        time.sleep(2.0)
    finally:
        stop_writer(stop_file, writer, wlog)
    p = run_walship("status", db, "--json")
    outputs.append(("status --json", p.stdout + p.stderr))
    agent.stop()
    outputs.append(("agent log", agent.read_log()))

    secrets = {"S3 secret key": srv.secret_key, "key hex": keybytes.hex(), "key HEX": keybytes.hex().upper(),
               "key base64": base64.b64encode(keybytes).decode()}
    for what, text in outputs:
        for name, s in secrets.items():
            assert s not in text, f"{name} appears in {what}"
    assert keybytes not in Path(agent.log_path).read_bytes()

    # encrypted at rest on S3 too: the application's plaintext is in no stored object
    keys = srv.objects("walship", "sec")
    assert any(k.endswith(".seg.lz4") for k in keys) and any(k.endswith(".snap.lz4") for k in keys), keys
    leaked = [k for k in keys if plaintext.encode() in (srv.root / "walship" / k).read_bytes()]
    assert not leaked, f"plaintext found in S3 objects: {leaked}"

    checkpoint_truncate(db)
    restore(url, tmp_path / "latest.db", "--encryption-key-file", key, env=env)
    got = table_contents(tmp_path / "latest.db")
    assert got == table_contents(db)
    assert {plaintext + "-before", plaintext + "-during"} <= {r[1] for r in got["usuarios"]}


# ---------------------------------------------------------------- 8. status

def test_status_while_running_and_after_stop(tmp_path, agent_factory):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    create_ticket_db(db, rows=10)
    p = run_walship("status", db)
    assert p.returncode == 3, f"status without any agent: exit {p.returncode}\n{p.stdout}{p.stderr}"

    agent = agent_factory(db, [furl(replica)], ["--sync-interval", "200ms"]).start().wait_ready()
    run_py(WRITER, "bursts", db, "--bursts", "2", "--per-burst", "15", "--pause", "0.3")
    time.sleep(1.5)   # the status file is refreshed every second
    p = run_walship("status", db)
    assert p.returncode == 0, f"status with a running agent: exit {p.returncode}\n{p.stdout}{p.stderr}"
    assert furl(replica) in p.stdout and "lag" in p.stdout, p.stdout
    assert str(agent.proc.pid) in p.stdout, p.stdout
    p = run_walship("status", db, "--json")
    assert p.returncode == 0, p.stdout + p.stderr
    [entry] = json.loads(p.stdout)["databases"]
    st = entry["status"]
    assert entry["running"] is True and entry["pid"] == agent.proc.pid, entry
    assert st["txid"] == 30, st
    [r] = st["replicas"]
    assert r["url"] == furl(replica) and 0 <= r["lag_seconds"] < 2.0, r
    assert r["shipped_objects"] >= 2 and time.time() - r["last_sync_unix"] < 10, r
    # the last cut follows the last commit and precedes its acknowledgement
    assert st["last_commit_unix"] <= st["last_cut_unix"] <= r["last_sync_unix"], (st, r)
    agent.stop()

    p = run_walship("status", db)
    assert p.returncode == 3, f"status after the agent stopped: exit {p.returncode}\n{p.stdout}"
    p = run_walship("status", db, "--json")
    assert p.returncode == 3 and json.loads(p.stdout)["databases"][0]["running"] is False, p.stdout

    # a SIGKILLed agent leaves its status file (and pid) behind: still not running
    agent2 = agent_factory(db, [furl(replica)], ["--sync-interval", "200ms"],
                           log_path=tmp_path / "agent2.log").start().wait_ready()
    time.sleep(1.5)
    assert run_walship("status", db).returncode == 0
    agent2.kill9()
    p = run_walship("status", db)
    assert p.returncode == 3, f"status after kill -9: exit {p.returncode}\n{p.stdout}"
