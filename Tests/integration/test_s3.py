"""walship with an S3 replica: a real `rclone serve s3` on loopback with SigV4 authentication
(s3server.py), real SQLite files written by separate processes, the real walship binary.

  1. exactness over S3: latest byte-identical, PITR by --timestamp, kill -9 + restart  (G3, G7)
  2. bad setup (wrong credentials, missing bucket) is one clear error, nothing left   (G8)
  3. S3 server down for 10 s under writes: no gap, exact restore, replica catches up  (G7)
  4. S3 server answering errors (HTTP 500) for a while: retries, no gap, exact        (G7)
  5. an S3 replica beside a directory replica: S3 down delays only itself             (G7)
  6. a prefix with a space, '+', '=' and non-ASCII works end to end
  7. a >= 500 MB snapshot goes up as a multipart upload with bounded agent memory     (G6)
  8. a replica emptied under the agent is noticed: a new generation, restorable       (G2)
"""
import json
import os
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import (HERE, WALSHIP, checkpoint_truncate, create_ticket_db, file_bytes_equal, run_walship,
                      table_contents)
from s3server import REGION, S3Server, s3server  # noqa: F401  (fixture)
from workload import chain_problems, digest_of, rfc3339, start_writer

WRITER = HERE / "writer.py"
WORKLOAD = HERE / "workload.py"
SUMMARY_RE = re.compile(r"^restored (.+): generation (\S+)(?: \(database [0-9a-f]{16}\))?, txid (\d+), committed (\S+),", re.M)
AGENT_ARGS = ["--sync-interval", "200ms"]
RSS_LIMIT_KB = 64 * 1024


# ---------------------------------------------------------------- helpers

