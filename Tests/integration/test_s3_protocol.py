"""S3 protocol details, against the real `rclone serve s3` with SigV4 authentication (s3server.py)
and the real walship binary. Nothing is mocked; where a test needs to see or disturb the wire it
puts a small real TCP proxy (relayproxy.RelayProxy) between walship and rclone, which relays the
bytes unchanged (so signatures stay valid) and records every request.

  1. ListObjectsV2 pagination: a generation of 1100 segments (more than S3's 1000 keys per
     page) is listed completely by `walship list`, and a newer generation on page 2 restores
  2. virtual-hosted-style addressing (path-style=false): requests go to
     http://<bucket>.localhost:<port>/<key>; rclone, run with --force-path-style=false, takes
     the bucket from the Host header; replicate and restore are exact
  3. a GET cut in the middle of a snapshot's body resumes with `Range: bytes=N-` at the byte
     where it stopped, and the restore is exact
  4. compaction and retention delete with DeleteObjects (POST ?delete, Content-MD5), in batches;
     the agent's requests reuse a few connections
"""
import json
import re
import time

from conftest import (AgentProcess, checkpoint_truncate, create_ticket_db, file_bytes_equal, run_walship, table_contents)
from relayproxy import RelayProxy
from s3server import REGION, S3Server
from workload import chain_problems, run_writer

SUMMARY_RE = re.compile(r"^restored (.+): generation (\S+)(?: \(database [0-9a-f]{16}\))?, txid (\d+), committed (\S+),", re.M)
AGENT_ARGS = ["--sync-interval", "200ms"]
ALL_TABLES = ("usuarios", "tickets", "interacciones", "blobs")


# ---------------------------------------------------------------- helpers

def s3_url(bucket, prefix, endpoint, path_style):
    return f"s3://{bucket}/{prefix}?endpoint={endpoint}&region={REGION}&path-style={'true' if path_style else 'false'}"


def list_json(url, env):
    p = run_walship("list", url, "--json", env=env, timeout=120)
    assert p.returncode == 0, f"walship list {url} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return json.loads(p.stdout)


def restore_exact(url, env, db, out, tables=("usuarios", "tickets", "interacciones")):
    """Checkpoints the (idle) source, restores the latest state, compares rows and bytes.
    Returns (generation, txid, restore stdout+stderr)."""
    checkpoint_truncate(db)
    p = run_walship("restore", url, "-o", out, env=env, timeout=120)
    assert p.returncode == 0, f"restore from {url} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    m = SUMMARY_RE.search(p.stdout)
    assert m, f"no summary line in restore output:\n{p.stdout}\n{p.stderr}"
    src, got = table_contents(db, tables), table_contents(out, tables)
    assert got == src, ("restored rows differ from the source: "
                        f"{ {t: (len(got[t]), len(src[t])) for t in tables} } (restored, source) rows per table")
    assert file_bytes_equal(db, out), "restored file is not byte-identical to the checkpointed source"
    return m.group(2), int(m.group(3)), p.stdout + p.stderr


def run_agent(db, url, env, tmp_path, writer_args, name="agent"):
    """Starts `walship replicate`, runs one writer process against the database, stops the
    agent (SIGTERM: it ships everything committed), returns the agent's log."""
    agent = AgentProcess(db, [url], AGENT_ARGS, log_path=tmp_path / f"{name}.log", env=env).start()
    try:
        agent.wait_ready()
        run_writer(*writer_args)
        time.sleep(0.5)
        assert agent.proc.poll() is None, f"agent exited while replicating:\n{agent.read_log()}"
        agent.stop()
    finally:
        if agent.proc.poll() is None:
            agent.kill9()
    return agent.read_log()


# ---------------------------------------------------------------- 1. LIST beyond 1000 keys

