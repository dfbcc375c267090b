"""The deployment kit (deploy/) is valid and the disaster-recovery runbook (docs/runbook.md)
works as written.

Deploy files:
  - deploy/walship.service passes `systemd-analyze verify` (ExecStart rewritten to the real
    binary in a temp copy, because verify checks that the executable exists) and never stops
    restarting the agent (StartLimitIntervalSec=0);
  - every YAML document parses; the Grafana dashboard is JSON; the alert rules and the
    dashboard only use the planned walship_* metric names;
  - deploy/walship.yml uses only the keys of the config schema; deploy/credentials.env sets
    every variable it names and sources with bash;
  - deploy/kubernetes.yaml restores first, then runs walship as a native sidecar (an init
    container with restartPolicy: Always) with a named metrics port, and its walship.yml is
    accepted by walship;
  - the Dockerfile builds with a Swift image at least as new as Package.swift's tools
    version, installs the -dev package of every system library Package.swift names and its
    runtime package in the final stage, COPYs only files that exist in the repository and
    names only the binary `walship`. (No Docker engine is needed: these checks are static.)

Runbook: every ```sh block of docs/runbook.md is run, scenario by scenario, by bash against
a scratch "host" (real SQLite files, a real application process writing, the real walship
agent, a real S3 server on loopback as the primary replica and a directory as the second
one). Paths and URLs of the runbook are substituted by text:

    /var/lib/tickets                                   -> <tmp>/var/lib/tickets
    /var/backups/tickets                               -> <tmp>/var/backups/tickets
    /etc/walship/                                      -> <tmp>/etc/walship/
    /tmp/drill.db                                      -> <tmp>/drill.db
    s3://tickets-backups-eu/tickets?region=eu-west-1   -> the loopback S3 server's URL
    a line `T=...` (the point in time)                 -> the instant the test recorded just
                                                          before it caused the incident

<tmp>/etc/walship/ holds what provisioning puts in /etc/walship/:
  - walship.yml: deploy/walship.yml with the same substitutions, and two more for the test:
    `metrics-addr: 127.0.0.1:0` (any free port) and `sync-interval: 200ms`;
  - tickets.key: a fresh 32-byte key (the replicas are encrypted, as in production);
  - credentials.env: deploy/credentials.env with the loopback S3 server's keys filled in and
    WALSHIP_WEBHOOK_URL commented out, so every command the runbook's shell runs shows that
    it needs only the replica credentials.

`walship` and `sqlite3` on PATH are the real programs behind a thin wrapper that records
every run that fails: a runbook step fails when any of them fails, also inside a `&&` chain
or a `$(...)`, which bash's `set -e` does not see. The service manager is the one thing that
is not real here: `systemctl start|stop|is-active walship|tickets` and `journalctl -u walship`
are small shims on PATH. `systemctl start walship` does what the unit does: it reads
credentials.env (EnvironmentFile=) and runs the real `walship replicate --config
<tmp>/etc/walship/walship.yml`; it also sets WALSHIP_WEBHOOK_URL to a local HTTP sink (the
agent's alerts land there). `systemctl start tickets` runs the real application process,
and journalctl prints the agent's log. ```sh provision blocks (they create system users and
chown to them) are not run; the test does their effect itself (it creates the directories
and the files in /etc/walship/; on the "new host" of (d) the key is the one the first host
made, as the runbook's off-host copy would be).

The runbook says its blocks are safe to run again; (b) and (c) check it: a restore that
fails leaves no file behind and the same block then succeeds, (b)'s put-in-place block run
a second time refuses and changes nothing, and every block of (c) runs twice.

Each ```text block right after a ```sh block is the expected output: every line of it,
with times, numbers, hex ids and `walship status`'s per-type request counts masked, must
appear in the real output (real output is
mapped back to the runbook's paths first). Set RUNBOOK_CAPTURE=<file> to write the real
outputs there (that is how the runbook's outputs were produced).
"""
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, WALSHIP, create_ticket_db, require_tool, table_contents
from s3server import S3Server

DEPLOY = ROOT / "deploy"
RUNBOOK = ROOT / "docs" / "runbook.md"
PROD_S3 = "s3://tickets-backups-eu/tickets?region=eu-west-1"
PROD_S3_DISPLAY = "s3://tickets-backups-eu/tickets?endpoint=https://s3.eu-west-1.amazonaws.com&region=eu-west-1&path-style=false"

PLANNED_METRICS = {
    "walship_replication_lag_seconds", "walship_last_sync_timestamp_seconds", "walship_txid",
    "walship_shipped_bytes_total", "walship_shipped_objects_total", "walship_requests_total",
    "walship_errors_total", "walship_checkpoint_duration_seconds", "walship_wal_bytes",
    "walship_spool_bytes", "walship_snapshot_age_seconds", "walship_verify_last_success",
    "walship_verify_last_timestamp_seconds", "walship_databases", "walship_all_replication_lag_seconds_max",
    "walship_all_shipped_bytes_total", "walship_all_errors_total",
}


# ================================================================ deploy files

