#!/usr/bin/env python3
"""Randomized, seed-reproducible torture harness for walship's capture path.

One run (one seed) builds a plan from random.Random(seed): database settings (page size,
auto_vacuum, autocheckpoint), agent settings (checkpoint frames, snapshot interval,
compaction), a sequence of application steps and operator events, and idle times. It then

  * starts the application process (app.py: Python sqlite3, WAL mode, two connections), and
    in some runs a second one on the same database, and feeds them the steps one by one; after every COMMIT the application appends
    [before, after, digest of the whole database] to an oracle file; steps include spills
    rolled back, savepoints, VACUUM, checkpoints in all four modes, DDL, a reader holding a
    snapshot, and switches out of WAL mode and back (which succeed only while no agent runs);
  * runs `walship replicate DB file://REPLICA --sync-interval 100ms` with a private spool (in
    some runs naming the database through a symlink), and between steps SIGKILLs and
    restarts it (also during start-up), SIGSTOPs it for a moment, stops it with SIGTERM (it
    must exit 0) and restarts it, sometimes with its wall clock stepped back or forward
    (a preload shim, built with `cc` when there is one), makes the replica unreachable for a
    while, and asks for snapshots. Some runs add an S3 replica (`rclone serve s3` on loopback)
    whose server an outage stops or freezes (SIGSTOP); in some the operator puts an earlier
    state back: the application stops, the -wal and -shm are moved away, a file restored at
    an earlier txid is renamed over the database (while the agent runs or not), and the
    application starts again (the oracle records that state as a commit of its own);
  * at the end stops the application, lets the agent sync, stops it with SIGTERM, and checks:
      chain     every generation chains from its snapshot with no gap (`walship list --json`),
                on every replica
      latest    the latest restore of every replica has the digest of the last commit, and
                equals the source database byte for byte once that is checkpointed
      pitr      `restore --timestamp T` at up to 10 instants, each the midpoint of a quiet gap
                between two commits (so exactly one state is right; none in a run where an
                agent had a stepped clock, whose stamps are off by the step), inside the restorable
                windows `walship list` reports and while an agent was running and not
                stopped from before T until well after T (walship stamps a commit with the
                time it sees it, so a commit made while no agent watches is dated later)
      (pitr instants alternate between the replicas in runs with two)
      verify    `walship verify URL` exits 0 for every replica
      replace   the restore that is put back gives a state the application committed, and
                a running agent starts over on the new file
      sigterm   the agent exits 0 on every SIGTERM
      self-check the agent never reports that the WAL as it read it differs from what SQLite
                committed, nor that the database file after a complete checkpoint differs
                from the replicated chain (it then starts a new generation: capture went wrong)
      continuity a running agent never loses track of the WAL ("WAL continuity lost": its pin
                keeps SQLite from restarting the WAL past frames it has not read)
      agent-log no other error in the agent logs (upload errors during an outage are expected)
      writer    no application step failed (busy_timeout is 5000 ms)
      app-checkpoint a RESTART or TRUNCATE checkpoint of the application, run while one agent
                was running and not stopped from start to end, never waits out the busy
                timeout (the agent makes way for it)

Only the data and the order of steps come from the seed; how the steps interleave with the
agent's threads is up to the machine, so a failing seed usually, not always, fails again.

    python3 Tests/integration/torture/torture.py --seed 7
    python3 Tests/integration/torture/torture.py --seeds 1..20 --steps 80
    python3 Tests/integration/torture/torture.py --duration 2h
    python3 Tests/integration/torture/torture.py --seed 7 --dry-run      # print the plan only

Exit status: 0 when every seed passed, 1 when one failed (after `TORTURE FAILURE seed=N` and
a reproduction command), 2 on usage errors.
"""
import argparse
import atexit
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
INTEGRATION = HERE.parent
ROOT = INTEGRATION.parents[1]
sys.path.insert(0, str(INTEGRATION))
sys.path.insert(0, str(HERE))

import conftest  # noqa: E402  (AgentProcess, run_walship, checkpoint_truncate, file_bytes_equal)
from conftest import AgentProcess, checkpoint_truncate, file_bytes_equal, run_walship  # noqa: E402
from workload import chain_problems, list_generations, rfc3339  # noqa: E402
from app import file_digest  # noqa: E402
from s3server import S3Server  # noqa: E402

DEFAULT_STEPS = 110
SYNC_INTERVAL = "100ms"
PAGE_SIZES = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536]
# A commit is seen by a running agent within READ_MARGIN (inotify, read delay <= 10 ms) and is
# in a segment saved in the spool within SHIP_MARGIN (cut every 100 ms).
READ_MARGIN = 0.3
SHIP_MARGIN = 1.0
PITR_INSTANTS = 10
# Error lines an operator event explains: uploads fail while the replica is unreachable.
EXPECTED_DURING_OUTAGE = ("upload failed; retrying with backoff",
                          "replica did not acknowledge everything before shutdown",
                          "could not check that the replica still holds the current generation",
                          "retention or compaction failed; retrying later")

OP_WEIGHTS = {
    "insert": 10, "update": 8, "delete": 4, "multi": 6, "small": 6,
    "spill_rollback": 2.5, "spill_commit": 1, "savepoint": 3, "rollback": 1.5,
    "vacuum": 0.7, "incremental_vacuum": 1, "checkpoint": 2.5, "user_version": 1, "ddl": 1.5,
    "reader_hold": 1, "reader_release": 1,
}
EVENT_WEIGHTS = {"kill": 3, "kill_startup": 1, "stop": 2, "term": 2, "outage": 1, "snapshot": 1}


def now_us():
    return time.time_ns() // 1000


def us_to_s(us):
    return us / 1_000_000


def parse_rfc3339(text):
    """'2026-12-02T03:02:02.159000Z' -> Unix seconds (UTC, locale-free)."""
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?Z", text)
    if not m:
        raise ValueError(f"not an RFC 3339 UTC time: {text!r}")
    y, mo, d, h, mi, s, frac = m.groups()
    dt = datetime(int(y), int(mo), int(d), int(h), int(mi), int(s), tzinfo=timezone.utc)
    return dt.timestamp() + (int(frac) / 10 ** len(frac) if frac else 0.0)