def test_list_pages_beyond_1000_keys(tmp_path):
    """S3 answers at most 1000 keys per ListObjectsV2 page. An older generation with 1100
    segments (objects written straight into rclone's served directory before it starts: their
    names are real walship object names, their contents are never read) sorts before the
    generation the agent makes, so that generation's keys are only on the second page."""
    root = tmp_path / "s3"
    old_ms = int(time.time() * 1000) - 3_600_000
    old_gen = f"{old_ms * 1000:016x}abcd"
    gdir = root / "walship" / "pg" / "generations" / old_gen
    (gdir / "segments" / "0").mkdir(parents=True)
    (gdir / "snapshots").mkdir()
    n_segs = 1100
    snap_key = f"generations/{old_gen}/snapshots/{0:016x}-{old_ms}.snap.lz4"
    (root / "walship" / "pg" / snap_key).write_bytes(b"never read")
    seg_keys = set()
    for i in range(1, n_segs + 1):
        k = f"generations/{old_gen}/segments/0/{i:016x}-{i:016x}-{old_ms + i}-{old_ms + i}.seg.lz4"
        (root / "walship" / "pg" / k).write_bytes(b"never read")
        seg_keys.add(k)
    (root / "walship" / "pg" / "walship-replica.json").write_text('{"format":"walship-replica","version":1}\n')

    srv = S3Server(root, buckets=["walship"], log_level="DEBUG").start()   # DEBUG: rclone logs each LIST page
    try:
        env = srv.env()
        url = srv.url("walship", "pg")
        gens = list_json(url, env)
        assert [g["generation"] for g in gens] == [old_gen], f"generations listed: {[g['generation'] for g in gens]}"
        g = gens[0]
        listed = {s["key"] for s in g["segments"]}
        assert len(g["segments"]) == n_segs, \
            f"walship list reports {len(g['segments'])} segments of {n_segs} (missing e.g. {sorted(seg_keys - listed)[:3]})"
        assert listed == seg_keys, f"segment keys differ: missing {sorted(seg_keys - listed)[:3]}, extra {sorted(listed - seg_keys)[:3]}"
        assert g["last_txid"] == str(n_segs), f"last_txid {g['last_txid']}, expected {n_segs}"
        assert [s["key"] for s in g["snapshots"]] == [snap_key], \
            f"the snapshot (sorted after the 1100 segments, so on page 2) is not listed: {g['snapshots']}"

        # the server really paged: a full page marked truncated, then a page that continues it
        log = srv.read_log()
        assert re.search(r"Listed 1000 keys from \d+ directories \(truncated=true\)", log), \
            "rclone never answered a full, truncated page of 1000 keys:\n" + "\n".join(re.findall(r".*Listed.*", log))
        assert re.search(r'prefix:"pg/generations/" page: \{Marker:pg/generations/\S+ HasMarker:true', log), \
            "walship never asked for a second page (continuation token):\n" + "\n".join(re.findall(r".*page:.*", log))

        # a real agent on the same prefix: its generation's keys sort after the 1100 segments
        db = tmp_path / "app.db"
        create_ticket_db(db, rows=20)
        agent_log = run_agent(db, url, env, tmp_path, ["mixed", db, "--seed", 11, "--tx", 20])
        gens = list_json(url, env)
        assert len(gens) == 2 and gens[0]["generation"] == old_gen, \
            f"expected the old generation and the agent's: {[g['generation'] for g in gens]}\n{agent_log[-2000:]}"
        assert len(gens[0]["segments"]) == n_segs, len(gens[0]["segments"])
        new = gens[1]
        assert new["segments"] and new["snapshots"], f"agent generation incomplete in the listing: {json.dumps(new)[:2000]}"
        # the agent continues txids after the replica's last one, which it only sees on page 2
        assert int(new["first_txid"]) > n_segs, \
            f"the agent's generation starts at txid {new['first_txid']}: it did not see txid {n_segs} on page 2"
        assert not chain_problems([new]), chain_problems([new])
        gen, txid, _ = restore_exact(url, env, db, tmp_path / "restored.db")
        assert gen == new["generation"] and txid == int(new["last_txid"]), (gen, txid, new["generation"], new["last_txid"])
    finally:
        srv.stop()


# ---------------------------------------------------------------- 2. virtual-hosted style

