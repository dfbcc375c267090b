"""Core guarantees of walship with real SQLite, separate writer processes and a real
directory replica (docs/GUARANTEES.md).

  - latest restore is byte-identical to the source after wal_checkpoint(TRUNCATE)  (G3/G4)
  - --timestamp / --txid restore exactly the state at recorded instants           (G3)
  - a hostile application (own checkpoints of every mode, long readers) breaks
    neither exactness nor continuity                                              (G2/G5)
  - a writer SIGKILLed mid-transaction never leaks uncommitted frames             (G1)
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import (HERE, checkpoint_truncate, create_ticket_db, file_bytes_equal,
                      run_walship, table_contents)

WRITER = HERE / "writer.py"
SUMMARY_RE = re.compile(r"^restored (.+): generation (\S+)(?: \(database [0-9a-f]{16}\))?, txid (\d+), committed (\S+),", re.M)


# ---------------------------------------------------------------- helpers

def url(path):
    return "file://" + str(path)


def run_writer(*args, timeout=120):
    p = subprocess.run([sys.executable, str(WRITER), *map(str, args)], capture_output=True,
                       text=True, timeout=timeout)
    assert p.returncode == 0, f"writer {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def start_writer(*args):
    return subprocess.Popen([sys.executable, str(WRITER), *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def list_json(replica):
    p = run_walship("list", url(replica), "--json", check=True)
    return json.loads(p.stdout)


def restore(replica, out, *args):
    """Restores, checks the summary line, returns (generation, txid)."""
    p = run_walship("restore", url(replica), "-o", out, *args, check=True)
    m = SUMMARY_RE.search(p.stdout)
    assert m, f"no summary line in restore output:\n{p.stdout}\n{p.stderr}"
    assert m.group(1) == str(out), m.group(0)
    return m.group(2), int(m.group(3))


def as_json(tables):
    """Rows as JSON would give them back (tuples -> lists), for comparisons with dumps."""
    return json.loads(json.dumps(tables))


def wait_for_file(path, proc, timeout):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            return
        if proc.poll() is not None:
            raise AssertionError(f"writer exited early ({proc.returncode}):\n{proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError(f"{path} did not appear within {timeout}s")


def replica_objects(replica, suffix):
    return sorted(Path(replica).glob(f"generations/*/**/*{suffix}"))


def lz4_decompress(path):
    p = subprocess.run(["lz4", "-dc", str(path)], capture_output=True, timeout=60)
    assert p.returncode == 0, f"lz4 -dc {path} failed: {p.stderr!r}"
    return p.stdout


# ---------------------------------------------------------------- tests

def test_latest_restore_is_byte_identical(tmp_path, agent_factory):
    db, replica, out = tmp_path / "app.db", tmp_path / "replica", tmp_path / "restored.db"
    create_ticket_db(db, rows=50)
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "200ms"]).start().wait_ready()
    run_writer("workload", db, "--seconds", "4", "--max-rate", "300", "--dump-dir", tmp_path, "--seed", "11")
    agent.stop()

    checkpoint_truncate(db)
    gen, txid = restore(replica, out)
    assert file_bytes_equal(db, out), "latest restore differs from the checkpointed source"
    assert table_contents(out) == table_contents(db)

    gens = list_json(replica)
    assert len(gens) == 1 and gens[0]["generation"] == gen
    assert int(gens[0]["last_txid"]) == txid
    summary = json.loads((tmp_path / "summary.json").read_text())
    # 20 warm-up transactions plus the timed ones, each its own txid after snapshot txid 0
    assert txid == summary["transactions"] + 20, (txid, summary["transactions"])


def test_successive_writer_processes(tmp_path, agent_factory):
    """Application processes come and go: when the last one closes its connection, SQLite
    would checkpoint and delete the WAL unless another connection (the agent's) holds the
    database. Every commit of every process must still be shipped, in one generation."""
    db, replica, out = tmp_path / "app.db", tmp_path / "replica", tmp_path / "restored.db"
    create_ticket_db(db, rows=10)
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "200ms"]).start().wait_ready()
    run_writer("bursts", db, "--bursts", "1", "--per-burst", "30", "--seed", "1")
    time.sleep(0.7)
    assert Path(str(db) + "-wal").exists(), "the WAL was deleted while the agent was running"
    run_writer("bursts", db, "--bursts", "1", "--per-burst", "30", "--seed", "2")
    time.sleep(0.7)
    run_writer("insert", db, "--text", "third-process")
    time.sleep(0.7)
    agent.stop()

    checkpoint_truncate(db)
    gen, txid = restore(replica, out)
    src, got = table_contents(db), table_contents(out)
    lost = {t: len(set(src[t]) - set(got[t])) for t in src}
    assert got == src, f"committed rows missing from the latest restore: {lost}"
    assert file_bytes_equal(db, out)
    assert txid == 61, txid
    assert [g["generation"] for g in list_json(replica)] == [gen]


def test_point_in_time_restore_by_timestamp_and_txid(tmp_path, agent_factory):
    db, replica = tmp_path / "app.db", tmp_path / "replica"
    dumps = tmp_path / "dumps"
    dumps.mkdir()
    create_ticket_db(db, rows=30)
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "300ms"]).start().wait_ready()
    run_writer("workload", db, "--seconds", "10", "--instants", "24", "--quiet", "0.2",
               "--max-rate", "450", "--dump-dir", dumps, "--seed", "22")
    agent.stop()

    summary = json.loads((dumps / "summary.json").read_text())
    # Enough traffic for the instants to fall between busy commits; a count, not a rate, so a
    # loaded machine does not fail the test (speed belongs in bench/).
    assert summary["transactions"] >= 1000, summary
    instants = [json.loads(Path(p).read_text()) for p in summary["instants"]]
    assert len(instants) >= 20
    last_txid = int(list_json(replica)[0]["last_txid"])

    offsets = set()
    for i, inst in enumerate(instants):
        out = tmp_path / f"ts-{i}.db"
        _, txid = restore(replica, out, "--timestamp", inst["t"])
        got = as_json(table_contents(out))
        assert got == inst["tables"], f"--timestamp {inst['t']} (instant {i}, txid {txid}) differs from the copy"
        # every writer transaction is one txid: txid - writer's count is a constant
        offsets.add(txid - inst["tx_count"])

        out2 = tmp_path / f"txid-{i}.db"
        _, txid2 = restore(replica, out2, "--txid", txid)
        assert txid2 == txid
        assert as_json(table_contents(out2)) == inst["tables"], f"--txid {txid} differs from instant {i}"

        # exactness, not the nearest boundary: one transaction later is a different state
        if i % 4 == 0 and txid < last_txid:
            out3 = tmp_path / f"txid-{i}-next.db"
            _, txid3 = restore(replica, out3, "--txid", txid + 1)
            assert txid3 == txid + 1
            assert as_json(table_contents(out3)) != inst["tables"]
        for f in (out, out2):
            f.unlink()
    assert len(offsets) == 1, f"txids do not map one-to-one to writer transactions: {offsets}"


def test_hostile_application_checkpoints_and_readers(tmp_path, agent_factory):
    db, replica, out = tmp_path / "app.db", tmp_path / "replica", tmp_path / "restored.db"
    create_ticket_db(db, rows=30)
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "200ms", "--checkpoint-frames", "300"])
    agent.start().wait_ready()
    stop_file = tmp_path / "reader.stop"
    reader = start_writer("reader", db, "--stop-file", stop_file, "--hold-min", "1", "--hold-max", "3",
                          "--gap-min", "0.2", "--gap-max", "0.8")
    try:
        # FULL/RESTART/TRUNCATE each wait up to the 5 s busy timeout for readers (the agent's
        # pin, the reader process), so they are spread out to leave ~8 s of writing between them.
        run_writer("workload", db, "--seconds", "8", "--max-rate", "300", "--autocheckpoint", "100",
                   "--checkpoint-every", "2.0", "--dump-dir", tmp_path, "--seed", "33", timeout=180)
    finally:
        stop_file.write_text("stop")
        reader.wait(timeout=30)
    assert reader.returncode == 0, reader.stderr.read()
    assert int(Path(str(stop_file) + ".holds").read_text()) >= 3

    summary = json.loads((tmp_path / "summary.json").read_text())
    modes = {c["mode"] for c in summary["checkpoints"]}
    assert modes == {"PASSIVE", "FULL", "RESTART", "TRUNCATE"}, summary["checkpoints"]
    assert agent.proc.poll() is None, f"agent died under the hostile application:\n{agent.read_log()}"
    # A second, quieter phase (reader gone): the agent's own checkpoints must restart the WAL
    # here whatever the timing of the first phase was, so continuity across restarts is
    # always put to the test.
    phase2 = tmp_path / "phase2"
    phase2.mkdir()
    run_writer("workload", db, "--seconds", "4", "--max-rate", "300", "--dump-dir", phase2, "--seed", "34", timeout=120)
    summary2 = json.loads((phase2 / "summary.json").read_text())
    assert agent.proc.poll() is None, f"agent died:\n{agent.read_log()}"
    agent.stop()

    checkpoint_truncate(db)
    gen, txid = restore(replica, out)  # no gap: the latest state can be rebuilt
    assert file_bytes_equal(db, out), "restore differs from the checkpointed source"
    gens = list_json(replica)
    assert [g["generation"] for g in gens] == [gen], \
        f"continuity lost (more than one generation):\n{json.dumps(gens, indent=1)[:3000]}\n{agent.read_log()[-3000:]}"
    assert txid == summary["transactions"] + summary2["transactions"] + 2 * 20   # each workload run first adds 20 users
    # The WAL really restarted (new salts) during the run, so continuity was put to the test;
    # the agent owns checkpointing (--checkpoint-frames 300) and must keep the WAL bounded
    # (G5), which needs a restart now and then.
    headers = {tuple(h) for h in summary["wal_headers_seen"] + summary2["wal_headers_seen"]}
    assert len(headers) >= 2, f"the WAL never restarted during the run (headers seen: {sorted(headers)})"


def test_writer_killed_mid_transaction_leaks_nothing(tmp_path, agent_factory):
    db, replica, out = tmp_path / "app.db", tmp_path / "replica", tmp_path / "restored.db"
    marker = "UNCOMMITTED-MARKER-7f3a9c"
    after = "COMMITTED-AFTER-CRASH-51e2"
    create_ticket_db(db, rows=10)
    run_writer("bursts", db, "--bursts", "1", "--per-burst", "10")  # a ticket or two to point at
    agent = agent_factory(db, [url(replica)], ["--sync-interval", "200ms"]).start().wait_ready()
    # A service keeps a connection open throughout, so this test is about the crash alone and
    # not about the last connection closing (test_successive_writer_processes covers that).
    hold_stop = tmp_path / "hold.stop"
    holder = start_writer("hold", db, "--stop-file", hold_stop)
    try:
        ready = tmp_path / "bigtx.ready"
        big = start_writer("bigtx", db, "--marker", marker, "--mb", "8", "--ready-file", ready)
        try:
            wait_for_file(ready, big, timeout=60)
            wal = Path(str(db) + "-wal")
            assert wal.stat().st_size > 4 * 1024 * 1024, "the big transaction did not spill into the WAL"
            assert marker.encode() in wal.read_bytes(), "marker frames are not in the WAL"
            time.sleep(1.0)  # several sync intervals with uncommitted frames in the WAL
        finally:
            big.send_signal(signal.SIGKILL)
            big.wait(timeout=30)
        assert big.returncode == -signal.SIGKILL

        time.sleep(0.5)
        run_writer("insert", db, "--text", after)  # a new writer commits after the crash
        run_writer("bursts", db, "--bursts", "1", "--per-burst", "5", "--seed", "9")
        time.sleep(0.5)
        assert agent.proc.poll() is None, agent.read_log()
        agent.stop()
    finally:
        hold_stop.write_text("stop")
        holder.wait(timeout=30)
    assert holder.returncode == 0, holder.stderr.read()

    restore(replica, out)
    rows = table_contents(out)
    flat = json.dumps(rows)
    assert marker not in flat, "uncommitted rows appear in the restore"
    assert any(r[1] == after for r in rows["usuarios"]), "row committed after the crash is missing"
    assert marker.encode() not in out.read_bytes()
    checkpoint_truncate(db)
    src = table_contents(db)
    lost = {t: len(set(src[t]) - set(rows[t])) for t in src}
    assert rows == src, f"latest restore is not the latest committed state (rows missing per table: {lost})"
    assert file_bytes_equal(db, out)

    segments = replica_objects(replica, ".seg.lz4")
    snapshots = replica_objects(replica, ".snap.lz4")
    assert segments and snapshots
    found_after = False
    for obj in segments + snapshots:
        data = lz4_decompress(obj)
        assert marker.encode() not in data, f"{obj.name} holds uncommitted frames (marker found)"
        found_after |= after.encode() in data
    assert found_after, "positive control failed: the committed row is in no decompressed object"
