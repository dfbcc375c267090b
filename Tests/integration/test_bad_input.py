"""Bad input gets one clear error (docs/GUARANTEES.md, G4 and G8): corrupt, truncated and missing
objects, foreign replica directories, bad databases, an existing OUT, bad timestamps.

Each case: exactly one "walship: error: ..." line on stderr, exit code 1, OUT untouched
(not created, or unchanged if it existed) and no temp files left beside it.
"""
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import (HERE, WALSHIP, AgentProcess, checkpoint_truncate, create_ticket_db,
                      file_bytes_equal, run_walship)

WRITER = HERE / "writer.py"


def url(path):
    return "file://" + str(path)


def error_line(p):
    """Asserts the failure shape and returns the one error line."""
    assert p.returncode == 1, f"exit {p.returncode}, expected 1\nstdout: {p.stdout}\nstderr: {p.stderr}"
    errs = [l for l in p.stderr.splitlines() if l.startswith("walship: error:")]
    assert len(errs) == 1, f"expected one 'walship: error:' line, got:\n{p.stderr}"
    assert not p.stdout.startswith("restored"), p.stdout
    return errs[0]


def listing(d):
    return sorted(os.listdir(d))


def tree(d):
    """Every file under d with its bytes, to prove a directory was left alone."""
    return {str(p.relative_to(d)): (p.read_bytes() if p.is_file() else None) for p in sorted(Path(d).rglob("*"))}


