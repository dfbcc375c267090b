"""Replicas written by earlier releases stay readable.

Tests/fixtures/v1 is a replica written by walship 0.1.0 (format version 1), with the script
that made it beside it. Its expected.json holds, for every restore point, the SHA-256 of a
canonical dump of the database as that release restored it. Today's binary must restore the
same states, verify the replica, and list it; new objects are written in the current version.
"""
import hashlib
import json
import shutil
import sqlite3
import struct
import subprocess
import time

import pytest

from conftest import HERE, run_walship

FIXTURE = HERE.parent / "fixtures" / "v1"


def dump(path):
    c = sqlite3.connect(path)
    rows = c.execute("SELECT id, v, hex(b) FROM t ORDER BY id").fetchall()
    c.close()
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def fixture_copy(tmp_path, name):
    root = tmp_path / name
    shutil.copytree(FIXTURE / name, root)
    key = tmp_path / "test.key"
    shutil.copy(FIXTURE / "test.key", key)
    key.chmod(0o600)
    return root, (["--encryption-key-file", str(key)] if name == "sealed" else [])


@pytest.mark.parametrize("name", ["plain", "sealed"])
def test_every_restore_point_of_a_version_1_replica_restores_as_it_did(tmp_path, walship_bin, name):
    expected = json.loads((FIXTURE / "expected.json").read_text())["replicas"][name]
    root, key = fixture_copy(tmp_path, name)
    assert len(expected["points"]) >= 20
    for txid, want in sorted(expected["points"].items(), key=lambda kv: int(kv[0])):
        out = tmp_path / f"r{txid}.db"
        p = run_walship("restore", f"file://{root}", "-o", out, "--txid", txid, "--database-id", "00c0ffee00c0ffee", *key)
        assert p.returncode == 0, f"txid {txid}: {p.stderr}"
        assert dump(out) == want, f"txid {txid} restores another state than 0.1.0 restored"
    out = tmp_path / "latest.db"
    run_walship("restore", f"file://{root}", "-o", out, *key, check=True)
    assert dump(out) == expected["latest"] == expected["application_final"]
    p = run_walship("verify", f"file://{root}", *key)
    assert p.returncode == 0, p.stdout + p.stderr
    listing = json.loads(run_walship("list", f"file://{root}", "--json", check=True).stdout)
    assert len(listing) == 2


def segment_payload_version(path):
    """The version word of a segment payload, read through `lz4 -d` (plain objects only)."""
    raw = path.read_bytes()
    magic, size = struct.unpack_from("<II", raw, 0)
    assert magic == 0x184D2A57
    body = raw[8:8 + size]
    out = subprocess.run(["lz4", "-dc"], input=raw, capture_output=True, check=True).stdout
    assert out[:4] == b"WSEG"
    return struct.unpack_from("<H", body, 8)[0], struct.unpack_from("<I", out, 4)[0]


def test_the_fixture_is_version_1_and_new_segments_are_written_in_version_2(tmp_path, agent_factory):
    old = sorted(FIXTURE.glob("plain/generations/*/segments/*/*.seg.lz4"))
    assert old and {segment_payload_version(p) for p in old} == {(1, 1)}
    # A database restored from the old replica, replicated by today's agent to the same replica.
    root, _ = fixture_copy(tmp_path, "plain")
    db = tmp_path / "app.db"
    run_walship("restore", f"file://{root}", "-o", db, check=True)
    agent = agent_factory(db, [f"file://{root}"], ["--sync-interval", "100ms"])
    agent.start()
    agent.wait_ready()
    c = sqlite3.connect(db, isolation_level=None)
    for i in range(5):
        c.execute("INSERT INTO t(v, b) VALUES (?, randomblob(50))", (10_000 + i,))
    c.close()
    agent.stop()
    new = [p for p in root.glob("generations/*/segments/*/*.seg.lz4") if p not in
           {root / q.relative_to(FIXTURE / "plain") for q in old}]
    assert new and {segment_payload_version(p) for p in new} == {(2, 2)}
    out = tmp_path / "latest.db"
    run_walship("restore", f"file://{root}", "-o", out, check=True)
    assert dump(out) == dump(db)