def test_virtual_hosted_style_addressing(tmp_path):
    """path-style=false: walship puts the bucket in the host name. `localhost` as the endpoint
    host makes that `walship.localhost`, which libcurl resolves to loopback by itself (no
    /etc/hosts entry needed). rclone with --force-path-style=false takes the bucket from the
    first label of the Host header, so a path-style request cannot reach the bucket there."""
    srv = S3Server(tmp_path / "s3", buckets=["walship"], log_level="DEBUG",
                   extra_args=["--force-path-style=false"]).start()
    proxy = RelayProxy(srv.port)   # records Host and request targets
    try:
        env = srv.env()
        url = s3_url("walship", "vh", f"http://localhost:{proxy.port}", path_style=False)
        db = tmp_path / "app.db"
        create_ticket_db(db, rows=20)
        agent_log = run_agent(db, url, env, tmp_path, ["mixed", db, "--seed", 12, "--tx", 40])
        gens = list_json(url, env)
        assert len(gens) == 1 and gens[0]["segments"], f"listing through {url}: {json.dumps(gens)[:2000]}\n{agent_log[-2000:]}"
        assert not chain_problems(gens), chain_problems(gens)
        gen, txid, _ = restore_exact(url, env, db, tmp_path / "restored.db")
        assert txid == int(gens[0]["last_txid"]), (txid, gens[0]["last_txid"])

        keys = srv.objects("walship", "vh")
        assert "vh/walship-replica.json" in keys and any(k.endswith(".seg.lz4") for k in keys), keys[:10]

        # every request carried the bucket in the Host header and not in the path
        reqs = list(proxy.requests)
        assert not proxy.errors, proxy.errors[:5]
        host = f"walship.localhost:{proxy.port}"
        bad_host = [(r["method"], r["target"], r["headers"].get("host")) for r in reqs if r["headers"].get("host") != host]
        assert not bad_host, f"requests without Host {host}: {bad_host[:5]}"
        in_path = [(r["method"], r["target"]) for r in reqs if re.match(r"/walship(/|\?|$)", r["target"])]
        assert not in_path, f"requests with the bucket in the path: {in_path[:5]}"
        kinds = {(r["method"], "list-type=2" in r["target"]) for r in reqs}
        assert {("PUT", False), ("GET", True), ("GET", False)} <= kinds, f"missing request kinds: {kinds}"
        assert all(r["status"] is not None and r["status"] < 300 for r in reqs), \
            [(r["method"], r["target"], r["status"]) for r in reqs if not r["status"] or r["status"] >= 300][:5]
        seg_gets = [r for r in reqs if r["method"] == "GET" and r["target"].startswith(f"/vh/generations/{gen}/segments/")]
        assert seg_gets, "the restore fetched no segment through the virtual-hosted URL"

        # rclone mapped each request to the bucket from the Host header ("/key => /walship/key")
        log = srv.read_log()
        # (rclone logs the path it got, then the bucket path it made, with the query string)
        mapped = [(a, b.split("?")[0]) for a, b in re.findall(r"serve s3: (\S+) => (\S+)", log)]
        wrong = [(a, b) for a, b in mapped if b != "/walship" + ("" if a == "/" else a)]
        assert mapped and not wrong, f"rclone did not take the bucket from the Host header: {(wrong or mapped)[:5]}"
        assert any(a.startswith("/vh/generations/") for a, _ in mapped), mapped[:5]
        assert ("/", "/walship") in mapped, f"no bucket LIST mapped from the Host header: {mapped[:5]}"

        # control: the same replica addressed path-style does not reach the bucket on this server
        p = run_walship("list", s3_url("walship", "vh", srv.endpoint, path_style=True), "--json", env=env, timeout=60)
        assert p.returncode != 0 and "NoSuchBucket" in p.stderr, \
            f"a path-style request reached the bucket on a virtual-host-only server ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    finally:
        proxy.close()
        srv.stop()


# ---------------------------------------------------------------- 3. GET resumed with Range

CUT_AT = 1 << 20


def test_get_resumes_with_range_after_a_cut(tmp_path):
    """The agent replicates straight to rclone; the restore goes through a proxy that breaks the
    connection once, after 1 MiB of the snapshot's body. walship must ask for the rest with
    `Range: bytes=1048576-` and produce an exact restore."""
    srv = S3Server(tmp_path / "s3", buckets=["walship"]).start()
    state = {"done": False}

    def cut_rule(rec, rhdrs):
        if state["done"] or rec["method"] != "GET" or "/snapshots/" not in rec["target"] or "range" in rec["headers"]:
            return None
        if int(rhdrs.get("content-length", "0") or 0) < 2 * CUT_AT:
            return None
        state["done"] = True
        return CUT_AT

    proxy = RelayProxy(srv.port, cut_rule=cut_rule)
    try:
        env = srv.env()
        direct = srv.url("walship", "cut")
        db = tmp_path / "app.db"
        run_writer("blobs", db, "--mb", 4)   # incompressible: the LZ4 snapshot stays ~4 MB
        run_agent(db, direct, env, tmp_path, ["mixed", db, "--seed", 13, "--tx", 30])
        snaps = [k for k in srv.objects("walship", "cut") if k.endswith(".snap.lz4")]
        assert len(snaps) == 1, snaps
        size = (srv.root / "walship" / snaps[0]).stat().st_size
        assert size > 2 * CUT_AT, f"snapshot of {size} bytes is too small to cut after {CUT_AT}"

        via = s3_url("walship", "cut", f"http://127.0.0.1:{proxy.port}", path_style=True)
        t0 = time.time()
        gen, txid, out = restore_exact(via, env, db, tmp_path / "restored.db", tables=ALL_TABLES)
        took = time.time() - t0

        reqs = list(proxy.requests)
        key_target = "/walship/" + snaps[0]
        snap_gets = [r for r in reqs if r["method"] == "GET" and r["target"] == key_target]
        cut = [r for r in snap_gets if r["cut"]]
        assert len(cut) == 1, f"the proxy did not cut the snapshot GET once: {[(r['target'], r['cut']) for r in reqs]}"
        assert cut[0]["body_bytes"] == CUT_AT and cut[0]["status"] == 200, cut[0]
        after = snap_gets[snap_gets.index(cut[0]) + 1:]
        assert after, f"no GET of {key_target} after the cut: walship did not retry\n{out}"
        rng = after[0]["headers"].get("range")
        assert rng is not None, f"the retried GET carried no Range header (downloaded again from 0?): {after[0]['headers']}"
        m = re.fullmatch(r"bytes=(\d+)-", rng)
        assert m and int(m.group(1)) > 0, f"Range header {rng!r} does not resume at a non-zero offset"
        assert int(m.group(1)) == CUT_AT, f"resumed at byte {m.group(1)}, but {CUT_AT} bytes had been delivered"
        # rclone answers a range request with 200 (AWS: 206) but with Content-Range and only the
        # requested bytes; what matters is that the rest of the object came, from the cut on
        resumed = after[0]
        assert resumed["status"] in (200, 206), resumed
        assert resumed["response_headers"].get("content-range") == f"bytes {CUT_AT}-{size - 1}/{size}", \
            f"the resumed GET was not answered from byte {CUT_AT}: {resumed['response_headers']}"
        assert resumed["body_bytes"] == size - CUT_AT, (resumed["body_bytes"], size - CUT_AT)
        assert len(after) == 1, f"{len(after)} GETs after the cut, expected one: {[r['headers'].get('range') for r in after]}"
        print(f"restore through the cutting proxy: {took:.1f}s, {len(reqs)} requests, resumed with {rng}")
    finally:
        proxy.close()
        srv.stop()