def test_systemd_unit_verifies(tmp_path, walship_bin):
    # systemd-analyze is part of the `systemd` package (Debian 12 has it on every systemd
    # host). Where it is missing it is installable, so that is a failure with a hint.
    sa = require_tool("systemd-analyze", "install it with `apt-get install systemd`")
    text = (DEPLOY / "walship.service").read_text()
    for must in ["User=walship", "ExecStart=/usr/local/bin/walship replicate --config /etc/walship/walship.yml",
                 "ProtectSystem=strict", "ReadWritePaths=/var/lib/tickets", "ProtectHome=yes", "PrivateTmp=yes",
                 "NoNewPrivileges=yes", "CapabilityBoundingSet=\n",
                 "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6", "SystemCallFilter=@system-service",
                 "Restart=on-failure", "EnvironmentFile=-/etc/walship/credentials.env", "KillSignal=SIGTERM",
                 "TimeoutStopSec=", "RestartSec=",
                 # the agent starts again by itself after a full disk, however long (runbook (f))
                 "StartLimitIntervalSec=0\n"]:
        assert must in text, f"walship.service lacks {must!r}"
    assert "StartLimitBurst=" not in text, "a start limit makes systemd give up on the agent"
    unit = tmp_path / "walship.service"
    unit.write_text(text.replace("/usr/local/bin/walship", walship_bin))
    p = subprocess.run([sa, "verify", str(unit)], capture_output=True, text=True, timeout=120)
    problems = [l for l in (p.stdout + p.stderr).splitlines() if "walship.service" in l]
    assert p.returncode == 0 and not problems, f"systemd-analyze verify:\n{p.stdout}\n{p.stderr}"


def test_yaml_and_json_parse():
    for name in ["kubernetes.yaml", "prometheus-alerts.yml", "walship.yml"]:
        docs = [d for d in yaml.safe_load_all((DEPLOY / name).read_text()) if d is not None]
        assert docs, f"{name} holds no YAML document"
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    assert dash["panels"]


def test_kubernetes_example_restores_then_runs_walship_as_a_native_sidecar(tmp_path, walship_bin):
    docs = [d for d in yaml.safe_load_all((DEPLOY / "kubernetes.yaml").read_text()) if d]
    dep = next(d for d in docs if d["kind"] == "Deployment")
    spec = dep["spec"]["template"]["spec"]
    assert spec["terminationGracePeriodSeconds"] >= 30
    assert any(v.get("emptyDir") is not None for v in spec["volumes"])
    inits = spec["initContainers"]
    # 1. the restore runs to completion first
    restore = inits[0]
    init = restore["args"]
    assert init[:1] == ["restore"] and "restartPolicy" not in restore
    assert "--config" in init and "--if-not-exists" in init and "--if-replica-exists" in init
    # 2. walship is a native sidecar: an init container that keeps running (restartPolicy:
    # Always), so Kubernetes stops it only after the application's last commit
    sidecars = [c for c in inits if c.get("restartPolicy") == "Always"]
    assert [c["name"] for c in sidecars] == ["walship"]
    sidecar = sidecars[0]
    assert inits.index(sidecar) > 0
    assert sidecar["args"][:3] == ["replicate", "--config", "/etc/walship/walship.yml"]
    assert "walship" not in [c["name"] for c in spec["containers"]], "walship must not be an ordinary container"
    assert spec["containers"], "the application container is missing"
    # both read the S3 credentials from the Secret
    for c in (restore, sidecar):
        envs = {e["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
        assert envs == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}, c["name"]
    # the config the ConfigMap holds: the database the restore names, a metrics address the
    # pod's named port exposes, a key file on a mounted Secret
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and "walship.yml" in d.get("data", {}))
    text = cm["data"]["walship.yml"]
    cfg = yaml.safe_load(text)
    db = cfg["databases"][0]["path"]
    assert init[init.index("--config") + 1] == "/etc/walship/walship.yml" and db in init
    host, port = cfg["metrics-addr"].rsplit(":", 1)
    assert host in ("0.0.0.0", "", "[::]"), "metrics on loopback are unreachable from outside the container"
    ports = {p["name"]: p["containerPort"] for p in sidecar.get("ports", [])}
    assert ports.get("metrics") == int(port), f"the sidecar exposes no port named metrics on {port}: {ports}"
    keyfile = cfg["defaults"]["encryption"]["key-file"]
    for c in (restore, sidecar):
        mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
        assert any(v["name"] == mounts.get("/etc/walship/walship.yml") and v.get("configMap", {}).get("name") == cm["metadata"]["name"]
                   for v in spec["volumes"]), f"{c['name']} does not mount the ConfigMap at /etc/walship/walship.yml"
        key_volume = mounts.get(os.path.dirname(keyfile))
        assert any(v["name"] == key_volume and "secret" in v for v in spec["volumes"]), \
            f"{c['name']} does not mount a Secret at {os.path.dirname(keyfile)}"
    # the flags the containers pass exist in this walship
    for cmd, args in (("restore", init), ("replicate", sidecar["args"])):
        helptext = subprocess.run([walship_bin, cmd, "--help"], capture_output=True, text=True).stdout
        for flag in [a for a in args if a.startswith("-")]:
            assert flag in helptext, f"walship {cmd} has no {flag}"
    # walship accepts the file: the first complaint is the (absent) database
    key = tmp_path / "tickets.key"
    key.write_bytes(os.urandom(32))
    local_db = tmp_path / "data" / "tickets.db"
    (tmp_path / "walship.yml").write_text(text.replace(keyfile, str(key)).replace(db, str(local_db)))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE0000000000", "AWS_SECRET_ACCESS_KEY": "x" * 40}
    p = subprocess.run([walship_bin, "replicate", "--config", str(tmp_path / "walship.yml")], capture_output=True,
                       text=True, env=env, timeout=30)
    assert p.returncode != 0 and f"{local_db} does not exist" in p.stderr, p.stderr