def test_a_damaged_snapshot_page_is_an_error_even_where_later_history_overwrites_it(tmp_path, agent_factory):
    """The damaged page is rewritten whole by a segment, so the latest state would come out
    right without it; restore and `verify` must still report the snapshot, by name (its own
    restore point is gone, and a damaged replica is never reported healthy)."""
    db = tmp_path / "app.db"
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER, b BLOB)")
    c.executemany("INSERT INTO t(v, b) VALUES (?, randomblob(3000))", [(i,) for i in range(40)])
    c.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    root = tmp_path / "replica"
    agent = agent_factory(db, [f"file://{root}"], ["--sync-interval", "100ms"])
    agent.start()
    agent.wait_ready()
    c.execute("UPDATE t SET b = randomblob(3000) WHERE id = 20")   # its page is written whole
    c.close()
    agent.stop()
    seg = next(root.glob("generations/*/segments/0/*.seg.lz4"))
    payload = subprocess.run(["lz4", "-dc"], input=seg.read_bytes(), capture_output=True, check=True).stdout
    assert payload[:4] == b"WSEG"
    page_size = struct.unpack_from("<I", payload, 8)[0]
    pages = []
    o, count = 16, struct.unpack_from("<I", payload, 20)[0]
    o += 32
    for _ in range(count):
        pg, length = struct.unpack_from("<II", payload, o)
        o += 8 + (page_size if length == 0xFFFFFFFF else length)
        pages.append(pg)
    snap = next(root.glob("generations/*/snapshots/*.snap.lz4"))
    plain = subprocess.run(["lz4", "-dc"], input=snap.read_bytes(), capture_output=True, check=True).stdout
    raw = bytearray(snap.read_bytes())
    for pg in pages:   # a stretch of random bytes of a rewritten page, found as a literal
        needle = plain[(pg - 1) * page_size + 1500:(pg - 1) * page_size + 1524]
        at = raw.find(needle)
        if at > 0:
            raw[at + 8] ^= 0x40
            break
    else:
        pytest.fail("no rewritten page of the snapshot was found in its compressed bytes")
    snap.write_bytes(bytes(raw))
    p = run_walship("restore", f"file://{root}", "-o", tmp_path / "latest.db")
    assert p.returncode == 1 and snap.name in p.stderr and "corrupt" in p.stderr, p.stderr
    assert not (tmp_path / "latest.db").exists()
    p = run_walship("verify", f"file://{root}", "--scrub", "all")
    assert p.returncode == 1 and snap.name in p.stdout + p.stderr, p.stdout + p.stderr


def test_a_burst_too_fast_for_high_compression_is_shipped_while_the_writer_is_quiet(tmp_path, agent_factory):
    """One transaction of about 6 MB: the agent cuts its high-level segment early and starts the
    next at the fast level. What it cut must reach the replica without waiting for another write
    (a build that cut without waking the shippers left it in the spool until the next write)."""
    db = tmp_path / "app.db"
    c = sqlite3.connect(db, isolation_level=None)
    c.execute("PRAGMA journal_mode=WAL")
    c.execute("CREATE TABLE t(id INTEGER PRIMARY KEY, v INTEGER, b BLOB)")
    c.execute("INSERT INTO t(v, b) VALUES (0, x'00')")
    root = tmp_path / "replica"
    agent = agent_factory(db, [f"file://{root}"], ["--sync-interval", "200ms"])
    agent.start()
    agent.wait_ready()
    c.execute("BEGIN")
    c.executemany("INSERT INTO t(v, b) VALUES (?, randomblob(3000))", [(i,) for i in range(1, 2001)])
    c.execute("COMMIT")
    deadline = time.time() + 20
    rows = None
    while time.time() < deadline:
        out = tmp_path / f"r{time.time_ns()}.db"
        p = run_walship("restore", f"file://{root}", "-o", out)
        if p.returncode == 0:
            rows = sqlite3.connect(out).execute("SELECT count(*) FROM t").fetchone()[0]
            if rows == 2001:
                break
        time.sleep(0.5)
    c.close()
    agent.stop()
    assert rows == 2001, f"the replica holds {rows} rows of 2001, {agent.read_log()[-2000:]}"
