#!/usr/bin/env python3
"""Writes the fuzzer's seed inputs into Tests/fuzz/corpus: one per parser, each a real
example (objects from a replica the agent writes here, a WAL, an S3 listing, the config
file, times), prefixed by the byte that selects the parser (FuzzTargets.swift).

    python3 Tests/fuzz/make_seeds.py [--walship .build/release/walship]
"""
import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
META = 136


def seed(out, selector, name, data):
    (out / f"{selector}-{name}").write_bytes(bytes([selector]) + data)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--walship", default=str(ROOT / ".build" / "release" / "walship"))
    a = ap.parse_args()
    out = HERE / "corpus"
    out.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        key = d / "key"
        key.write_bytes(os.urandom(32))
        for enc in (False, True):
            db, rep = d / f"app{enc}.db", d / f"rep{enc}"
            con = sqlite3.connect(str(db), isolation_level=None)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA page_size=512")
            con.execute("CREATE TABLE t(a, b)")
            agent = subprocess.Popen([a.walship, "replicate", str(db), f"file://{rep}", "--sync-interval", "100ms"]
                                     + (["--encryption-key-file", str(key)] if enc else []),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
            for i in range(3):
                con.execute("INSERT INTO t VALUES (?, randomblob(300))", (i,))
                time.sleep(0.3)
            if not enc:
                seed(out, 7, "wal", (Path(str(db) + "-wal")).read_bytes()[:32 + 3 * 536])
            agent.terminate()
            agent.wait(timeout=60)
            con.close()
            snap = sorted(rep.glob("generations/*/snapshots/*.snap.lz4"))[0]
            seg = sorted(rep.glob("generations/*/segments/0/*.seg.lz4"))[0]
            if enc:
                seed(out, 2, "sealed-segment", seg.read_bytes()[:4096])
                seed(out, 0, "metadata-sealed", seg.read_bytes()[:META])
            else:
                seed(out, 0, "metadata-snapshot", snap.read_bytes()[:META])
                seed(out, 0, "metadata-segment", seg.read_bytes()[:META])
                plain = subprocess.run(["lz4", "-dc", str(seg)], capture_output=True, check=True).stdout
                seed(out, 1, "segment", plain[:8192])
                seed(out, 3, "name-segment", str(seg.relative_to(rep)).encode())
                seed(out, 3, "name-snapshot", str(snap.relative_to(rep)).encode())
    seed(out, 3, "name-generation", b"generations/000661a51aeb8d36e47b/generation.json")
    seed(out, 4, "list", b'<?xml version="1.0" encoding="UTF-8"?><ListBucketResult><Name>b</Name><Prefix>p/</Prefix>'
                         b'<IsTruncated>true</IsTruncated><NextContinuationToken>tok&amp;1</NextContinuationToken>'
                         b'<Contents><Key>p/generations/x/a&#x41;.seg.lz4</Key><Size>10</Size></Contents></ListBucketResult>')
    seed(out, 4, "error", b"<Error><Code>SlowDown</Code><Message>Please &lt;reduce&gt; &#65;</Message></Error>")
    seed(out, 5, "config", (ROOT / "deploy" / "walship.yml").read_bytes() if (ROOT / "deploy" / "walship.yml").exists()
         else b"dbs:\n  - path: /var/lib/app.db\n    replicas:\n      - url: file:///backup\n    sync-interval: 1s\n")
    seed(out, 6, "timestamp", b"2026-11-29T05:15:25.260123Z")
    seed(out, 6, "duration", b"1h30m")
    seed(out, 6, "levels", b"5m,1h")
    print(f"seeds in {out}: {len(list(out.iterdir()))}")


if __name__ == "__main__":
    sys.exit(main())