def parse_duration(text):
    """'2h', '10m', '90s', '1h30m' -> seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)([hms])", text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise argparse.ArgumentTypeError(f"bad duration {text!r} (examples: 90s, 10m, 2h, 1h30m)")
    return sum(float(n) * {"h": 3600, "m": 60, "s": 1}[u] for n, u in parts)


def parse_seed_range(text):
    m = re.fullmatch(r"(\d+)\.\.(\d+)?", text)
    if not m:
        raise argparse.ArgumentTypeError(f"bad seed range {text!r} (example: 1..50, or 100.. with --duration)")
    return int(m.group(1)), (int(m.group(2)) if m.group(2) else None)


def error_text(p):
    """What a failed walship command said, from its first error line on."""
    text = (p.stderr or "") + (p.stdout or "")
    at = text.find("error")
    return text[at:] if at >= 0 else text.strip()[-600:]


# ----------------------------------------------------------------------------------------
# the plan: everything random, decided up front from the seed

def weighted(rng, weights):
    keys = sorted(weights)
    return rng.choices(keys, weights=[weights[k] for k in keys])[0]


def idle(rng):
    r = rng.random()
    if r < 0.66:
        return round(rng.uniform(0, 0.03), 4)
    if r < 0.85:
        return round(rng.uniform(0.03, 0.3), 4)
    return round(rng.uniform(0.7, 1.3), 4)     # quiet gaps: the PITR instants go there


def spill_bytes(rng, page_size, lo, hi):
    # the page cache is 10 pages during these transactions: write well past it
    return max(rng.randint(lo, hi), 25 * page_size)


def make_plan(seed, steps):
    rng = random.Random(seed)
    cfg = {
        "page_size": rng.choice(PAGE_SIZES),
        "auto_vacuum": rng.choice(["NONE", "NONE", "FULL", "INCREMENTAL"]),
        "autocheckpoint": rng.choice([0, 100, 1000]),
        "synchronous": rng.choice(["NORMAL", "FULL"]),
        "budget": rng.choice([2, 3, 4]) * 1_000_000,
        "checkpoint_frames": rng.choice([20, 50, 100, 300, 1000]),
        "snapshot_interval": rng.choice(["24h", "24h", "4s", "9s"]),
        "compaction": rng.choice([None, None, "1s,1h"]),
        "warmup": rng.randint(0, 8),                   # steps before the agent first starts
        "end_with_spill": rng.random() < 0.5,          # last steps: spill, ROLLBACK, small commit
        "final_idle": round(rng.uniform(1.0, 2.0), 3),
    }
    ps = cfg["page_size"]
    weights = {k: v * rng.uniform(0.25, 2.0) for k, v in OP_WEIGHTS.items()}
    if cfg["auto_vacuum"] != "INCREMENTAL":
        weights.pop("incremental_vacuum")
    event_weights = {k: v * rng.uniform(0.3, 2.0) for k, v in EVENT_WEIGHTS.items()}
    p_event = rng.uniform(0.03, 0.08)
    cfg["op_weights"] = {k: round(v, 3) for k, v in sorted(weights.items())}
    cfg["p_event"] = round(p_event, 4)

    plan = []
    scheduled = {}          # op index -> events to run before it
    agent_busy_until = 0    # no new agent event before this op index
    outage_until = -1
    slow_checkpoints = 0    # RESTART/TRUNCATE wait out the busy timeout on a stopped agent's pin: few
    n_ops = steps - (2 if cfg["end_with_spill"] else 0)
    force_next = None
    for j in range(n_ops):
        plan += scheduled.pop(j, [])
        if j == cfg["warmup"]:
            plan.append({"event": "start"})
            agent_busy_until = j + 1
        elif j > cfg["warmup"] and rng.random() < p_event:
            ev = weighted(rng, event_weights)
            if j <= outage_until:
                # `walship replicate` refuses to start on a replica path that is not a
                # directory, so no restart (and no snapshot request) while the replica is away
                ev = "stop"
            if j < agent_busy_until:
                pass
            elif ev == "kill":
                down = rng.randint(0, 4)    # steps run with no agent after this one
                plan.append({"event": "kill"})
                scheduled.setdefault(j + 1 + down, []).append({"event": "start"})
                agent_busy_until = j + down + 2
            elif ev == "kill_startup":
                plan.append({"event": "kill"})
                plan.append({"event": "start", "kill_after": round(rng.uniform(0.0, 0.4), 3)})
                agent_busy_until = j + 1
            elif ev == "term":
                down = rng.randint(0, 3)
                plan.append({"event": "term"})
                scheduled.setdefault(j + 1 + down, []).append({"event": "start"})
                agent_busy_until = j + down + 2
            elif ev == "stop":
                plan.append({"event": "stop", "seconds": round(rng.uniform(0.2, 2.5), 3)})
                agent_busy_until = j + 1
            elif ev == "outage":
                n = rng.randint(1, 6)
                plan.append({"event": "outage"})
                scheduled.setdefault(j + n, []).append({"event": "outage_end"})
                outage_until = j + n
            elif ev == "snapshot":
                plan.append({"event": "snapshot"})
        step = force_next or {"op": weighted(rng, weights)}
        force_next = None
        op = step["op"]
        step["seed"] = rng.getrandbits(32)
        step["conn"] = "b" if rng.random() < 0.3 else "a"
        step["idle"] = idle(rng)
        if op in ("insert", "update", "delete", "multi"):
            step["rows"] = rng.choice([1, 1, 2, 3, 5, 10, 40])
            if op == "insert":
                step["big"] = rng.random() < 0.25
        elif op == "spill_rollback":
            step["bytes"] = spill_bytes(rng, ps, 60_000, 1_500_000)
            step["touch"] = rng.choice([0, 0, 2, 5])
            # with a pause the agent reads the spilled frames before the ROLLBACK
            step["pause"] = 0 if rng.random() < 0.25 else round(rng.uniform(0.15, 0.5), 3)
            if rng.random() < 0.7:   # the pattern: spill, ROLLBACK, one small commit, quiet
                force_next = {"op": "small", "after_spill": True}
        elif op == "spill_commit":
            step["bytes"] = spill_bytes(rng, ps, 60_000, 900_000)
        elif op == "savepoint":
            if rng.random() < 0.4:
                step["spill_bytes"] = spill_bytes(rng, ps, 40_000, 600_000)
                step["pause"] = round(rng.uniform(0, 0.4), 3)
        elif op == "checkpoint":
            mode = rng.choice(["PASSIVE", "PASSIVE", "FULL", "FULL", "RESTART", "TRUNCATE"])
            if mode in ("RESTART", "TRUNCATE"):
                slow_checkpoints += 1
                if slow_checkpoints > 4:
                    mode = "PASSIVE"
            step["mode"] = mode
        if step.get("after_spill"):
            step["idle"] = round(rng.uniform(0.8, 1.5), 4)
        step["i"] = j
        plan.append(step)
    j = n_ops
    if cfg["end_with_spill"]:
        plan.append({"op": "spill_rollback", "bytes": spill_bytes(rng, ps, 100_000, 1_200_000), "touch": 0,
                     "pause": round(rng.uniform(0.2, 0.5), 3), "seed": rng.getrandbits(32), "conn": "a",
                     "idle": 0.0, "i": j})
        plan.append({"op": "small", "after_spill": True, "seed": rng.getrandbits(32), "conn": "a",
                     "idle": 0.0, "i": j + 1})
    for k in sorted(scheduled):
        plan += scheduled[k]
    if cfg["warmup"] >= n_ops:
        plan.append({"event": "start"})
    # What follows draws from its own generator: the rest of the plan is the one each seed
    # always had.
    extra = random.Random(seed * 104729 + 7)
    # Half the RESTART/TRUNCATE checkpoints follow the step before at once, while the agent's
    # pin still stands behind that step's commit: the checkpoint then waits for the pin's
    # read-mark slot, and the agent has to make way.
    for k in range(1, len(plan)):
        if plan[k].get("op") == "checkpoint" and plan[k]["mode"] in ("RESTART", "TRUNCATE") \
                and "op" in plan[k - 1] and extra.random() < 0.5:
            plan[k - 1]["idle"] = 0.0
    # The agent is given the database through a symlink.
    cfg["symlink"] = extra.random() < 0.3
    # Some small commits become a switch out of WAL mode and back (it succeeds only while no
    # agent runs: then the agent finds a database changed behind a deleted WAL).
    for st in plan:
        if st.get("op") == "small" and not st.get("after_spill") and extra.random() < 0.08:
            st["op"] = "journal_switch"
    down = False    # between a kill and the next start: there the switch succeeds
    for st in plan:
        if st.get("event") == "kill":
            down = True
        elif st.get("event") == "start":
            down = False
        elif down and st.get("op") in ("small", "insert", "update", "delete", "multi") \
                and not st.get("after_spill") and extra.random() < 0.4:
            st["op"] = "journal_switch"
            down = False
    # Some restarts of the agent see the wall clock stepped (NTP, a restored VM): commit
    # times are then off by the step, new generations must still sort last.
    # One in seven runs, once (such runs skip the PITR check).
    starts = [ev for ev in plan if ev.get("event") == "start"]
    if len(starts) > 1 and extra.random() < 0.15:
        extra.choice(starts[1:])["clock_shift_us"] = extra.choice([-600, -30, 30, 600]) * 1_000_000
    add_processes_replicas_and_replacement(seed, cfg, plan)
    return cfg, plan


def add_processes_replicas_and_replacement(seed, cfg, plan):
    """The later additions to a plan, from a generator of their own (so what came before stays
    the plan each seed always had)."""
    more = random.Random(seed * 15485863 + 11)
    # A second application process writes the same database in some runs: a third of the
    # steps go to it. Readers held across steps, checkpoints (which release that reader
    # first, as an application would before a RESTART or TRUNCATE of its own) and
    # journal-mode switches stay in the first (with a second process open, a switch out of
    # WAL mode fails, as it should).
    cfg["second_app"] = more.random() < 0.4
    if cfg["second_app"]:
        for st in plan:
            if "op" in st and st["op"] not in ("reader_hold", "reader_release", "journal_switch", "checkpoint") \
                    and more.random() < 0.35:
                st["proc"] = 2
    # An S3 replica (rclone on loopback) beside the directory one in some runs; an outage then
    # takes away either or both, the S3 server stopped (connections refused) or frozen
    # (requests hang).
    cfg["s3"] = more.random() < 0.35
    if cfg["s3"]:
        for st in plan:
            if st.get("event") == "outage":
                st["target"] = more.choice(["file", "s3", "s3", "both"])
                st["how"] = more.choice(["down", "freeze"])
    # Once in some runs the operator puts an earlier state back in place: the application
    # stops, the database's -wal and -shm are moved away, a restored file is renamed over
    # the database, the application starts again. The agent may be running or not.
    if more.random() < 0.3:
        candidates, started, out, since_start = [], False, False, 0
        for k, st in enumerate(plan):
            ev = st.get("event")
            if ev == "start":
                started = True
            elif ev == "outage":
                out = True
            elif ev == "outage_end":
                out = False
            elif "op" in st and started:
                since_start += 1
                if not out and since_start > 3:
                    candidates.append(k)
        if candidates:
            plan.insert(more.choice(candidates), {"event": "replace", "pick": round(more.random(), 4)})


# ----------------------------------------------------------------------------------------
# one run

_CLOCK_SHIM = []


def clock_shim():
    """The preload library that steps a process's wall clock (WALSHIP_CLOCK_SHIFT_US), built
    once per harness process; None without a C compiler."""
    if not _CLOCK_SHIM:
        cc = shutil.which("cc") or shutil.which("gcc")
        if not cc:
            print("torture: no C compiler (cc): the wall clock is never stepped", file=sys.stderr)
            _CLOCK_SHIM.append(None)
            return None
        d = tempfile.mkdtemp(prefix="walship-torture-shim-")
        atexit.register(shutil.rmtree, d, True)
        out = Path(d) / "clockshift.so"
        p = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(INTEGRATION / "shims" / "clockshift.c"), "-ldl"],
                           capture_output=True, text=True)
        if p.returncode != 0:
            print(f"torture: the clock shim did not build, the wall clock is never stepped: {p.stderr.strip()[-500:]}",
                  file=sys.stderr)
        _CLOCK_SHIM.append(str(out) if p.returncode == 0 else None)
    return _CLOCK_SHIM[0]


class WalHoleWatch:
    """Watches the application's own WAL, independently of walship: every 20 ms, when the
    wal-index (-shm) describes the log the WAL header starts, every frame up to its last
    commit (mxFrame) must carry that log's salts. A frame that does not is a hole SQLite
    itself could not recover past (its recovery follows the checksum chain from frame 1).
    Such a WAL is the environment's fault, not the agent's (SQLite 3.40.1 writes it after a
    savepoint rollback in a transaction that rewrote a spilled frame: savepoint_hole.py); the
    agent is then only required to say so (its self-check) when it affected what the agent
    read, never to be silently wrong."""

    def __init__(self, db):
        self.db, self.hole, self.stop_flag = str(db), None, False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _look(self):
        try:
            with open(self.db + "-shm", "rb") as f:
                shm = f.read(136)
            fd = os.open(self.db + "-wal", os.O_RDONLY)
        except OSError:
            return
        try:
            if len(shm) < 136 or shm[0:48] != shm[48:96] or shm[12] == 0:
                return
            hdr = os.pread(fd, 32, 0)
            if len(hdr) < 32 or hdr[16:24] != shm[32:40]:
                return
            ps = struct.unpack(">I", hdr[8:12])[0]
            mx = struct.unpack("<I", shm[16:20])[0]
            for i in range(mx):
                fh = os.pread(fd, 16, 32 + i * (ps + 24))
                if len(fh) < 16:
                    return
                if fh[8:16] != hdr[16:24]:
                    # read the index again: only a hole if it still counts this frame
                    with open(self.db + "-shm", "rb") as f:
                        again = f.read(136)
                    if again[32:40] == shm[32:40] and struct.unpack("<I", again[16:20])[0] >= i + 1:
                        self.hole = {"t": now_us(), "frame": i + 1, "mxFrame": mx}
                    return
        finally:
            os.close(fd)

    def _run(self):
        while not self.stop_flag and self.hole is None:
            self._look()
            time.sleep(0.02)

    def stop(self):
        self.stop_flag = True
        self.thread.join()
        return self.hole


class Failure(Exception):
    """Ends a run early: the check it fails and why."""

    def __init__(self, check, msg):
        super().__init__(msg)
        self.check = check


class Run:
    def __init__(self, seed, steps, workdir):
        self.seed, self.steps = seed, steps
        self.work = Path(workdir)
        self.db = self.work / "app.db"
        self.replica = self.work / "replica"
        self.url = f"file://{self.replica}"
        self.spool = self.work / "spool"
        self.oracle = self.work / "oracle.jsonl"
        self.link = self.work / "link.db"     # the agent's name for the database, some runs
        self.ever_shifted = False             # an agent of this run saw a stepped clock
        self.failures = []          # (check, message)
        self.live = []              # [start, end] spans of a running, not stopped, agent
        self.live_start = None
        self.lock = threading.Lock()
        self.agent = None
        self.agent_runs = 0
        self.cont_timer = None
        self.outage = False
        self.had_outage = False
        self.writer = None        # the first application process
        self.apps = {}            # 1, and 2 in runs with a second one: (process, log file)
        self.n_commits = 0        # commits so far, across application processes
        self.s3 = None            # the S3 server, in runs with an S3 replica
        self.s3_url = None
        self.out = []             # what an outage took away: ("file"|"s3", "down"|"freeze")
        self.replaced_at = []     # when the database file was replaced
        self.counts = {}
        self.app_checkpoints = []   # (step, start, end)

    def mark(self, kind, **kw):
        """Appends to timeline.jsonl: what the harness did when (µs since the epoch)."""
        with self.lock:     # the SIGCONT timer writes here too
            self.timeline.write(json.dumps({"t": time.time_ns() // 1000, "kind": kind, **kw}) + "\n")
            self.timeline.flush()

    def fail(self, check, msg):
        msg = " | ".join(l.strip() for l in str(msg).splitlines() if l.strip())
        self.failures.append((check, msg if len(msg) <= 700 else msg[:700] + " ..."))

    # -- agent ---------------------------------------------------------------------------

    def agent_args(self):
        c = self.cfg
        args = ["--sync-interval", SYNC_INTERVAL, "--checkpoint-frames", c["checkpoint_frames"],
                "--snapshot-interval", c["snapshot_interval"], "--spool-dir", self.spool]
        if c["compaction"]:
            args += ["--compaction", c["compaction"], "--fine-window", "1h"]
        return args

    def agent_db(self):
        if self.cfg.get("symlink"):
            if not self.link.is_symlink():
                self.link.symlink_to(self.db.name)
            return self.link
        return self.db

    def urls(self):
        return [self.url] + ([self.s3_url] if self.s3_url else [])

    def env(self):
        """The environment of walship commands: the S3 server's credentials in runs with one."""
        return self.s3.env() if self.s3 else None

    def _new_agent(self, shift_us=0):
        env = self.env()
        if shift_us:
            env = dict(env or os.environ, LD_PRELOAD=clock_shim(), WALSHIP_CLOCK_SHIFT_US=str(shift_us))
        ag = AgentProcess(self.agent_db(), self.urls(), args=self.agent_args(),
                          log_path=self.work / f"agent-{self.agent_runs:02d}.log", env=env)
        self.agent_runs += 1
        return ag.start()

    def open_live(self):
        with self.lock:
            if self.live_start is None:
                self.live_start = time.time()

    def close_live(self):
        with self.lock:
            if self.live_start is not None:
                self.live.append((self.live_start, time.time()))
                self.live_start = None

    def start_agent(self, kill_after=None, shift_us=0):
        if shift_us and not clock_shim():
            shift_us = 0    # no C compiler here: the clock is not stepped
        if shift_us:
            self.ever_shifted = True
            self.count("clock_step")
        if kill_after is not None:
            ag = self._new_agent(shift_us)
            time.sleep(kill_after)
            ag.kill9()
            self.count("kill_during_startup")
        self.agent = self._new_agent(shift_us)
        try:
            self.agent.wait_ready(timeout=60)
        except AssertionError as e:
            raise Failure("agent-start", f"agent did not start: {str(e)[-2000:]}")
        self.open_live()

    def settle(self):
        """Waits for a pending SIGCONT."""
        if self.cont_timer:
            self.cont_timer.join()
            self.cont_timer = None

    def kill_agent(self):
        self.settle()
        self.close_live()
        self.agent.kill9()
        self.agent = None
        self.count("kill")

    def term_agent(self, final=False):
        self.settle()
        t0 = time.time()
        self.close_live()
        try:
            self.agent.stop(timeout=60)
        except AssertionError as e:
            self.fail("sigterm", str(e).splitlines()[0])
        except subprocess.TimeoutExpired:
            self.fail("sigterm", "agent still running 60 s after SIGTERM")
            self.agent.kill9()
        self.agent = None
        if not final:
            self.count("term")
        return time.time() - t0

    def stop_agent(self, seconds):
        self.settle()
        proc = self.agent.proc
        self.close_live()
        os.kill(proc.pid, signal.SIGSTOP)

        def cont():
            os.kill(proc.pid, signal.SIGCONT)
            self.open_live()
            self.mark("SIGCONT")
        self.cont_timer = threading.Timer(seconds, cont)
        self.cont_timer.start()
        self.count("stop")

    def outage_start(self, ev):
        target, how = ev.get("target", "file"), ev.get("how", "down")
        self.outage = self.had_outage = True    # first: cleanup puts back whatever was taken
        if target in ("file", "both"):
            conftest.unreachable(self.replica, self.work / "replica.away")
            self.out.append(("file", "down"))
        if target in ("s3", "both"):
            if how == "freeze":
                os.kill(self.s3.proc.pid, signal.SIGSTOP)
            else:
                self.s3.stop()
            self.out.append(("s3", how))
            self.count(f"s3_{how}")
        self.outage = self.had_outage = True
        self.count("outage")

    def outage_end(self):
        for target, how in self.out:
            if target == "file":
                conftest.reachable(self.replica, self.work / "replica.away")
            elif how == "freeze":
                os.kill(self.s3.proc.pid, signal.SIGCONT)
            else:
                self.s3.restart()
        self.out = []
        self.outage = False

    def request_snapshot(self):
        self.settle()
        p = run_walship("snapshot", self.agent_db(), self.url, "--spool-dir", self.spool, "--timeout", "60s", timeout=120,
                        env=self.env())
        if p.returncode != 0:
            self.fail("snapshot", f"`walship snapshot` exited {p.returncode}: {error_text(p)}")
        self.count("snapshot")

    def count(self, k):
        self.counts[k] = self.counts.get(k, 0) + 1

    # -- application ---------------------------------------------------------------------

    def start_writer(self):
        """Starts the application process(es); the first one creates the database."""
        c = self.cfg
        for k in ([1, 2] if c.get("second_app") else [1]):
            log = open(self.work / f"writer{'' if k == 1 else k}.log", "a")
            proc = subprocess.Popen(
                [sys.executable, str(HERE / "app.py"), str(self.db), str(self.oracle),
                 "--page-size", str(c["page_size"]), "--auto-vacuum", c["auto_vacuum"],
                 "--autocheckpoint", str(c["autocheckpoint"]), "--synchronous", c["synchronous"],
                 "--budget", str(c["budget"])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True)
            self.apps[k] = (proc, log)
            line = proc.stdout.readline()
            if not line:
                raise Failure("writer", f"application process {k} did not start: {Path(log.name).read_text()[-2000:]}")
            # (the first process's creation of the schema is a commit too)
            self.n_commits = max(self.n_commits, json.loads(line).get("commits", 0))
        self.writer = self.apps[1][0]

    def writer_step(self, step):
        k = step.get("proc", 1)
        proc, log = self.apps[k]
        msg = {k: v for k, v in step.items() if k not in ("idle", "proc")}
        msg["n0"] = self.n_commits
        proc.stdin.write(json.dumps(msg) + "\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        if not line:
            raise Failure("writer", f"application process {k} died at step {step['i']}: {Path(log.name).read_text()[-2000:]}")
        r = json.loads(line)
        self.n_commits = r.get("commits", self.n_commits)
        if not r["ok"]:
            self.fail("writer", f"step {step['i']} ({step['op']}) failed: {r['error']}")
        elif r.get("info"):     # bytes a spill added to the WAL, a checkpoint's result
            self.mark("info", i=step["i"], **r["info"])
            step["result"] = r["info"]
            if r["info"].get("switched"):
                self.count("journal_switch")

    def stop_writer(self):
        for proc, log in self.apps.values():
            if proc.poll() is None:
                try:
                    proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                    proc.stdin.flush()
                    proc.wait(timeout=30)
                except (BrokenPipeError, subprocess.TimeoutExpired):
                    proc.kill()
                    proc.wait()
            log.close()
        self.apps = {}
        self.writer = None

    def replace_database(self, pick):
        """The operator puts an earlier state back: restores a txid of the newest generation
        from the directory replica, stops the application, moves the database's -wal and
        -shm away, renames the restored file over the database and starts the application
        again. The oracle records the new state as a commit of its own ("replace")."""
        self.settle()
        try:
            gens = list_generations(conftest.WALSHIP, self.url)
        except AssertionError as e:
            self.fail("replace", str(e)[:500])
            return
        gens = [g for g in gens if g.get("snapshots")]
        if not gens:
            return      # nothing shipped yet: nothing to put back
        g = max(gens, key=lambda g: g["generation"])
        first, last = min(int(x["txid"]) for x in g["snapshots"]), int(g["last_txid"])
        txid = first + int(pick * (last - first))
        k = len(self.replaced_at) + 1
        restored = self.work / f"put-back-{k}.db"
        p = run_walship("restore", self.url, "-o", restored, "--txid", txid)
        if p.returncode != 0:
            self.fail("replace", f"restore --txid {txid} for putting back failed: {error_text(p)}")
            return
        digest = self.digest_or_fail("replace", restored)
        if digest is None:
            return
        known = any(json.loads(l)["digest"] == digest for l in self.oracle.read_text().splitlines() if l.strip())
        if not known:
            self.fail("replace", f"restore --txid {txid} gave a state the application never committed")
        self.stop_writer()
        aside = self.work / f"replaced-{k}"
        aside.mkdir()
        for suffix in ("-wal", "-shm"):
            if os.path.exists(str(self.db) + suffix):
                os.rename(str(self.db) + suffix, aside / (self.db.name + suffix))
        before = self.agent.read_log().count(" replicating") if self.agent else 0
        t = time.time_ns() // 1000
        os.rename(restored, self.db)
        self.replaced_at.append(t)
        # The application is stopped: the oracle file is the harness's alone for this line.
        self.n_commits += 1
        with open(self.oracle, "a") as f:
            f.write(json.dumps({"n": self.n_commits, "step": -1, "op": "replace", "conn": "-",
                                "before": t, "after": t, "digest": digest, "txid": txid}) + "\n")
        self.mark("replaced", txid=txid)
        self.count("replace")
        if self.agent:
            # Until the agent has started over on the new file, what is committed there is not
            # dated by a watching agent: that span is not live for the PITR check.
            self.close_live()
            # The agent ships what it read first, which can wait out a replica's backoff
            # after an outage (its shutdown allows 30 s for that).
            deadline = time.time() + 90
            while self.agent.read_log().count(" replicating") <= before and time.time() < deadline:
                if self.agent.proc.poll() is not None:
                    raise Failure("replace", f"the agent exited {self.agent.proc.returncode} after the database "
                                             f"file was replaced: {self.agent.read_log()[-1500:]}")
                time.sleep(0.05)
            if self.agent.read_log().count(" replicating") <= before:
                raise Failure("replace", "the agent did not start over within 90 s after the database file was replaced")
            self.open_live()
        self.start_writer()

    # -- the run -------------------------------------------------------------------------

    def execute(self):
        self.cfg, self.plan = make_plan(self.seed, self.steps)
        (self.work / "plan.json").write_text(json.dumps({"seed": self.seed, "steps": self.steps,
                                                          "config": self.cfg, "plan": self.plan}, indent=1))
        t0 = time.time()
        self.timeline = open(self.work / "timeline.jsonl", "a")
        self.hole_watch = WalHoleWatch(self.db)
        try:
            if self.cfg.get("s3"):
                self.s3 = S3Server(self.work / "s3", buckets=["walship"], log_level="ERROR").start()
                self.s3_url = self.s3.url("walship", f"torture/{self.seed}")
            self.start_writer()
            for step in self.plan:
                if "event" in step:
                    self.mark("event", **step)
                    self.event(step)
                    continue
                self.mark("step", i=step["i"], op=step["op"])
                t_step = time.time()
                self.writer_step(step)
                if step["op"] == "checkpoint":
                    self.app_checkpoints.append((step, t_step, time.time()))
                if step["idle"]:
                    time.sleep(step["idle"])
            # the end: let the agent see everything, then stop it cleanly
            self.settle()
            if self.outage:
                self.outage_end()
            if self.agent is None:
                self.start_agent()
            self.stop_writer()
            self.mark("writer stopped")
            time.sleep(self.cfg["final_idle"])
            self.final_stop = time.time()
            self.term_agent(final=True)
            self.mark("agent stopped")
            self.check()
        except Failure as e:
            self.fail(e.check, str(e))
        except Exception:
            tb = traceback.format_exc()
            (self.work / "harness-error.txt").write_text(tb)
            self.fail("harness", tb.strip().splitlines()[-1] + " (traceback in harness-error.txt)")
        finally:
            self.wal_hole = self.hole_watch.stop()
            self.excuse_wal_hole()
            self.cleanup()
            self.timeline.close()
        self.seconds = time.time() - t0
        return not self.failures

    def event(self, ev):
        kind = ev["event"]
        if kind == "start":
            self.start_agent(ev.get("kill_after"), ev.get("clock_shift_us", 0))
        elif kind == "kill":
            self.kill_agent()
        elif kind == "term":
            self.term_agent()
        elif kind == "stop":
            self.stop_agent(ev["seconds"])
        elif kind == "outage":
            self.outage_start(ev)
        elif kind == "outage_end":
            self.outage_end()
        elif kind == "snapshot":
            self.request_snapshot()
        elif kind == "replace":
            self.replace_database(ev["pick"])

    def cleanup(self):
        """Each step on its own: one that fails must not leave the others undone."""
        def attempt(f):
            try:
                f()
            except Exception as e:   # noqa: BLE001 (recorded, the run is over anyway)
                self.fail("harness", f"cleanup: {type(e).__name__}: {e}")
        if self.cont_timer:
            attempt(self.cont_timer.join)
        if self.agent and self.agent.proc and self.agent.proc.poll() is None:
            attempt(self.agent.kill9)
        attempt(self.stop_writer)
        if self.outage:
            if any(t == "file" for t, _ in self.out) or not self.out:
                attempt(lambda: conftest.reachable(self.replica, self.work / "replica.away"))
            self.out, self.outage = [], False
        if self.s3:
            if self.s3.proc and self.s3.proc.poll() is None:
                attempt(lambda: os.kill(self.s3.proc.pid, signal.SIGCONT))
            attempt(self.s3.stop)

    # -- the oracle ----------------------------------------------------------------------

    def check(self):
        commits = [json.loads(l) for l in self.oracle.read_text().splitlines() if l.strip()]
        self.commits = commits
        by_digest = {}
        for c in commits:
            by_digest.setdefault(c["digest"], []).append(c)

        def which(d):
            cs = by_digest.get(d)
            if not cs:
                return "a state the application never committed"
            c = cs[-1]
            return f"the state of commit {c['n']} ({c['op']} at step {c['step']})"

        env = self.env()
        # chain, on every replica
        for url in self.urls():
            where = "" if url == self.url else "S3 replica: "
            try:
                g = list_generations(conftest.WALSHIP, url, env=env)
            except AssertionError as e:
                self.fail("chain", where + str(e)[:500])
                g = []
            for p in chain_problems(g):
                self.fail("chain", where + p)
            if url == self.url:
                gens = g
        self.generations = len(gens)

        # latest, from every replica
        last = commits[-1]
        checkpointed = False
        for r, url in enumerate(self.urls()):
            where = "" if url == self.url else "S3 replica: "
            out = self.work / f"latest-{r}.db"
            p = run_walship("restore", url, "-o", out, env=env)
            if p.returncode != 0:
                self.fail("latest", f"{where}restore failed: {error_text(p)}")
                continue
            d = self.digest_or_fail("latest", out)
            if d is None:
                pass
            elif d != last["digest"]:
                self.fail("latest", f"{where}the latest restore has {which(d)}, expected commit {last['n']} "
                                    f"({last['op']} at step {last['step']}); {p.stdout.strip()[:300]}")
            else:
                if not checkpointed:
                    checkpoint_truncate(self.db)
                    checkpointed = True
                if not file_bytes_equal(self.db, out):
                    self.fail("latest", f"{where}the latest restore has the right content but is not byte-identical "
                                        "to the checkpointed source")

        # pitr
        self.pitr_checked = 0
        if gens:
            window_start = min(parse_rfc3339(g["first_time"]) for g in gens if g.get("first_time"))
            for k, (t, c) in enumerate(self.pitr_instants(commits, window_start)):
                # every other instant from the S3 replica, in runs with one
                url = self.urls()[k % len(self.urls())]
                where = "" if url == self.url else "S3 replica: "
                o = self.work / f"pitr-{self.pitr_checked:02d}.db"
                self.pitr_checked += 1
                p = run_walship("restore", url, "-o", o, "--timestamp", rfc3339(t), env=env)
                if p.returncode != 0:
                    self.fail("pitr", f"{where}restore --timestamp {rfc3339(t)} failed: {error_text(p)}")
                    continue
                d = self.digest_or_fail("pitr", o)
                if d is not None and d != c["digest"]:
                    self.fail("pitr", f"{where}restore --timestamp {rfc3339(t)} has {which(d)}, expected commit {c['n']} "
                                      f"({c['op']} at step {c['step']}, committed {rfc3339(us_to_s(c['after']))})")
                else:
                    o.unlink()      # a wrong one stays in the work directory

        # verify, every replica
        for url in self.urls():
            p = run_walship("verify", url, env=env)
            if p.returncode != 0:
                where = "" if url == self.url else "S3 replica: "
                self.fail("verify", f"{where}`walship verify` exited {p.returncode}: {error_text(p)}")

        # application checkpoints beside a running agent
        for step, t0, t1 in self.app_checkpoints:
            r = step.get("result")
            # (FULL is left out: it also waits for the application's own reader, which a
            # step may hold.)
            if step["mode"] not in ("RESTART", "TRUNCATE") or not r:
                continue
            beside = any(s <= t0 and t1 <= e for s, e in self.live)
            if beside and r["seconds"] >= 4.0:   # waited out most of the 5 s busy timeout, done or not
                self.fail("app-checkpoint", f"step {step['i']}: {step['mode']} checkpoint gave up after {r['seconds']} s "
                                            f"(busy, log, checkpointed = {r['result']}) beside a running agent")

        # agent logs
        self.generation_reasons = {}
        for f in sorted(self.work.glob("agent-*.log")):
            prev = ""
            for line in f.read_text(errors="replace").splitlines():
                before, prev = prev, line
                if " notice " in line and "starting a new generation" in line:
                    m = re.search(r" reason=([^:\[]*)", line)
                    why = m.group(1).strip() if m else "?"
                    self.generation_reasons[why] = self.generation_reasons.get(why, 0) + 1
                    if why == "WAL continuity lost":
                        # while it runs, the agent's pin keeps SQLite from restarting the WAL
                        # past frames it has not read: losing track of the WAL is a misread
                        self.fail("continuity", f"{f.name}: {before.split(' walship: ', 1)[-1][:300]}")
                if " error " not in line and " critical " not in line:
                    continue
                msg = line.split(" walship: ", 1)[-1][:500]
                if "self-check failed" in line or "checksum differs" in line:
                    self.fail("self-check", f"{f.name}: {msg}")
                elif self.had_outage and any(x in line for x in EXPECTED_DURING_OUTAGE):
                    continue
                else:
                    self.fail("agent-log", f"{f.name}: {msg}")

    def excuse_wal_hole(self):
        """With a hole in the application's own WAL, checks that depend on reading that WAL
        cannot hold; what must hold is that the agent said so (its self-check)."""
        if not getattr(self, "wal_hole", None):
            return
        said = any("self-check failed" in f.read_text(errors="replace") or "cannot be read consistently" in f.read_text(errors="replace")
                   for f in self.work.glob("agent-*.log"))
        if said:
            # (app-checkpoint: the agent's pin stays where the hole stopped its reading, so a
            # RESTART or TRUNCATE of the application waits for it until the agent stops;
            # sigterm, replace: an agent that found the hole exits 1, its way of saying so.)
            self.failures = [(c, m) for c, m in self.failures
                             if c not in ("self-check", "pitr", "latest", "verify", "agent-start", "snapshot", "app-checkpoint",
                                          "sigterm", "replace")]
        elif self.failures:
            # Not excused: the agent did not notice, and something is wrong. (A hole that no
            # check suffered from, say in frames read before they were zeroed, fails nothing.)
            self.fail("wal-hole", f"the application's WAL had a hole at frame {self.wal_hole['frame']} "
                                  f"(mxFrame {self.wal_hole['mxFrame']}) and no agent reported it")

    def digest_or_fail(self, check, path):
        try:
            return file_digest(path)
        except sqlite3.Error as e:
            self.fail(check, f"the restored file {path.name} cannot be read: {e}")
            return None

    def pitr_instants(self, commits, window_start):
        """(T, expected commit) pairs: T is the middle of a quiet gap after a commit, inside the
        restorable window, while one agent ran from before T - READ_MARGIN to after T + SHIP_MARGIN."""
        cands = []
        if self.ever_shifted:
            # A generation started under a clock stepped back claims instants that an older
            # generation recorded too, and restore takes the newest: by the recorded times
            # that is right, by the real ones it cannot be. Only `latest` is checked then.
            self.pitr_candidates = 0
            return []
        for k, c in enumerate(commits):
            gap_lo = us_to_s(c["after"])
            gap_hi = us_to_s(commits[k + 1]["before"]) if k + 1 < len(commits) else self.final_stop
            if gap_hi - gap_lo < 2 * READ_MARGIN:
                continue
            t = (gap_lo + gap_hi) / 2
            if t < window_start + READ_MARGIN:
                continue
            if not any(s + READ_MARGIN <= t and t + SHIP_MARGIN <= e for s, e in self.live):
                continue
            cands.append((t, c))
        rng = random.Random(self.seed * 7919 + 1)
        special = [x for x in cands if x[1]["op"] in ("small", "vacuum", "spill_commit", "savepoint", "ddl")
                   and self._is_special(x[1])]
        pick = rng.sample(special, min(len(special), PITR_INSTANTS // 2))
        rest = [x for x in cands if x not in pick]
        pick += rng.sample(rest, min(len(rest), PITR_INSTANTS - len(pick)))
        self.pitr_candidates = len(cands)
        return sorted(pick, key=lambda x: x[0])

    def _is_special(self, c):
        """Commits right after a rolled-back spill, and the heavier page-moving ones."""
        if c["op"] != "small":
            return True
        prev = [s for s in self.plan if s.get("i") == c["step"]]
        return bool(prev and prev[0].get("after_spill"))

    def summary(self):
        return {"seed": self.seed, "steps": self.steps, "seconds": round(getattr(self, "seconds", 0), 1),
                "page_size": self.cfg["page_size"], "auto_vacuum": self.cfg["auto_vacuum"],
                "checkpoint_frames": self.cfg["checkpoint_frames"], "commits": len(getattr(self, "commits", [])),
                "generations": getattr(self, "generations", None), "agent_runs": self.agent_runs,
                "events": self.counts, "pitr_checked": getattr(self, "pitr_checked", 0),
                "pitr_candidates": getattr(self, "pitr_candidates", 0),
                "new_generations": getattr(self, "generation_reasons", {}),
                "wal_hole": getattr(self, "wal_hole", None),
                "failed_checks": sorted({c for c, _ in self.failures})}


# ----------------------------------------------------------------------------------------
# command line

def repro(seed, steps, walship):
    cmd = f"python3 Tests/integration/torture/torture.py --seed {seed} --steps {steps}"
    if Path(walship).resolve() != (ROOT / ".build" / "release" / "walship").resolve():
        cmd += f" --walship {walship}"
    return cmd


def run_seed(seed, a):
    base = Path(a.workdir) if a.workdir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f"walship-torture-{seed}-", dir=base))
    r = Run(seed, a.steps, work)
    ok = r.execute()
    s = r.summary()
    binary = Path(a.walship)
    (work / "summary.json").write_text(json.dumps({
        "summary": s, "failures": r.failures, "walship": str(binary),
        "walship_mtime": rfc3339(binary.stat().st_mtime), "reproduce": repro(seed, a.steps, a.walship)}, indent=1))
    status = "pass" if ok else "FAIL"
    print(f"seed={seed} {status} {s['seconds']}s page_size={s['page_size']} auto_vacuum={s['auto_vacuum']} "
          f"commits={s['commits']} generations={s['generations']} agent_runs={s['agent_runs']} "
          f"events={json.dumps(s['events'], sort_keys=True)} pitr={s['pitr_checked']}/{s['pitr_candidates']} "
          f"new_generations={json.dumps(s['new_generations'], sort_keys=True)}"
          + (f" sqlite_wal_hole=frame {s['wal_hole']['frame']} of {s['wal_hole']['mxFrame']}" if s.get("wal_hole") else ""), flush=True)
    if not ok:
        print(f"TORTURE FAILURE seed={seed} checks={','.join(s['failed_checks'])}")
        shown = {}
        for check, msg in r.failures:
            shown[check] = shown.get(check, 0) + 1
            if shown[check] <= 3:
                print(f"  {check}: {msg}")
        for check, n in shown.items():
            if n > 3:
                print(f"  {check}: ... {n - 3} more")
        print(f"  work dir: {work}")
        print(f"  reproduce: {repro(seed, a.steps, a.walship)}", flush=True)
    elif not a.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"  work dir: {work}")
    return ok


def main(argv=None):
    ap = argparse.ArgumentParser(description="Randomized torture harness for walship's capture path.",
                                 epilog="One of --seed, --seeds, --duration.")
    ap.add_argument("--seed", type=int, help="run this one seed")
    ap.add_argument("--seeds", type=parse_seed_range, help="A..B: seeds A to B; A.. with --duration")
    ap.add_argument("--duration", type=parse_duration, help="soak: successive seeds until this much time has passed")
    ap.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"application steps per run (default {DEFAULT_STEPS})")
    ap.add_argument("--walship", default=str(conftest.WALSHIP), help="the walship binary")
    ap.add_argument("--workdir", help="where the per-seed work directories go (default: the temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the work directory of passing seeds too")
    ap.add_argument("--fail-fast", action="store_true", help="stop at the first failing seed")
    ap.add_argument("--dry-run", action="store_true", help="print the plan of each seed and exit")
    a = ap.parse_args(argv)
    if a.seed is None and a.seeds is None and a.duration is None:
        ap.error("give --seed N, --seeds A..B or --duration D")
    if a.seed is not None and (a.seeds or a.duration):
        ap.error("--seed runs one seed: leave out --seeds and --duration")
    if a.steps < 5:
        ap.error("--steps must be at least 5")
    if a.seed is not None:
        seeds = iter([a.seed])
    else:
        first, last = a.seeds if a.seeds else (1, None)
        if last is None and a.duration is None:
            ap.error("an open seed range needs --duration")
        seeds = iter(range(first, last + 1)) if last is not None else iter(range(first, 1 << 62))

    if a.dry_run:
        for s in seeds:
            cfg, plan = make_plan(s, a.steps)
            print(json.dumps({"seed": s, "config": cfg, "plan": plan}, indent=1))
            if a.duration:
                break
        return 0

    conftest.WALSHIP = Path(a.walship)
    if not conftest.WALSHIP.exists():
        print(f"{a.walship} is missing: run `make build` first", file=sys.stderr)
        return 2
    deadline = time.monotonic() + a.duration if a.duration else None
    failed, ran = [], 0
    for s in seeds:
        if deadline is not None and time.monotonic() >= deadline:
            break
        ran += 1
        if not run_seed(s, a):
            failed.append(s)
            if a.fail_fast:
                break
    if ran > 1:
        print(f"{ran} seed(s), {len(failed)} failed" + (f": {' '.join(map(str, failed))}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
