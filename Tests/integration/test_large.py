"""Large and odd databases: a VACUUM of a >= 200 MB database (with bounded agent memory),
page sizes 1024 and 65536, and databases that shrink (auto_vacuum FULL / INCREMENTAL).
Each one restores byte-identically to the source after wal_checkpoint(TRUNCATE)."""
import os
import sqlite3
import subprocess
import time

import pytest

from conftest import (TICKET_SCHEMA, checkpoint_truncate, create_ticket_db, file_bytes_equal, require_tool, run_walship,
                      table_contents)
from workload import chain_problems, list_generations, run_writer

RSS_LIMIT_KB = 64 * 1024


def restore_exact(url, db, out, *extra):
    """Restores `url` to `out` and asserts it equals the (already checkpointed) source."""
    p = run_walship("restore", url, "-o", out, *extra, timeout=600)
    assert p.returncode == 0, f"restore failed:\n{p.stdout}\n{p.stderr}"
    assert p.stdout.startswith(f"restored {out}: generation "), p.stdout
    assert os.path.getsize(out) == os.path.getsize(db), \
        f"restored size {os.path.getsize(out)} != source size {os.path.getsize(db)}"
    assert file_bytes_equal(db, out), "restored file is not byte-identical to the source"
    return p.stdout


def restored_txid(stdout):
    # "restored OUT: generation G, txid N, ..."
    return int(stdout.split(", txid ")[1].split(",")[0])


def wait_shipped(url, db, tmp_path, timeout=60):
    """Waits until the latest restorable state equals the source's current contents (the
    writer is idle); returns the restore's txid."""
    want = table_contents(db)
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        out = tmp_path / "probe.db"
        p = run_walship("restore", url, "-o", out, "--force", "--integrity", "none")
        if p.returncode == 0:
            last = p.stdout
            if table_contents(out) == want:
                return restored_txid(p.stdout)
        time.sleep(0.3)
    raise AssertionError(f"replica never caught up with the source: {last}")


def snapshot_opens_with_lz4(replica_dir, tmp_path):
    """`lz4 -dc` on a snapshot object yields a SQLite file with integrity_check ok."""
    lz4 = require_tool("lz4", "apt-get install lz4")
    snaps = sorted(replica_dir.glob("generations/*/snapshots/*.snap.lz4"))
    assert snaps, f"no snapshot objects under {replica_dir}"
    plain = tmp_path / "snapshot-plain.db"
    with open(plain, "wb") as f:
        p = subprocess.run([lz4, "-dc", str(snaps[-1])], stdout=f, stderr=subprocess.PIPE, timeout=300)
    assert p.returncode == 0, f"lz4 -dc {snaps[-1]} failed: {p.stderr.decode()}"
    con = sqlite3.connect(str(plain))
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("SELECT count(*) FROM usuarios").fetchone()[0] >= 0
    finally:
        con.close()


def test_vacuum_of_200mb_database_with_bounded_memory(tmp_path, agent_factory, walship_bin):
    db = tmp_path / "big.db"
    replica = tmp_path / "replica"
    url = f"file://{replica}"
    run_writer("blobs", db, "--mb", 210)
    size0 = os.path.getsize(db)
    assert size0 >= 200 * 1024 * 1024, size0

    ag = agent_factory(db, [url], args=["--sync-interval", "200ms"]).start()
    ag.wait_ready(timeout=240)
    # delete three quarters of the rows, then VACUUM (one transaction rewriting the whole DB)
    out = run_writer("delete-vacuum", db, "--keep-every", 4)
    # the application carries on afterwards (another process)
    run_writer("mixed", db, "--seed", 3, "--tx", 50)
    wait_shipped(url, db, tmp_path, timeout=120)
    rss = ag.rss_peak_kb()
    print(f"agent peak RSS (VmHWM): {rss} kB; db {size0} bytes before VACUUM; {out.strip()}")
    ag.stop(timeout=240)
    assert rss is not None and rss < RSS_LIMIT_KB, f"agent peak RSS {rss} kB >= {RSS_LIMIT_KB} kB"

    checkpoint_truncate(db)
    assert os.path.getsize(db) < size0 // 2, "VACUUM did not shrink the source"
    assert not chain_problems(list_generations(walship_bin, url))
    restore_exact(url, db, tmp_path / "restored.db")


@pytest.mark.parametrize("page_size", [1024, 65536])
def test_page_sizes(tmp_path, agent_factory, walship_bin, page_size):
    db = tmp_path / "tickets.db"
    replica = tmp_path / "replica"
    url = f"file://{replica}"
    create_ticket_db(db, page_size=page_size, rows=30)

    ag = agent_factory(db, [url], args=["--sync-interval", "200ms", "--checkpoint-frames", "200"]).start()
    ag.wait_ready()
    run_writer("mixed", db, "--seed", page_size, "--tx", 600)
    txid_mid = wait_shipped(url, db, tmp_path)
    mid = table_contents(db)
    run_writer("mixed", db, "--seed", page_size + 1, "--tx", 300)
    ag.stop()

    con = sqlite3.connect(str(db))
    assert con.execute("PRAGMA page_size").fetchone()[0] == page_size
    con.close()
    checkpoint_truncate(db)
    assert not chain_problems(list_generations(walship_bin, url))
    restore_exact(url, db, tmp_path / "restored.db")
    # exact PITR to the transaction where the first writer stopped
    o = tmp_path / "mid.db"
    p = run_walship("restore", url, "-o", o, "--txid", txid_mid)
    assert p.returncode == 0, p.stderr
    assert table_contents(o) == mid
    snapshot_opens_with_lz4(replica, tmp_path)


@pytest.mark.parametrize("mode", ["full", "incremental"])
def test_database_that_shrinks(tmp_path, agent_factory, walship_bin, mode):
    db = tmp_path / "shrink.db"
    replica = tmp_path / "replica"
    url = f"file://{replica}"
    con = sqlite3.connect(str(db))
    con.execute(f"PRAGMA auto_vacuum={mode.upper()}")   # before the first table exists
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(TICKET_SCHEMA)
    con.close()
    con = sqlite3.connect(str(db))
    assert con.execute("PRAGMA auto_vacuum").fetchone()[0] == (1 if mode == "full" else 2)
    con.close()

    ag = agent_factory(db, [url], args=["--sync-interval", "200ms", "--checkpoint-frames", "500"]).start()
    ag.wait_ready()
    run_writer("fill", db, "--rows", 15000, "--seed", 7)
    txid_big = wait_shipped(url, db, tmp_path)
    big = table_contents(db)
    con = sqlite3.connect(str(db), timeout=10)
    pages_big = con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    shrink = ["shrink", db, "--keep-every", 10] + (["--incremental"] if mode == "incremental" else [])
    run_writer(*shrink)
    ag.stop()

    checkpoint_truncate(db)
    page_size = 4096
    assert os.path.getsize(db) < pages_big * page_size // 3, \
        f"source did not shrink: {os.path.getsize(db)} bytes vs {pages_big} pages before"
    assert not chain_problems(list_generations(walship_bin, url))
    restore_exact(url, db, tmp_path / "restored.db")

    # PITR to just before the shrink gives the larger state, at its larger size
    o = tmp_path / "before-shrink.db"
    p = run_walship("restore", url, "-o", o, "--txid", txid_big)
    assert p.returncode == 0, p.stderr
    assert restored_txid(p.stdout) == txid_big
    assert table_contents(o) == big
    assert os.path.getsize(o) == pages_big * page_size, (os.path.getsize(o), pages_big)
    snapshot_opens_with_lz4(replica, tmp_path)