@pytest.fixture(scope="module")
def golden(tmp_path_factory):
    """A replica with one snapshot and several segments, plus the source it came from."""
    d = tmp_path_factory.mktemp("golden")
    db, replica = d / "app.db", d / "replica"
    create_ticket_db(db, rows=20)
    agent = AgentProcess(db, [url(replica)], ["--sync-interval", "200ms"]).start()
    try:
        agent.wait_ready()
        p = subprocess.run([sys.executable, str(WRITER), "bursts", str(db), "--bursts", "5",
                            "--per-burst", "20", "--pause", "0.8"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        agent.stop()
    finally:
        if agent.proc.poll() is None:
            agent.kill9()
    checkpoint_truncate(db)
    gens = json.loads(run_walship("list", url(replica), "--json", check=True).stdout)
    assert len(gens) == 1
    segs = sorted(gens[0]["segments"], key=lambda s: int(s["first_txid"]))
    assert len(segs) >= 3, f"need >= 3 segments, got {len(segs)}"
    # positive control: the intact replica restores exactly
    out = d / "control.db"
    run_walship("restore", url(replica), "-o", out, check=True)
    assert file_bytes_equal(db, out)
    return {"db": db, "replica": replica, "gen": gens[0], "segments": segs}


@pytest.fixture
def replica(golden, tmp_path):
    r = tmp_path / "replica"
    shutil.copytree(golden["replica"], r)
    return r


@pytest.fixture
def outdir(tmp_path):
    d = tmp_path / "out"
    d.mkdir()
    return d


def restore_fails(replica, outdir, *args):
    before = listing(outdir)
    p = run_walship("restore", url(replica), "-o", outdir / "restored.db", *args)
    line = error_line(p)
    assert listing(outdir) == before, f"restore left files behind: {listing(outdir)}"
    return line


# ---------------------------------------------------------------- damaged replicas

def test_corrupt_byte_in_segment(golden, replica, outdir):
    seg = golden["segments"][len(golden["segments"]) // 2]
    path = replica / seg["key"]
    data = bytearray(path.read_bytes())
    assert len(data) > 136 + 64, "segment too small to corrupt its LZ4 data"
    pos = 136 + (len(data) - 136) // 2  # middle of the LZ4 frame after the metadata frame
    data[pos] ^= 0xFF
    path.write_bytes(bytes(data))
    line = restore_fails(replica, outdir)
    assert Path(seg["key"]).name in line, f"error does not name the segment {seg['key']}: {line}"


def test_truncated_snapshot(golden, replica, outdir):
    snap = golden["gen"]["snapshots"][0]
    path = replica / snap["key"]
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    line = restore_fails(replica, outdir)
    assert Path(snap["key"]).name in line, f"error does not name the snapshot {snap['key']}: {line}"


def test_missing_middle_segment(golden, replica, outdir):
    i = len(golden["segments"]) // 2
    seg, prev = golden["segments"][i], golden["segments"][i - 1]
    (replica / seg["key"]).unlink()
    line = restore_fails(replica, outdir)
    assert "gap" in line.lower(), f"error does not mention a gap: {line}"
    # a target inside the missing range fails the same way
    inside = restore_fails(replica, outdir, "--txid", seg["last_txid"])
    assert "gap" in inside.lower(), inside
    # the history before the gap is still restorable, exactly to its last transaction
    out = outdir / "before-gap.db"
    p = run_walship("restore", url(replica), "-o", out, "--txid", prev["last_txid"], check=True)
    assert f"txid {prev['last_txid']}," in p.stdout, p.stdout


def test_replica_directory_with_unrelated_files(tmp_path, outdir):
    foreign = tmp_path / "photos"
    (foreign / "2024").mkdir(parents=True)
    (foreign / "notes.txt").write_text("not a walship replica\n")
    (foreign / "2024" / "cat.jpg").write_bytes(os.urandom(2048))
    before = tree(foreign)

    line = restore_fails(foreign, outdir)
    assert str(foreign) in line, f"restore error does not name the replica: {line}"

    p = run_walship("list", url(foreign))
    line = error_line(p)
    assert str(foreign) in line, f"list error does not name the replica: {line}"

    db = tmp_path / "app.db"
    create_ticket_db(db, rows=3)
    agent = AgentProcess(db, [url(foreign)], ["--sync-interval", "200ms"], log_path=tmp_path / "agent.log").start()
    try:
        rc = agent.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        if agent.proc.poll() is None:
            agent.kill9()
    log = agent.read_log()
    assert rc == 1, f"replicate into a foreign directory did not refuse (rc={rc}):\n{log}"
    errs = [l for l in log.splitlines() if l.startswith("walship: error:")]
    assert len(errs) == 1 and str(foreign) in errs[0], log
    assert tree(foreign) == before, "replicate wrote into a foreign directory"


# ---------------------------------------------------------------- bad databases

def test_replicate_missing_database(tmp_path):
    before = listing(tmp_path)
    db = tmp_path / "does-not-exist.db"
    p = subprocess.run([str(WALSHIP), "replicate", str(db)], capture_output=True, text=True, timeout=30)
    line = error_line(p)
    assert str(db) in line, line
    assert listing(tmp_path) == before, f"replicate created files: {listing(tmp_path)}"


def test_replicate_non_sqlite_file(tmp_path):
    db = tmp_path / "notes.db"
    content = b"This is a plain text file, not a SQLite database.\n" * 200
    db.write_bytes(content)
    p = subprocess.run([str(WALSHIP), "replicate", str(db)], capture_output=True, text=True, timeout=30)
    line = error_line(p)
    assert str(db) in line, line
    assert db.read_bytes() == content, "replicate modified a non-SQLite file"
    assert listing(tmp_path) == ["notes.db"], f"replicate left files behind: {listing(tmp_path)}"


# ---------------------------------------------------------------- restore arguments

def test_restore_refuses_existing_out_without_force(golden, replica, outdir):
    out = outdir / "restored.db"
    out.write_bytes(b"precious data that must survive\n" * 100)
    original = out.read_bytes()
    line = restore_fails(replica, outdir)
    assert out.read_bytes() == original, "OUT was modified"
    assert str(out) in line or "--force" in line, line
    # control: with --force the same command replaces it with the exact database
    run_walship("restore", url(replica), "-o", out, "--force", check=True)
    assert file_bytes_equal(golden["db"], out)
    assert listing(outdir) == ["restored.db"]


def test_timestamp_before_any_history(golden, replica, outdir):
    first = datetime.fromisoformat(golden["gen"]["first_time"].replace("Z", "+00:00"))
    ts = (first - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    line = restore_fails(replica, outdir, "--timestamp", ts)
    assert "timestamp" in line.lower() or ts[:19] in line, line
    line = restore_fails(replica, outdir, "--timestamp", "2001-01-01T00:00:00Z")
    assert "timestamp" in line.lower() or "2001-01-01" in line, line


@pytest.mark.parametrize("bad", ["yesterday", "2024-13-45T25:61:00Z", "2024-12-14T14:00:00",
                                 "2024-12-14", "1734184800"])
def test_malformed_timestamp(replica, outdir, bad):
    line = restore_fails(replica, outdir, "--timestamp", bad)
    assert "timestamp" in line.lower() or bad in line, line


def test_txid_beyond_history(golden, replica, outdir):
    beyond = int(golden["gen"]["last_txid"]) + 1000
    line = restore_fails(replica, outdir, "--txid", beyond)
    assert "txid" in line.lower() or str(beyond) in line, line


# ---------------------------------------------------------------- crafted metadata

CRAFTED = {
    "page size 0": {"page_size": 0},
    "page size and page count 0xffffffff": {"page_size": 0xFFFFFFFF, "db_pages": 0xFFFFFFFF},
    "page size not a power of two": {"page_size": 1000},
    "last txid at the top of the range": {"first_txid": 2**64 - 1, "last_txid": 2**64 - 1},
    "txids backwards": {"first_txid": 9, "last_txid": 3},
}


def test_rewritten_metadata_with_the_same_values_still_restores(golden, replica, outdir):
    """Control for the crafted cases: the rewrite itself keeps an object valid."""
    from objects import read_metadata, rewrite_metadata
    for key in [golden["gen"]["snapshots"][0]["key"], golden["segments"][0]["key"]]:
        rewrite_metadata(replica / key, **read_metadata(replica / key))
    p = run_walship("restore", url(replica), "-o", outdir / "ok.db")
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("what", sorted(CRAFTED))
@pytest.mark.parametrize("kind", ["snapshot", "segment"])
def test_crafted_metadata_is_one_clear_error(golden, replica, outdir, kind, what):
    """Header fields of a planted object are checked before any arithmetic: restore and
    verify each give one error naming the object, never a crash (a trap, exit 132)."""
    from objects import rewrite_metadata
    key = golden["gen"]["snapshots"][0]["key"] if kind == "snapshot" else golden["segments"][0]["key"]
    rewrite_metadata(replica / key, **CRAFTED[what])
    line = restore_fails(replica, outdir)
    assert Path(key).name in line, f"the error does not name {key}: {line}"
    p = run_walship("verify", url(replica))
    assert p.returncode == 1, f"verify exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    assert Path(key).name in p.stdout + p.stderr, p.stdout + p.stderr


@pytest.mark.parametrize("name", [
    "snapshots/0000000000000000-9223372036854775.snap.lz4",            # milliseconds x 1000 overflow
    "segments/0/0000000000000000-0000000000000001-1-2.seg.lz4",          # a segment from txid 0: first - 1 underflows
    "segments/0/0000000000000001-ffffffffffffffff-1-2.seg.lz4",          # last + 1 overflows
])
def test_planted_names_out_of_range_are_not_objects(golden, replica, outdir, name):
    """Names are read from a replica before any object is: a txid or time in a planted name
    that would overflow the planner's arithmetic (a trap, exit 132) is not a walship object,
    and restores go on as if it were not there."""
    gen = golden["gen"]["generation"]
    p = replica / "generations" / gen / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    for k, args in enumerate(([], ["--timestamp", "2099-01-01T00:00:00Z"], ["--txid", "1"])):
        out = outdir / f"out{k}.db"
        r = run_walship("restore", url(replica), "-o", out, *args)
        assert r.returncode == 0, f"restore {args} exited {r.returncode}\n{r.stderr}"
    r = run_walship("list", url(replica))
    assert r.returncode == 0, r.stderr
    r = run_walship("verify", url(replica))
    assert r.returncode == 0, r.stdout + r.stderr