def run_py(script, *args, timeout=120):
    p = subprocess.run([sys.executable, str(script), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    assert p.returncode == 0, f"{script.name} {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p.stdout


def restore(url, out, env, *args, timeout=300):
    """Restores, checks the summary line, returns (generation, txid)."""
    p = run_walship("restore", url, "-o", out, *args, env=env, timeout=timeout)
    assert p.returncode == 0, f"restore {args} from {url} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    m = SUMMARY_RE.search(p.stdout)
    assert m, f"no summary line in restore output:\n{p.stdout}\n{p.stderr}"
    assert m.group(1) == str(out), m.group(0)
    return m.group(2), int(m.group(3))


def list_json(url, env):
    p = run_walship("list", url, "--json", env=env, timeout=120)
    assert p.returncode == 0, f"list {url} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def wait_contents(url, env, want, tmp_path, timeout=60, name="probe.db"):
    """Polls latest restores of `url` until their table contents equal `want`; returns txid."""
    deadline = time.time() + timeout
    last = None
    out = tmp_path / name
    while time.time() < deadline:
        p = run_walship("restore", url, "-o", out, "--force", "--integrity", "none", env=env, timeout=120)
        last = (p.returncode, p.stdout.strip(), p.stderr.strip())
        if p.returncode == 0:
            if table_contents(out) == want:
                return int(SUMMARY_RE.search(p.stdout).group(3))
        time.sleep(0.3)
    raise AssertionError(f"replica {url} never reached the expected contents within {timeout}s; last restore: {last}")


def as_json(tables):
    return json.loads(json.dumps(tables))


def outbox(db):
    d = Path(db).parent / f".{Path(db).name}-walship" / "outbox"
    return sorted(os.listdir(d)) if d.exists() else []


def assert_exact_latest(url, env, db, out, *extra):
    """After the agent stopped: checkpoint the source, restore latest, byte-identical."""
    checkpoint_truncate(db)
    gen, txid = restore(url, out, env, *extra)
    src, got = table_contents(db), table_contents(out)
    lost = {t: len(set(src[t]) - set(got[t])) for t in src}
    assert got == src, f"latest restore is not the latest committed state (rows missing per table: {lost})"
    assert file_bytes_equal(db, out), "latest restore is not byte-identical to the checkpointed source"
    return gen, txid


def assert_one_gapless_generation(url, env, gen, txid, agent_log=""):
    gens = list_json(url, env)
    problems = chain_problems(gens)
    assert not problems, "\n".join(problems)
    assert [g["generation"] for g in gens] == [gen], \
        f"expected one generation {gen}:\n{json.dumps(gens, indent=1)[:3000]}\n{agent_log[-3000:]}"
    assert int(gens[0]["last_txid"]) == txid, (gens[0]["last_txid"], txid)


def check_instants(url, env, instants, tmp_path, tag):
    """--timestamp restores of writer-recorded instants (workload.py tickets format)."""
    bad = []
    for k, x in enumerate(instants):
        o = tmp_path / f"{tag}-{k}.db"
        p = run_walship("restore", url, "-o", o, "--timestamp", rfc3339(x["t"]), "--integrity", "quick", env=env)
        if p.returncode != 0:
            bad.append(f"t={rfc3339(x['t'])}: restore failed: {p.stderr.strip()}")
            continue
        got = table_contents(o)
        if digest_of(got) != x["digest"]:
            bad.append(f"t={rfc3339(x['t'])}: rows {({t: len(v) for t, v in got.items()})} expected {x['rows']}; "
                       f"{p.stdout.strip()}")
        o.unlink()
    assert not bad, "\n".join(bad)


def read_instants(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


# ---------------------------------------------------------------- 1. exactness over S3

def test_exact_latest_pitr_and_kill9_over_s3(tmp_path, agent_factory, s3server):
    srv = s3server
    env = srv.env()
    url = srv.url("walship", "app")
    db, dumps = tmp_path / "app.db", tmp_path / "dumps"
    dumps.mkdir()
    create_ticket_db(db, rows=30)

    a1 = agent_factory(db, [url], AGENT_ARGS, log_path=tmp_path / "agent-1.log", env=env).start().wait_ready()
    run_py(WRITER, "workload", db, "--seconds", "6", "--instants", "10", "--quiet", "0.2",
           "--max-rate", "200", "--dump-dir", dumps, "--seed", "41")
    time.sleep(1.0)
    assert a1.proc.poll() is None, a1.read_log()
    a1.kill9()

    # the application carries on while the agent is down, and after it restarts
    run_py(WRITER, "bursts", db, "--bursts", "2", "--per-burst", "20", "--pause", "0.3", "--seed", "42")
    a2 = agent_factory(db, [url], AGENT_ARGS, log_path=tmp_path / "agent-2.log", env=env).start().wait_ready()
    run_py(WRITER, "bursts", db, "--bursts", "2", "--per-burst", "20", "--pause", "0.3", "--seed", "43")
    time.sleep(0.5)
    a2.stop()
    log2 = a2.read_log()
    assert "continuing generation" in log2 or "starting a new generation" in log2, log2

    # latest: byte-identical to the source after a TRUNCATE checkpoint
    _, txid = assert_exact_latest(url, env, db, tmp_path / "latest.db")
    gens = list_json(url, env)
    assert not chain_problems(gens), chain_problems(gens)
    assert int(max(gens, key=lambda g: g["generation"])["last_txid"]) == txid

    # PITR: every recorded instant restores to exactly the copied tables
    summary = json.loads((dumps / "summary.json").read_text())
    instants = [json.loads(Path(p).read_text()) for p in summary["instants"]]
    assert len(instants) >= 8, summary
    offsets = set()
    for i, inst in enumerate(instants):
        out = tmp_path / f"ts-{i}.db"
        _, t = restore(url, out, env, "--timestamp", inst["t"], "--integrity", "quick")
        assert as_json(table_contents(out)) == inst["tables"], f"--timestamp {inst['t']} (txid {t}) differs"
        offsets.add(t - inst["tx_count"])
        out.unlink()
    assert len(offsets) == 1, f"txids do not map one-to-one to writer transactions: {offsets}"

    # objects really are in the bucket, where docs/FORMAT.md puts them
    keys = srv.objects("walship", "app")
    assert "app/walship-replica.json" in keys, keys[:20]
    assert any(k.startswith("app/generations/") and k.endswith(".snap.lz4") for k in keys), keys[:20]
    assert any(k.startswith("app/generations/") and k.endswith(".seg.lz4") for k in keys), keys[:20]


# ---------------------------------------------------------------- 2. bad setup

BAD_SETUPS = {
    # name: (bucket, credential overrides, expected S3 error code)
    "wrong-secret": ("walship", {"secret_key": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYWRONGSECRET"}, "SignatureDoesNotMatch"),
    "unknown-access-key": ("walship", {"access_key": "AKIAUNKNOWNKEY000001"}, "InvalidAccessKeyId"),
    "missing-bucket": ("no-such-bucket", {}, "NoSuchBucket"),
}


def assert_clear_error(p, srv, code, bucket, what):
    err = p.stderr.strip()
    assert p.returncode != 0, f"{what} succeeded with a bad setup:\n{p.stdout}\n{p.stderr}"
    assert p.returncode == 1, f"{what} exit code {p.returncode}:\n{err}"
    assert err.startswith("walship: error:"), f"{what}: not a walship error line:\n{err}"
    assert len(err.splitlines()) == 1, f"{what}: error is more than one line:\n{err}"
    assert code in err, f"{what}: error does not name the failure {code}:\n{err}"
    if code == "NoSuchBucket":
        assert bucket in err, f"{what}: error does not name the bucket {bucket}:\n{err}"
    else:
        assert srv.endpoint in err or f"127.0.0.1:{srv.port}" in err, \
            f"{what}: error does not name the endpoint {srv.endpoint}:\n{err}"


@pytest.mark.parametrize("case", sorted(BAD_SETUPS))
def test_bad_setup_is_one_clear_error(tmp_path, s3server, case):
    srv = s3server
    bucket, creds, code = BAD_SETUPS[case]
    env = srv.env(**creds)
    url = srv.url(bucket, "app")
    good = srv.env()

    # a replica with something in it, so restore fails on the setup and not on emptiness
    db = tmp_path / "app.db"
    create_ticket_db(db, rows=5)
    if bucket == "walship":
        p = run_walship("snapshot", db, url, env=good, timeout=120)
        assert p.returncode == 0, f"snapshot with good credentials failed:\n{p.stdout}\n{p.stderr}"

    # replicate: exits non-zero on its own (the timeout only catches a hang) with the message
    try:
        p = subprocess.run([str(WALSHIP), "replicate", str(db), url, *AGENT_ARGS],
                           capture_output=True, text=True, timeout=60, env=env)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"replicate with {case} kept running instead of failing:\n{e.stderr}")
    assert_clear_error(p, srv, code, bucket, "replicate")

    # restore: same message, nothing left behind (no OUT, no temp file beside it)
    outdir = tmp_path / "out"
    outdir.mkdir()
    p = run_walship("restore", url, "-o", outdir / "restored.db", env=env, timeout=60)
    assert_clear_error(p, srv, code, bucket, "restore")
    assert os.listdir(outdir) == [], f"restore left files behind: {os.listdir(outdir)}"

    p = run_walship("list", url, "--json", env=env, timeout=60)
    assert_clear_error(p, srv, code, bucket, "list")
    assert p.stdout == "", p.stdout


# ---------------------------------------------------------------- 3. server outage

def test_server_outage_then_catch_up(tmp_path, agent_factory, s3server):
    srv = s3server
    env = srv.env()
    url = srv.url("walship", "outage")
    db = tmp_path / "app.db"
    create_ticket_db(db, rows=30)
    agent = agent_factory(db, [url], AGENT_ARGS, env=env).start().wait_ready()

    stop_file, instants_file = tmp_path / "stop-writer", tmp_path / "instants.jsonl"
    writer = start_writer("tickets", db, "--seed", 3, "--stop-file", stop_file, "--instants-file",
                          instants_file, "--rate", 100, "--instant-every", 0.8, log_path=tmp_path / "writer.log")
    try:
        time.sleep(2.0)
        srv.stop()
        down_from = time.time()
        time.sleep(10.0)
        assert agent.proc.poll() is None, f"agent died while S3 was down:\n{agent.read_log()}"
        assert outbox(db), "nothing waits in the spool outbox while the only replica is down"
        down_to = time.time()
        srv.restart()
        time.sleep(3.0)
    finally:
        stop_file.write_text("stop")
        writer.wait(timeout=60)
    assert writer.returncode == 0, (tmp_path / "writer.log").read_text()
    assert agent.proc.poll() is None, agent.read_log()

    # the replica catches up with the writer's last commit while the agent runs
    wait_contents(url, env, table_contents(db), tmp_path, timeout=60)
    agent.stop()
    assert outbox(db) == [], f"spool outbox not empty after the replica caught up: {outbox(db)[:10]}"

    gen, txid = assert_exact_latest(url, env, db, tmp_path / "latest.db")
    assert_one_gapless_generation(url, env, gen, txid, agent.read_log())

    # commits made while the server was down restore exactly in time
    instants = read_instants(instants_file)
    during = [x for x in instants if down_from + 0.5 < x["t_commit"] and x["t"] < down_to]
    assert len(during) >= 5, f"too few instants recorded during the outage: {len(during)} of {len(instants)}"
    check_instants(url, env, during, tmp_path, "outage")


# ---------------------------------------------------------------- 4. server errors for a while

def test_server_errors_for_a_while_then_recovery(tmp_path, agent_factory, request):
    """The server keeps answering, but every upload fails with HTTP 500 InternalError for ~8 s.
    chmod 0555 cannot cause that here: the tests (and rclone) run as root, which ignores
    directory permissions. Instead the prefix's `generations` directory is moved aside and a
    regular file put in its place, so rclone's mkdir for each uploaded key fails ("not a
    directory") and it answers 500; moving the directory back heals it. rclone caches the
    served tree (VFS directory cache, 5 min) and would keep listing the stale tree after the
    heal, so the server is restarted on the same port right after the heal to drop that cache
    (a blip of well under a second; the 8 s of HTTP 500s are what this test is about). Turning
    the cache off (--dir-cache-time 0s) instead made rclone hang on requests."""
    srv = S3Server(tmp_path / "s3", buckets=["walship"]).start()
    request.addfinalizer(srv.stop)
    env = srv.env()
    url = srv.url("walship", "errs")
    db = tmp_path / "app.db"
    create_ticket_db(db, rows=30)
    agent = agent_factory(db, [url], AGENT_ARGS, env=env).start().wait_ready()

    stop_file, instants_file = tmp_path / "stop-writer", tmp_path / "instants.jsonl"
    writer = start_writer("tickets", db, "--seed", 4, "--stop-file", stop_file, "--instants-file",
                          instants_file, "--rate", 100, "--instant-every", 0.8, log_path=tmp_path / "writer.log")
    gdir = srv.root / "walship" / "errs" / "generations"
    aside = gdir.with_name("generations.aside")
    try:
        time.sleep(2.0)
        assert gdir.is_dir(), f"no generations directory in the bucket: {srv.objects('walship')[:10]}"
        log_before = len(srv.read_log())
        os.rename(gdir, aside)
        gdir.write_text("not a directory: uploads fail with HTTP 500 until this file goes away\n")
        bad_from = time.time()
        time.sleep(8.0)
        assert agent.proc.poll() is None, f"agent died while S3 answered errors:\n{agent.read_log()}"
        failures = srv.read_log()[log_before:].count("not a directory")
        assert failures >= 2, "the agent did not try (and retry) uploads while the server answered errors"
        assert outbox(db), "nothing waits in the spool outbox while uploads fail"
        gdir.unlink()
        os.rename(aside, gdir)
        bad_to = time.time()
        srv.restart()   # drop rclone's stale directory cache (see the docstring)
        time.sleep(3.0)
    finally:
        if aside.exists():
            if gdir.is_file():
                gdir.unlink()
            os.rename(aside, gdir)
        stop_file.write_text("stop")
        writer.wait(timeout=60)
    assert writer.returncode == 0, (tmp_path / "writer.log").read_text()
    assert agent.proc.poll() is None, agent.read_log()

    wait_contents(url, env, table_contents(db), tmp_path, timeout=60)
    agent.stop()
    assert outbox(db) == [], f"spool outbox not empty after recovery: {outbox(db)[:10]}"

    gen, txid = assert_exact_latest(url, env, db, tmp_path / "latest.db")
    assert_one_gapless_generation(url, env, gen, txid, agent.read_log())
    instants = read_instants(instants_file)
    during = [x for x in instants if bad_from + 0.5 < x["t_commit"] and x["t"] < bad_to]
    assert len(during) >= 4, f"too few instants recorded while uploads failed: {len(during)}"
    check_instants(url, env, during, tmp_path, "errs")


# ---------------------------------------------------------------- 5. two replicas, one down

def test_s3_down_delays_only_itself(tmp_path, agent_factory, s3server):
    srv = s3server
    env = srv.env()
    s3url = srv.url("walship", "two")
    fileurl = "file://" + str(tmp_path / "file-replica")
    db = tmp_path / "app.db"
    create_ticket_db(db, rows=20)
    agent = agent_factory(db, [s3url, fileurl], AGENT_ARGS, env=env).start().wait_ready()

    run_py(WORKLOAD, "mixed", db, "--seed", 5, "--tx", 100)
    want = table_contents(db)
    wait_contents(s3url, env, want, tmp_path, name="probe-s3.db")
    wait_contents(fileurl, env, want, tmp_path, name="probe-file.db")

    srv.stop()
    try:
        run_py(WRITER, "insert", db, "--text", "WHILE-S3-DOWN-1")
        run_py(WORKLOAD, "mixed", db, "--seed", 6, "--tx", 60)
        run_py(WRITER, "insert", db, "--text", "WHILE-S3-DOWN-2")
        want = table_contents(db)
        # the directory replica stays current while S3 is down
        wait_contents(fileurl, env, want, tmp_path, timeout=30, name="probe-file.db")
        assert any(r[1] == "WHILE-S3-DOWN-2" for r in want["usuarios"])
        assert outbox(db), "the spool outbox is empty although the S3 replica is down"
        assert agent.proc.poll() is None, agent.read_log()
        time.sleep(2.0)  # S3 stays down a little longer; the file replica must not regress
        wait_contents(fileurl, env, want, tmp_path, timeout=10, name="probe-file.db")
    finally:
        srv.restart()

    # S3 catches up
    wait_contents(s3url, env, want, tmp_path, timeout=60, name="probe-s3.db")
    run_py(WRITER, "insert", db, "--text", "AFTER-S3-BACK")
    time.sleep(0.5)
    agent.stop()
    assert outbox(db) == [], f"spool outbox not empty: {outbox(db)[:10]}"

    gen_s3, txid_s3 = assert_exact_latest(s3url, env, db, tmp_path / "latest-s3.db")
    gen_f, txid_f = assert_exact_latest(fileurl, env, db, tmp_path / "latest-file.db")
    assert txid_s3 == txid_f, (txid_s3, txid_f)
    assert gen_s3 == gen_f, (gen_s3, gen_f)
    assert_one_gapless_generation(s3url, env, gen_s3, txid_s3, agent.read_log())
    assert_one_gapless_generation(fileurl, env, gen_f, txid_f, agent.read_log())


# ---------------------------------------------------------------- 6. awkward keys

def test_prefix_with_space_plus_equals_and_non_ascii(tmp_path, agent_factory, s3server):
    srv = s3server
    env = srv.env()
    prefix = "my dir/a+b=c/ñ"
    url = srv.url("walship", prefix)
    assert "%20" in url and "%2B" in url and "%3D" in url and "%C3%B1" in url, url
    db = tmp_path / "app.db"
    create_ticket_db(db, rows=10)
    agent = agent_factory(db, [url], AGENT_ARGS, env=env).start().wait_ready()
    run_py(WORKLOAD, "mixed", db, "--seed", 7, "--tx", 80)
    run_py(WRITER, "insert", db, "--text", "ñandú + = espacio")
    time.sleep(0.5)
    agent.stop()

    gen, txid = assert_exact_latest(url, env, db, tmp_path / "latest.db")
    assert_one_gapless_generation(url, env, gen, txid, agent.read_log())
    # the keys on the server are exactly the decoded prefix: not double-encoded, '+' not a space
    keys = srv.objects("walship")
    assert f"{prefix}/walship-replica.json" in keys, keys[:20]
    assert keys and all(k.startswith(prefix + "/") for k in keys), keys[:20]
    assert any(k.startswith(f"{prefix}/generations/{gen}/") and k.endswith(".seg.lz4") for k in keys), keys[:20]
    # PITR by txid works through the same keys
    mid = txid // 2
    _, t = restore(url, tmp_path / "mid.db", env, "--txid", mid)
    assert t == mid


# ---------------------------------------------------------------- 7. large snapshot, multipart

def test_500mb_snapshot_multipart_with_bounded_memory(tmp_path, agent_factory):
    srv = S3Server(tmp_path / "s3big", buckets=["walship"], log_level="DEBUG").start()
    try:
        env = srv.env()
        url = srv.url("walship", "big")
        db = tmp_path / "big.db"
        run_py(WORKLOAD, "blobs", db, "--mb", 510, timeout=300)
        size = os.path.getsize(db)
        assert size >= 500 * 1024 * 1024, size

        agent = agent_factory(db, [url], AGENT_ARGS, env=env).start().wait_ready(timeout=240)
        run_py(WORKLOAD, "mixed", db, "--seed", 8, "--tx", 30)
        deadline = time.time() + 240
        while outbox(db) and time.time() < deadline:   # every object acknowledged by the replica
            assert agent.proc.poll() is None, agent.read_log()
            time.sleep(0.5)
        assert outbox(db) == [], f"snapshot still waiting in the spool: {outbox(db)}"
        rss = agent.rss_peak_kb()
        agent.stop(timeout=240)
        print(f"agent peak RSS (VmHWM): {rss} kB for a {size} byte database")
        assert rss is not None and rss < RSS_LIMIT_KB, f"agent peak RSS {rss} kB >= {RSS_LIMIT_KB} kB"

        keys = srv.objects("walship", "big")
        snaps = [k for k in keys if k.endswith(".snap.lz4")]
        assert snaps, keys[:20]
        assert os.path.getsize(srv.root / "walship" / snaps[0]) > 64 * 1024 * 1024
        log = srv.read_log()
        assert re.search(r"initiate multipart upload walship big/generations/\S+/snapshots/\S+\.snap\.lz4", log), \
            "the snapshot was not uploaded as a multipart upload:\n" + \
            "\n".join(l for l in log.splitlines() if "serve s3" in l and "snap" in l)[:3000]
        assert re.search(r"complete multipart upload walship big/generations/\S+/snapshots/", log)
        assert "abort multipart" not in log.lower() or "complete multipart" in log

        assert_exact_latest(url, env, db, tmp_path / "restored.db", "--integrity", "quick")
    finally:
        srv.stop()


# ---------------------------------------------------------------- 8. replica emptied under the agent

def test_replica_emptied_under_the_agent_gets_a_new_generation(tmp_path, agent_factory, s3server):
    """Every object under the replica's prefix deleted while the agent runs (an operator, a
    lifecycle rule): the store takes new segments without complaint, into a chain that has
    lost its snapshot. The agent must notice at its next housekeeping look (every second
    here: retention / 4), say so, and start a new generation that restores exactly."""
    srv = s3server
    env = srv.env()
    url = srv.url("walship", "wiped")
    db = tmp_path / "app.db"
    create_ticket_db(db, rows=5)
    agent = agent_factory(db, [url], AGENT_ARGS + ["--retention", "4s"], env=env).start().wait_ready()
    con = sqlite3.connect(str(db), isolation_level=None, timeout=10)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('before', 'b@example.com')")
    deadline = time.monotonic() + 30
    while not any("/segments/" in k for k in srv.objects("walship", "wiped")):   # the replica acknowledged a segment
        assert time.monotonic() < deadline, agent.read_log()[-3000:]
        time.sleep(0.1)
    while True:   # signed DELETEs, as an operator's tool would send, until nothing is left
        keys = srv.objects("walship", "wiped")
        if not keys:
            break
        assert time.monotonic() < deadline, keys
        for key in keys:
            subprocess.run(["curl", "-sf", "-X", "DELETE", "--aws-sigv4", f"aws:amz:{REGION}:s3",
                            "--user", f"{env['AWS_ACCESS_KEY_ID']}:{env['AWS_SECRET_ACCESS_KEY']}",
                            f"{srv.endpoint}/walship/{key}"], check=True, timeout=30)
    deadline = time.monotonic() + 30
    i = 0
    while "lost the current generation" not in agent.read_log():
        assert time.monotonic() < deadline, agent.read_log()[-3000:]
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, 'x@example.com')", (f"after {i}",))
        i += 1
        time.sleep(0.2)
    con.execute("INSERT INTO usuarios(nombre, email) VALUES('last', 'l@example.com')")
    con.close()
    wait_contents(url, env, table_contents(db), tmp_path, timeout=60)
    agent.stop()
    assert_exact_latest(url, env, db, tmp_path / "latest.db")