def test_sample_config_follows_the_schema():
    cfg = yaml.safe_load((DEPLOY / "walship.yml").read_text())
    common = {"sync-interval", "snapshot-interval", "checkpoint-frames", "read-delay", "spool-limit", "retention",
              "compaction", "fine-window", "verify-interval", "webhook-url", "alert-lag", "alert-sync-failure", "encryption"}
    assert set(cfg) <= {"defaults", "databases", "metrics-addr"}
    assert set(cfg["defaults"]) <= common
    # the ticket-system policy: daily snapshots kept 7 days, a daily drill, encryption at rest
    assert cfg["defaults"]["snapshot-interval"] == "24h"
    assert cfg["defaults"]["retention"] == "7d"
    assert cfg["defaults"]["verify-interval"] == "24h"
    assert set(cfg["defaults"]["encryption"]) == {"key-file"}
    for db in cfg["databases"]:
        assert set(db) <= common | {"path", "spool-dir", "replicas"}
        assert len(db["replicas"]) >= 2
        for r in db["replicas"]:
            assert set(r) <= {"url", "access-key-id", "secret-access-key"}
            assert r["url"].startswith(("s3://", "file:///"))


def test_credentials_template_sets_what_the_config_names():
    """deploy/credentials.env sets every ${NAME} deploy/walship.yml reads, documents the
    optional ones commented out, and is both a systemd EnvironmentFile (NAME=value lines) and
    a file bash can source (the runbook does)."""
    path = DEPLOY / "credentials.env"
    text = path.read_text()
    for line in text.splitlines():
        assert not line.strip() or line.startswith("#") or re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", line), line
    set_names = set(re.findall(r"^([A-Z][A-Z0-9_]*)=", text, re.M))
    commented = set(re.findall(r"^#([A-Z][A-Z0-9_]*)=", text, re.M))
    config = "\n".join(l.split(" #")[0] for l in (DEPLOY / "walship.yml").read_text().splitlines()
                        if not l.lstrip().startswith("#"))
    named = set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}", config))
    assert named, "walship.yml names no variable"
    assert named <= set_names, f"walship.yml names {named - set_names}, which credentials.env does not set"
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "WALSHIP_WEBHOOK_URL"} <= set_names
    assert {"AWS_SESSION_TOKEN", "S3_ENDPOINT"} <= commented
    p = subprocess.run(["bash", "-c", f"set -eu; set -a; . '{path}'; set +a; env"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert set_names <= {l.split("=", 1)[0] for l in p.stdout.splitlines() if "=" in l}


def exposed_metrics(tmp_path):
    """The metric families a real agent serves on --metrics-addr."""
    db = tmp_path / "m.db"
    create_ticket_db(db)
    log = tmp_path / "m.log"
    with open(log, "w") as out:
        p = subprocess.Popen([str(WALSHIP), "replicate", str(db), "--metrics-addr", "127.0.0.1:0"], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 30
        url = None
        while time.time() < deadline and url is None:
            m = re.search(r"metrics\.url=(http://\S+/metrics)", log.read_text())
            url = m and m.group(1)
            time.sleep(0.1)
        assert url, f"the agent did not report its metrics address:\n{log.read_text()}"
        import urllib.request
        deadline = time.time() + 10
        while True:
            text = urllib.request.urlopen(url, timeout=5).read().decode()
            if "walship_replication_lag_seconds{" in text or time.time() > deadline:
                break
            time.sleep(0.3)
        return set(re.findall(r"^# TYPE (walship_[a-z_]+) ", text, flags=re.M))
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(timeout=30)


def test_alerts_and_dashboard_use_only_metrics_walship_serves(tmp_path):
    served = exposed_metrics(tmp_path)
    assert PLANNED_METRICS <= served, f"not served: {PLANNED_METRICS - served}"
    texts = [(DEPLOY / "prometheus-alerts.yml").read_text(), (DEPLOY / "grafana-dashboard.json").read_text()]
    for t in texts:
        used = set(re.findall(r"\bwalship_[a-z_]+\b", t))
        assert used, "no walship metric used"
        assert used <= served, f"metrics walship does not serve: {used - served}"
        assert "later version" not in t.lower()
    rules = yaml.safe_load(texts[0])
    for g in rules["groups"]:
        for r in g["rules"]:
            assert r["alert"] and r["expr"] and r["labels"]["severity"]


# The runtime package (Debian 12) of each -dev package Package.swift names as a provider.
RUNTIME_PACKAGE = {"libsqlite3-dev": "libsqlite3-0", "liblz4-dev": "liblz4-1", "libcurl4-openssl-dev": "libcurl4",
                   "libssl-dev": "libssl3"}


def test_dockerfile_copies_only_existing_files_and_names_walship():
    lines = (DEPLOY / "Dockerfile").read_text().splitlines()
    froms = [l.split()[1] for l in lines if l.startswith("FROM ")]
    assert froms[0].startswith("swift:") and "bookworm" in froms[0] and froms[-1] == "debian:bookworm-slim"
    # the Swift image is at least as new as the tools version Package.swift declares
    package = (ROOT / "Package.swift").read_text()
    tools = tuple(map(int, re.search(r"swift-tools-version:\s*(\d+)\.(\d+)", package).groups()))
    image = re.match(r"swift:(\d+)\.(\d+)", froms[0])
    assert image and tuple(map(int, image.groups())) >= tools, f"{froms[0]} is older than swift-tools-version {tools}"
    # each system library: its -dev package in the build stage, its runtime package in the final one
    stages = re.split(r"^FROM ", (DEPLOY / "Dockerfile").read_text(), flags=re.M)[1:]
    installs = [set(re.findall(r"[a-z0-9][a-z0-9.+-]+", " ".join(re.findall(r"apt-get install[^&]*", s.replace("\\\n", " ")))))
                for s in stages]
    providers = [p for group in re.findall(r"\.apt\(\[([^\]]*)\]\)", package) for p in re.findall(r'"([^"]+)"', group)]
    assert "libssl-dev" in providers, "Package.swift no longer names libcrypto's provider"
    for dev in providers:
        assert dev in installs[0], f"the build stage does not install {dev}"
        assert dev in RUNTIME_PACKAGE, f"add the runtime package of {dev} to RUNTIME_PACKAGE"
        assert RUNTIME_PACKAGE[dev] in installs[-1], f"the final stage does not install {RUNTIME_PACKAGE[dev]} (for {dev})"
    for l in lines:
        if l.startswith("COPY ") and "--from=" not in l:
            for src in l.split()[1:-1]:
                hits = list(ROOT.glob(src))
                assert hits, f"Dockerfile copies {src}, which is not in the repository"
    text = "\n".join(l for l in lines if not l.lstrip().startswith("#"))
    assert 'ENTRYPOINT ["walship"]' in text
    assert "--static-swift-stdlib" in text
    for binary in re.findall(r"/usr/local/bin/(\S+)", text) + re.findall(r"--product (\S+)", text):
        assert binary == "walship", binary
    tracked = subprocess.run(["git", "-C", str(ROOT), "ls-files", "Package.swift", "Sources"],
                             capture_output=True, text=True).stdout
    assert "Package.swift" in tracked


# ================================================================ runbook machinery

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```[ \t]*$", re.M | re.S)


def runbook_sections():
    """{scenario key: [(kind, info, body)]}, keys like 'setup', 'a', 'b', ..., 'drill'."""
    text = RUNBOOK.read_text()
    sections, key = {}, "intro"
    pos = 0
    heads = [(m.start(), m.group(1)) for m in re.finditer(r"^## (.+)$", text, re.M)]
    bounds = heads + [(len(text), None)]
    out = {"intro": text[:heads[0][0]] if heads else text}
    for (start, title), (end, _) in zip(bounds, bounds[1:]):
        m = re.match(r"\(([a-e])\)", title)
        if m:
            key = m.group(1)
        elif "restore drill" in title.lower():
            key = "drill"
        elif "before an incident" in title.lower():
            key = "setup"
        else:
            key = title
        out[key] = text[start:end]
    for k, body in out.items():
        blocks = []
        for m in FENCE.finditer(body):
            info = m.group(1).strip()
            blocks.append((info.split()[0] if info else "", info, m.group(2)))
        sections[k] = blocks
    return sections


def steps(blocks):
    """[(command, expected output or None)] for the runnable ```sh blocks, in order."""
    out = []
    for i, (lang, info, body) in enumerate(blocks):
        if lang != "sh" or "provision" in info:
            continue
        expected = None
        if i + 1 < len(blocks) and blocks[i + 1][0] == "text":
            expected = blocks[i + 1][2]
        out.append((body, expected))
    return out


TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]\d\d:?\d\d)?")
HEX = re.compile(r"\b(?=[0-9a-f]*\d)[0-9a-f]{8,}\b")
NUM = re.compile(r"\d+")
# `ls -l` prints a file's time as "Nov 29 05:15" (or "Nov 29  2025"); the scripts run with
# LC_ALL=C so the month is English, and any month masks alike.
LS_TIME = re.compile(r"\b(?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) +\d{1,2} +(?:\d\d:\d\d|\d{4})\b")
# `walship status` counts a replica's requests by type ("requests: HEAD 1 LIST 4 PUT 3");
# which types have been needed yet depends on timing, so the whole list masks alike.
REQUESTS = re.compile(r"\brequests: [A-Z]+ \d+(?:,? [A-Z]+ \d+)*")


# Sizes in `walship status` (WAL, spool, shipped bytes) depend on when it runs: the spool
# may have been emptied a moment before ("0 B") or not ("2.3 KiB").
SIZE = re.compile(r"\b\d+(?:\.\d+)? (?:B|KiB|MiB|GiB|TiB)\b")


def mask(line):
    line = TS.sub("<T>", line)
    line = SIZE.sub("<SIZE>", line)
    line = LS_TIME.sub("<LS-TIME>", line)
    line = REQUESTS.sub("requests: <R>", line)
    line = HEX.sub("<H>", line)
    line = NUM.sub("<N>", line)
    return " ".join(line.split())


SHIMS = {
    "walship": r'''#!/bin/bash
# test wrapper: the real walship; a failing run is recorded (see the test's docstring)
"$WALSHIP_REAL" "$@"
rc=$?
[ $rc -eq 0 ] || echo "walship $* exited $rc" >> "$DRILL_STATE/failed-commands"
exit $rc
''',
    "sqlite3": r'''#!/bin/bash
# test wrapper: the real sqlite3; a failing run is recorded (see the test's docstring)
"$SQLITE3_REAL" "$@"
rc=$?
[ $rc -eq 0 ] || echo "sqlite3 $* exited $rc" >> "$DRILL_STATE/failed-commands"
exit $rc
''',
    "systemctl": r'''#!/bin/bash
# test shim: the service manager of the scratch host (see the test's docstring)
set -u
cmd=$1; shift
for unit in "$@"; do
  unit=${unit%.service}
  pidf="$DRILL_STATE/$unit.pid"
  alive() { [ -f "$pidf" ] && kill -0 "$(cat "$pidf")" 2>/dev/null; }
  case "$cmd:$unit" in
    start:walship)
      alive && continue
      start=$(wc -l < "$DRILL_STATE/walship.log" 2>/dev/null || echo 0)
      # as the unit: EnvironmentFile=credentials.env, ExecStart=walship replicate --config ...
      ( set -a; . "$DRILL_ETC/credentials.env"; set +a
        export WALSHIP_WEBHOOK_URL="$DRILL_WEBHOOK_URL"
        exec nohup "$WALSHIP_REAL" replicate --config "$DRILL_ETC/walship.yml" ) \
        >> "$DRILL_STATE/walship.log" 2>&1 < /dev/null &
      echo $! > "$pidf"
      for i in $(seq 300); do
        tail -n +$((start + 1)) "$DRILL_STATE/walship.log" | grep -q 'replicating' && break
        kill -0 "$(cat "$pidf")" 2>/dev/null || { echo "walship.service failed" >&2; exit 1; }
        sleep 0.1
      done ;;
    start:tickets)
      alive && continue
      nohup python3 "$DRILL_STATE/app.py" "$DB" >> "$DRILL_STATE/tickets.log" 2>&1 < /dev/null &
      echo $! > "$pidf"; sleep 0.3 ;;
    stop:*)
      if alive; then
        pid=$(cat "$pidf"); kill -TERM "$pid"
        for i in $(seq 1200); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      fi
      rm -f "$pidf" ;;
    is-active:*)
      if alive; then echo active; else echo inactive; fi ;;
    *) echo "systemctl shim: unsupported: $cmd $unit" >&2; exit 2 ;;
  esac
done
''',
    "journalctl": r'''#!/bin/bash
# test shim: journalctl -u walship [-n N] [--no-pager] prints the agent's log
n=20
while [ $# -gt 0 ]; do case $1 in -n) n=$2; shift 2;; *) shift;; esac; done
tail -n "$n" "$DRILL_STATE/walship.log"
''',
}

APP = r'''
import random, signal, sqlite3, sys, time
stop = False
def term(*a):
    global stop
    stop = True
signal.signal(signal.SIGTERM, term)
con = sqlite3.connect(sys.argv[1], timeout=10, isolation_level=None)
con.execute("PRAGMA busy_timeout=5000")
while not stop:
    ids = [r[0] for r in con.execute("SELECT id FROM tickets WHERE usuario_id <> 3 ORDER BY random() LIMIT 1")]
    if ids:
        con.execute("INSERT INTO interacciones(ticket_id, texto, creado) VALUES(?, ?, ?)",
                    (ids[0], "app heartbeat", time.time()))
    time.sleep(0.2)
con.close()
'''


class WebhookSink:
    """A local HTTP endpoint for the agent's alerts (WALSHIP_WEBHOOK_URL); keeps what it got."""

    def __init__(self):
        posts = self.posts = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                posts.append(self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode())
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *a):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/services/T000/B000/XXXX"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


class Host:
    """A scratch host: the ticket database, its app, walship, an S3 replica and a directory."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.state = tmp_path / "state"
        self.state.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        for name, body in SHIMS.items():
            (self.bin / name).write_text(body)
            (self.bin / name).chmod(0o755)
        self.sqlite3 = require_tool("sqlite3", "install it with `apt-get install sqlite3`")
        (self.state / "app.py").write_text(APP)
        self.dbdir = tmp_path / "var" / "lib" / "tickets"
        self.backups = tmp_path / "var" / "backups" / "tickets"
        self.db = self.dbdir / "tickets.db"
        self.s3 = S3Server(tmp_path / "s3", buckets=["walship"]).start()
        self.s3url = self.s3.url("walship", "tickets")
        self.webhook = WebhookSink()
        self.subst = [
            (PROD_S3, self.s3url),
            ("/var/lib/tickets", str(self.dbdir)),
            ("/var/backups/tickets", str(self.backups)),
            ("/etc/walship/", f"{tmp_path}/etc/walship/"),
            ("/tmp/drill.db", str(tmp_path / "drill.db")),
        ]
        try:
            self.provision_etc()
        except BaseException:
            self.s3.stop()
            self.webhook.stop()
            raise
        self.vars = {}
        self.captured = []

    def provision_etc(self):
        """What provisioning puts in /etc/walship/ (see the docstring)."""
        self.etc = self.tmp / "etc" / "walship"
        self.etc.mkdir(parents=True)
        self.key = self.etc / "tickets.key"
        self.key.write_bytes(os.urandom(32))
        self.key.chmod(0o600)
        e = self.s3.env()
        creds = (DEPLOY / "credentials.env").read_text()
        for name, value in (("AWS_ACCESS_KEY_ID", e["AWS_ACCESS_KEY_ID"]), ("AWS_SECRET_ACCESS_KEY", e["AWS_SECRET_ACCESS_KEY"])):
            creds, n = re.subn(rf"^{name}=.*$", f"{name}={value}", creds, flags=re.M)
            assert n == 1, f"deploy/credentials.env has no {name}= line"
        creds, n = re.subn(r"^WALSHIP_WEBHOOK_URL=", "#WALSHIP_WEBHOOK_URL=", creds, flags=re.M)
        assert n == 1, "deploy/credentials.env has no WALSHIP_WEBHOOK_URL= line"
        (self.etc / "credentials.env").write_text(creds)
        cfg = (DEPLOY / "walship.yml").read_text()
        for a, b in self.subst + [("127.0.0.1:9187", "127.0.0.1:0")]:
            cfg = cfg.replace(a, b)
        cfg, n = re.subn(r"^(\s*sync-interval:\s*)1s\b", r"\g<1>200ms", cfg, flags=re.M)
        assert n >= 1 and f"key-file: {self.key}" in cfg and self.s3url in cfg and PROD_S3 not in cfg, cfg
        (self.etc / "walship.yml").write_text(cfg)

    def env(self):
        e = dict(os.environ)
        for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION",
                  "WALSHIP_WEBHOOK_URL", "S3_ENDPOINT"):
            e.pop(k, None)
        e["PATH"] = f"{self.bin}:{e['PATH']}"
        e["DRILL_STATE"] = str(self.state)
        e["DRILL_ETC"] = str(self.etc)
        e["DRILL_WEBHOOK_URL"] = self.webhook.url
        e["WALSHIP_REAL"] = str(WALSHIP)
        e["SQLITE3_REAL"] = self.sqlite3
        e["LC_ALL"], e["TZ"] = "C", "UTC"   # the expected output must not depend on locale or zone
        return e

    def populate(self):
        self.dbdir.mkdir(parents=True)
        self.backups.mkdir(parents=True)     # provisioning makes the directory replica
        create_ticket_db(self.db)
        con = sqlite3.connect(self.db)
        con.executemany("INSERT INTO usuarios VALUES(?, ?, ?)",
                        [(u, f"usuario {u}", f"u{u}@example.com") for u in range(1, 6)])
        con.executemany("INSERT INTO tickets VALUES(?, ?, ?, 'abierto', ?, ?)",
                        [(t, t % 5 + 1, f"ticket {t}", t % 3, 1.0e9 + t) for t in range(1, 61)])
        con.executemany("INSERT INTO interacciones VALUES(?, ?, ?, ?)",
                        [(i, i % 60 + 1, f"nota {i}", 1.0e9 + i) for i in range(1, 121)])
        # the newest interaction ids belong to other users' tickets (see the runbook, (c))
        con.executemany("INSERT INTO interacciones VALUES(?, 1, 'cierre', ?)", [(i, 1.0e9 + i) for i in range(121, 131)])
        con.commit()
        con.close()

    def prose_vars(self, script):
        for name, value in self.vars.items():
            script = re.sub(rf"^(\s*(?:export\s+)?){name}=.*$", rf"\g<1>{name}={value}", script, flags=re.M)
        return script

    def run(self, body, expected=None, key="", must_fail=False):
        """Runs a runbook block; with must_fail, checks that it fails (a block rerun at the
        wrong moment must refuse) and returns its output."""
        script = body
        for a, b in self.subst:
            script = script.replace(a, b)
        env_block = self.env_block
        for a, b in self.subst:
            env_block = env_block.replace(a, b)
        script = self.prose_vars(script)
        full = "set -eo pipefail\n" + env_block + "\n" + script
        failed = self.state / "failed-commands"
        failed.unlink(missing_ok=True)
        p = subprocess.run(["bash", "-c", full], capture_output=True, text=True, timeout=300, env=self.env(),
                           cwd=self.tmp)
        out = p.stdout + p.stderr
        if failed.exists():
            out += "\n--- commands that failed:\n" + failed.read_text()
        back = out.replace(self.s3url, PROD_S3)
        disp = f"s3://walship/tickets?endpoint={self.s3.endpoint}&region=us-east-1&path-style=true"
        back = back.replace(disp, PROD_S3_DISPLAY).replace(self.s3.endpoint, "https://s3.eu-west-1.amazonaws.com")
        for a, b in self.subst[1:]:
            back = back.replace(b, a)
        if must_fail:
            assert p.returncode != 0, f"runbook step should have failed:\n{script}\n--- output:\n{out}"
            return back
        self.captured.append((key, body, back))
        assert p.returncode == 0 and not failed.exists(), f"runbook step failed ({p.returncode}):\n{script}\n--- output:\n{out}"
        if expected is not None:
            have = {mask(l) for l in back.splitlines()}
            for line in expected.splitlines():
                if not line.strip() or line.strip() == "...":
                    continue
                assert mask(line) in have, (f"runbook output line not produced:\n  {line}\nby:\n{body}\n"
                                            f"--- real output:\n{back}")
        return back

    def run_steps(self, key, first=0, last=None):
        for body, expected in steps(self.sections[key])[first:last]:
            self.run(body, expected, key)

    def sh(self, cmd):
        env_block = self.env_block
        for a, b in self.subst:
            env_block = env_block.replace(a, b)
        p = subprocess.run(["bash", "-c", "set -eo pipefail\n" + env_block + "\n" + cmd], capture_output=True, text=True, timeout=300, env=self.env(),
                           cwd=self.tmp)
        assert p.returncode == 0, f"{cmd}:\n{p.stdout}{p.stderr}"
        return p.stdout

    def latest_from(self, url, name="probe.db"):
        out = self.tmp / name
        p = subprocess.run([str(WALSHIP), "restore", url, "-o", str(out), "--force", "--integrity", "none",
                            "--encryption-key-file", str(self.key)],
                           capture_output=True, text=True, env={**self.env(), **self.s3.env()}, timeout=120)
        return out if p.returncode == 0 else None

    def wait_replicated(self, url, pred, timeout=60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.latest_from(url)
            if out and pred(out):
                return
            time.sleep(0.3)
        raise AssertionError(f"{url} never reached the expected state; agent log:\n"
                             f"{(self.state / 'walship.log').read_text()[-3000:]}")

    def kill9(self, unit):
        pidf = self.state / f"{unit}.pid"
        if pidf.exists():
            try:
                os.kill(int(pidf.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
            pidf.unlink()

    def close(self):
        for unit in ("tickets", "walship"):
            pidf = self.state / f"{unit}.pid"
            if pidf.exists():
                try:
                    os.kill(int(pidf.read_text()), signal.SIGTERM)
                except ProcessLookupError:
                    pass
        time.sleep(0.5)
        for unit in ("tickets", "walship"):
            self.kill9(unit)
        self.s3.stop()
        self.webhook.stop()
        cap = os.environ.get("RUNBOOK_CAPTURE")
        if cap:
            with open(cap, "a") as f:
                for key, body, out in self.captured:
                    f.write(f"===== ({key})\n{body}----- output\n{out}\n")


def rows(db, sql):
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def now_rfc3339():
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + f".{int(time.time() * 1000) % 1000:03d}Z"


@pytest.fixture
def host(tmp_path, walship_bin):
    h = Host(tmp_path)
    h.sections = runbook_sections()
    env_blocks = [b for (lang, info, b) in h.sections["setup"] if lang == "sh" and "env" in info]
    assert len(env_blocks) == 1, "the runbook needs exactly one ```sh env block in 'Before an incident'"
    h.env_block = env_blocks[0]
    h.populate()
    h.sh("systemctl start walship tickets")
    h.wait_replicated(h.s3url, lambda p: rows(p, "SELECT count(*) FROM tickets") == [(60,)])
    yield h
    h.close()


def outage_instant():
    """An instant strictly between earlier commits and the next one (commit times are the
    agent's observation times, which follow the real commit by milliseconds)."""
    time.sleep(1.0)
    t = now_rfc3339()
    time.sleep(0.3)
    return t


# ================================================================ runbook scenarios

def test_runbook_has_every_scenario():
    s = runbook_sections()
    for key in ["setup", "a", "b", "c", "d", "e", "drill"]:
        assert key in s, f"docs/runbook.md has no section for {key}"
        assert key == "setup" or steps(s[key]), f"section {key} has no ```sh steps"
    text = RUNBOOK.read_text()
    assert "bench/README.md" in text and "RPO" in text and "RTO" in text
    # the first host makes the encryption key; a replacement host gets the copy back
    first = "\n".join(b for (lang, info, b) in s["setup"] if lang == "sh" and "provision" in info)
    assert "head -c 32 /dev/urandom" in first and "/etc/walship/tickets.key" in first, "provisioning makes no key"
    again = "\n".join(b for (lang, info, b) in s["d"] if lang == "sh" and "provision" in info)
    assert "tickets.key" in again and "urandom" not in again, "(d) must put the first host's key back, not make one"


def test_runbook_setup_and_drill(host):
    host.run_steps("setup")
    host.run_steps("drill")


def test_runbook_a_database_not_responding(host):
    host.run_steps("a")
    assert host.sh("systemctl is-active walship").strip() == "active"


def test_runbook_b_corrupted_data(host):
    good = table_contents(host.db, ("tickets",))
    host.vars["T"] = outage_instant()
    con = sqlite3.connect(host.db, timeout=10)
    con.execute("PRAGMA busy_timeout=5000")
    con.execute("UPDATE tickets SET estado = '???', prioridad = -1 WHERE id % 2 = 0")   # the buggy job
    con.commit()
    con.close()
    host.wait_replicated(host.s3url, lambda p: rows(p, "SELECT count(*) FROM tickets WHERE prioridad < 0") == [(30,)])
    check, restore, put_in_place = steps(host.sections["b"])
    # A restore that fails (here: a T before the first backup) leaves no file: the check
    # after it does not run, nothing creates an empty database, and the rerun succeeds.
    real_t = host.vars["T"]
    host.vars["T"] = "2001-01-01T00:00:00Z"
    host.run(restore[0], key="b", must_fail=True)
    assert not list((host.dbdir / "restore").glob("tickets-before.db*")), "a failed restore left a file behind"
    host.vars["T"] = real_t
    host.run_steps("b")
    assert table_contents(host.db, ("tickets",)) == good
    # Step 2 again: the scratch copy is replaced. Step 3 again, with no copy: it refuses and
    # changes nothing (the restored database stays, the application and walship keep running).
    host.run(restore[0], restore[1], "b")
    (host.dbdir / "restore" / "tickets-before.db").unlink()
    damaged = sorted((host.dbdir / "restore").glob("damaged-*"))
    ino = os.stat(host.db).st_ino
    host.run(put_in_place[0], key="b", must_fail=True)
    assert os.stat(host.db).st_ino == ino and sorted((host.dbdir / "restore").glob("damaged-*")) == damaged
    assert host.sh("systemctl is-active tickets walship").split() == ["active", "active"]
    assert table_contents(host.db, ("tickets",)) == good
    assert rows(host.db, "PRAGMA integrity_check") == [("ok",)]
    # the new generation is being replicated: a fresh latest restore has the good data
    host.wait_replicated(host.s3url, lambda p: table_contents(p, ("tickets",)) == good)
    # the agent got WALSHIP_WEBHOOK_URL (the unit's credentials.env) and announced the new generation
    deadline = time.time() + 30
    while not any("new generation" in m for m in host.webhook.posts):
        assert time.time() < deadline, f"no webhook post about the new generation: {host.webhook.posts}"
        time.sleep(0.2)


def test_runbook_c_accidental_deletion(host):
    before_t = rows(host.db, "SELECT * FROM tickets WHERE usuario_id = 3 ORDER BY id")
    before_i = rows(host.db, "SELECT * FROM interacciones WHERE ticket_id IN "
                             "(SELECT id FROM tickets WHERE usuario_id = 3) ORDER BY id")
    assert len(before_t) == 12 and before_i
    host.vars["T"] = outage_instant()
    con = sqlite3.connect(host.db, timeout=10, isolation_level=None)
    con.execute("PRAGMA busy_timeout=5000")
    con.execute("BEGIN IMMEDIATE")
    con.execute("DELETE FROM interacciones WHERE ticket_id IN (SELECT id FROM tickets WHERE usuario_id = 3)")
    con.execute("DELETE FROM tickets WHERE usuario_id = 3")
    con.execute("COMMIT")
    con.close()
    time.sleep(1.0)   # the app keeps writing after the accident
    host.run_steps("c")
    for body, _ in steps(host.sections["c"]):   # every step is safe to run again
        host.run(body, None, "c")
    assert rows(host.db, "SELECT * FROM tickets WHERE usuario_id = 3 ORDER BY id") == before_t
    assert rows(host.db, "SELECT * FROM interacciones WHERE ticket_id IN "
                         "(SELECT id FROM tickets WHERE usuario_id = 3) ORDER BY id") == before_i
    heartbeats = rows(host.db, "SELECT count(*) FROM interacciones WHERE texto = 'app heartbeat'")[0][0]
    assert heartbeats > 0, "the app's writes after the accident must survive the selective recovery"
    host.wait_replicated(host.s3url, lambda p: rows(p, "SELECT count(*) FROM tickets WHERE usuario_id = 3") == [(12,)])


def test_runbook_d_lost_host(host):
    tickets = table_contents(host.db, ("usuarios", "tickets"))
    host.kill9("tickets")
    time.sleep(1.0)     # the agent ships the app's last commits
    shipped = table_contents(host.latest_from(host.s3url), ("interacciones",))
    host.kill9("walship")
    shutil.rmtree(host.tmp / "var")           # the host is gone, with its local directory replica
    host.dbdir.mkdir(parents=True)            # the ```sh provision block's effect on the new host
    host.backups.mkdir(parents=True)          # (/etc/walship/ keeps the first host's key: its off-host copy)
    host.run_steps("d")
    assert table_contents(host.db, ("usuarios", "tickets")) == tickets
    got = rows(host.db, "SELECT count(*) FROM interacciones WHERE texto <> 'app heartbeat'")
    assert got == [(130,)]
    assert len(rows(host.db, "SELECT * FROM interacciones")) >= len(shipped["interacciones"])
    gens = json.loads(subprocess.run([str(WALSHIP), "list", host.s3url, "--json", "--encryption-key-file", str(host.key)],
                                     capture_output=True, text=True, env={**host.env(), **host.s3.env()}, check=True).stdout)
    assert len(gens) == 2, "replicating the restored database starts a new generation"


def test_runbook_e_replica_region_down(host):
    host.s3.stop()                            # the primary region is down
    con = sqlite3.connect(host.db, timeout=10)
    con.execute("PRAGMA busy_timeout=5000")
    con.execute("INSERT INTO tickets VALUES(1000, 2, 'written during outage', 'abierto', 1, 0)")
    con.commit()
    con.close()
    host.wait_replicated("file://" + str(host.backups),
                         lambda p: rows(p, "SELECT count(*) FROM tickets WHERE id = 1000") == [(1,)])
    deadline = time.time() + 90               # the first failure is logged after the request's own retries
    while "upload failed" not in (host.state / "walship.log").read_text():
        assert time.time() < deadline, "walship did not log the failed upload"
        time.sleep(0.3)
    while True:                               # the agent's status shows the primary falling behind
        report = json.loads(host.sh('walship status --config "$CONFIG" --json'))["databases"][0]["status"]
        lag = {r["url"]: r["lag_seconds"] for r in report["replicas"]}
        if lag[host.s3url] >= 2:
            break
        assert time.time() < deadline, f"the primary's lag does not grow: {report}"
        time.sleep(0.3)
    n = len(steps(host.sections["e"]))
    host.run_steps("e", 0, n - 1)             # during the outage
    host.s3.restart()                         # the region is back
    host.wait_replicated(host.s3url, lambda p: rows(p, "SELECT count(*) FROM tickets WHERE id = 1000") == [(1,)],
                         timeout=120)
    host.run_steps("e", n - 1)                # after it


def test_sample_config_is_accepted_by_walship(walship_bin, tmp_path):
    """walship parses deploy/walship.yml: the first complaint must be the (absent) database,
    not the file. The key file it names is made for the test (its path rewritten)."""
    key = tmp_path / "tickets.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    cfg = tmp_path / "walship.yml"
    cfg.write_text((DEPLOY / "walship.yml").read_text().replace("/etc/walship/tickets.key", str(key)))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE0000000000", "AWS_SECRET_ACCESS_KEY": "x" * 40,
           "WALSHIP_WEBHOOK_URL": "https://hooks.example.com/services/T000/B000/XXXX"}
    p = subprocess.run([walship_bin, "replicate", "--config", str(cfg)], capture_output=True,
                       text=True, env=env, timeout=30)
    assert p.returncode != 0 and "/var/lib/tickets/tickets.db does not exist" in p.stderr, p.stderr
