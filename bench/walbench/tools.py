"""The two tools under test: how to start, stop and restore with walship and with Litestream."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

from .common import parse_duration
from .s3 import S3_ACCESS_KEY, S3_BUCKET, S3_REGION, S3_SECRET_KEY


def find_litestream(explicit):
    cands = [explicit] if explicit else []
    w = shutil.which("litestream")
    if w:
        cands.append(w)
    try:
        cands.append(subprocess.run(["pyenv", "which", "litestream"], capture_output=True,
                                    text=True, timeout=20).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    for c in cands:
        if c and os.path.isfile(c):
            with open(c, "rb") as f:
                if f.read(4) == b"\x7fELF":  # the real binary, not a pyenv shim
                    return os.path.realpath(c)
    if w:
        return w
    sys.exit("litestream not found (pass --litestream PATH)")


class Walship:
    name = "walship"
    ready_marker = "] replicating"
    snapshot_marker = "] replicating"  # logged after the initial snapshot is written

    def __init__(self, binary):
        self.bin = binary

    def version(self):
        r = subprocess.run([self.bin, "--version"], capture_output=True, text=True)
        return (r.stdout + r.stderr).strip()

    def start(self, db, rep, interval, logpath):
        logf = open(logpath, "ab")
        p = subprocess.Popen([self.bin, "replicate", db, rep.url(), "--sync-interval", interval],
                             stdout=logf, stderr=subprocess.STDOUT, start_new_session=True, env=rep.env())
        logf.close()
        return p

    def restore_cmd(self, rep, out, integrity=None, timestamp=None):
        cmd = [self.bin, "restore", rep.url(), "-o", out]
        if integrity:
            cmd += ["--integrity", integrity]
        if timestamp:
            cmd += ["--timestamp", timestamp]
        return cmd

    def snapshot_cmd(self, db):
        """Asks the agent replicating db (default spool dir) to take a base snapshot now."""
        return [self.bin, "snapshot", db]

    def graceful_stop(self, p, interval_s):
        p.send_signal(signal.SIGTERM)  # walship ships everything committed, then exits 0
        return p.wait(timeout=300)


class Litestream:
    name = "litestream"
    ready_marker = "replicating to"
    snapshot_marker = "snapshot complete"

    def __init__(self, binary):
        self.bin = binary

    def version(self):
        r = subprocess.run([self.bin, "version"], capture_output=True, text=True)
        return (r.stdout + r.stderr).strip()

    def start(self, db, rep, interval, logpath):
        cfg = self.write_config(db, rep, interval, os.path.join(os.path.dirname(db), "litestream.yml"))
        logf = open(logpath, "ab")
        p = subprocess.Popen([self.bin, "replicate", "-config", cfg], stdout=logf,
                             stderr=subprocess.STDOUT, start_new_session=True, env=rep.env())
        logf.close()
        return p

    def write_config(self, db, rep, interval, cfg):
        """Writes the config for db -> rep to cfg and notes it on rep (restore from S3 goes through it)."""
        # The replica's sync-interval is the interval under test; the database's monitor-interval (how
        # often the WAL is read into local LTX files) is its 1s default, or the interval when shorter.
        monitor = interval if parse_duration(interval) < 1.0 else "1s"
        if rep.kind == "s3":  # 0.5.17 S3 replica keys (checked against the binary's yaml tags)
            replica = ("      type: s3\n"
                       f"      bucket: {S3_BUCKET}\n"
                       f"      path: {json.dumps(rep.prefix)}\n"
                       f"      endpoint: {json.dumps(rep.endpoint)}\n"
                       f"      region: {S3_REGION}\n"
                       f"      access-key-id: {json.dumps(S3_ACCESS_KEY)}\n"
                       f"      secret-access-key: {json.dumps(S3_SECRET_KEY)}\n"
                       "      force-path-style: true\n")
        else:
            replica = ("      type: file\n"
                       f"      path: {json.dumps(rep.path)}\n")
        with open(cfg, "w") as f:  # JSON strings are valid YAML scalars
            f.write("dbs:\n"
                    f"  - path: {json.dumps(db)}\n"
                    f"    monitor-interval: {monitor}\n"
                    "    replica:\n" + replica +
                    f"      sync-interval: {interval}\n")
        rep.ls_config, rep.ls_db = cfg, db  # restore from S3 goes through this config
        return cfg

    def restore_cmd(self, rep, out, integrity=None, timestamp=None):
        cmd = [self.bin, "restore", "-o", out]
        if integrity:
            cmd += ["-integrity-check", integrity]
        if timestamp:
            cmd += ["-timestamp", timestamp]
        if rep.kind == "s3":  # the database path named in the config selects its replica
            return cmd + ["-config", rep.ls_config, rep.ls_db]
        return cmd + [rep.url()]

    def graceful_stop(self, p, interval_s):
        time.sleep(max(3 * interval_s, 1.0))  # let a few sync intervals pass, then SIGTERM
        p.send_signal(signal.SIGTERM)
        return p.wait(timeout=300)