# ---------------------------------------------------------------- 4. batch deletes

def test_compaction_and_retention_delete_in_batches(tmp_path):
    """Level-1 compaction (2 s windows) and retention (snapshots every 2 s kept 4 s) on an S3
    replica: the objects they replace go in DeleteObjects requests (POST ?delete, Content-MD5,
    many keys each), not one DELETE per key; afterwards the stored chain is whole and the
    latest restore exact."""
    srv = S3Server(tmp_path / "s3", buckets=["walship"]).start()
    proxy = RelayProxy(srv.port)
    try:
        env = srv.env()
        url = s3_url("walship", "batch", f"http://127.0.0.1:{proxy.port}", path_style=True)
        db = tmp_path / "app.db"
        create_ticket_db(db, rows=10)
        agent = AgentProcess(db, [url], ["--sync-interval", "100ms", "--compaction", "2s,1h", "--snapshot-interval", "2s",
                                         "--retention", "4s"], log_path=tmp_path / "agent.log", env=env).start()
        try:
            agent.wait_ready()
            t_end = time.time() + 9
            while time.time() < t_end:
                run_writer("mixed", db, "--seed", int(time.time() * 1000) % 10000, "--tx", 40)
            time.sleep(1.5)
            agent.stop()
        finally:
            if agent.proc.poll() is None:
                agent.kill9()
        reqs, conns = list(proxy.requests), proxy.connections
        # Connections are reused: the agent's requests (a PUT every 200 ms, LISTs, deletes) share a few.
        assert len(reqs) >= 40 and conns <= max(4, len(reqs) // 10), (len(reqs), conns)
        batch = [r for r in reqs if r["method"] == "POST" and r["target"].startswith("/walship/?delete")]
        singles = [r for r in reqs if r["method"] == "DELETE"]
        assert batch, f"no DeleteObjects request: {sorted({(r['method'], r['target'].split('?')[0][:40]) for r in reqs})[:20]}"
        assert all(r["status"] == 200 for r in batch), [(r["status"], r["target"]) for r in batch]
        assert all("content-md5" in r["headers"] for r in batch), [r["headers"] for r in batch][:2]
        assert not singles, f"{len(singles)} single DELETEs beside {len(batch)} batches"
        gens = list_json(url, env)
        assert len(gens) == 1, [g["generation"] for g in gens]
        levels = {s["level"] for s in gens[0]["segments"]}
        assert "1" in levels, gens[0]["segments"]
        assert len(gens[0]["snapshots"]) < 6, "retention kept every snapshot"
        stored = srv.objects("walship", "batch")
        assert not chain_problems(gens), chain_problems(gens)
        covered = [s for s in gens[0]["segments"] if s["level"] == "0" and any(
            c["level"] == "1" and int(c["first_txid"]) <= int(s["first_txid"]) <= int(c["last_txid"]) for c in gens[0]["segments"])]
        assert not covered, f"level-0 segments left beside the level-1 segment that replaced them: {covered[:3]}"
        assert any(k.endswith(".seg.lz4") for k in stored)
        restore_exact(url, env, db, tmp_path / "restored.db")
    finally:
        proxy.close()
        srv.stop()
