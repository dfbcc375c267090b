"""Shared fixtures for walship's integration tests.

Everything here is real: SQLite files written by separate Python processes, the walship
binary built by `make build`, directory replicas on disk. Nothing is mocked.
"""
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# WALSHIP_BIN points the tests at another build of the binary (default: `make build`'s).
WALSHIP = Path(os.environ.get("WALSHIP_BIN") or ROOT / ".build" / "release" / "walship")
HERE = Path(__file__).resolve().parent


def require_tool(name, hint):
    path = shutil.which(name)
    if not path:
        pytest.fail(f"{name} is not installed: {hint}")
    return path


@pytest.fixture(scope="session")
def walship_bin():
    if not WALSHIP.exists():
        pytest.fail(f"{WALSHIP} is missing: run `make build` (or `make test`) first")
    return str(WALSHIP)


def run_walship(*args, check=False, timeout=300, env=None):
    """Runs the walship CLI, returns CompletedProcess with text output."""
    p = subprocess.run([str(WALSHIP), *map(str, args)], capture_output=True, text=True,
                       timeout=timeout, env=env)
    if check and p.returncode != 0:
        raise AssertionError(f"walship {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


class AgentProcess:
    """A `walship replicate` process with its log in a file."""

    def __init__(self, db, replicas=(), args=(), log_path=None, env=None):
        self.db = str(db)
        self.replicas = [str(r) for r in replicas]
        self.args = [str(a) for a in args]
        self.log_path = Path(log_path or (str(db) + ".agent.log"))
        self.env = env
        self.proc = None

    def start(self):
        self.log = open(self.log_path, "a")
        self.proc = subprocess.Popen([str(WALSHIP), "replicate", self.db, *self.replicas, *self.args],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=self.env)
        return self

    def wait_ready(self, timeout=30):
        """Waits until the agent logs that it is replicating."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"agent exited early ({self.proc.returncode}):\n{self.read_log()}")
            if "replicating" in self.read_log():
                return self
            time.sleep(0.05)
        raise AssertionError(f"agent not ready after {timeout}s:\n{self.read_log()}")

    def wait_for_log(self, text, timeout=30):
        """Waits until the agent's log contains text."""
        deadline = time.time() + timeout
        while text not in self.read_log() and time.time() < deadline:
            time.sleep(0.1)
        assert text in self.read_log(), f"agent never logged {text!r}:\n{self.read_log()[-3000:]}"

    def read_log(self):
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    def stop(self, timeout=60):
        """SIGTERM: the agent ships everything committed, then exits 0."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            rc = self.proc.wait(timeout=timeout)
            assert rc == 0, f"agent exited {rc} on SIGTERM:\n{self.read_log()}"
        self.log.close()

    def kill9(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)
        self.log.close()

    def rss_peak_kb(self):
        """VmHWM of the running agent, in kB."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        return None


@pytest.fixture
def agent_factory():
    agents = []

    def make(*a, **kw):
        ag = AgentProcess(*a, **kw)
        agents.append(ag)
        return ag

    yield make
    for ag in agents:
        if ag.proc and ag.proc.poll() is None:
            ag.kill9()


TICKET_SCHEMA = """
CREATE TABLE IF NOT EXISTS usuarios(id INTEGER PRIMARY KEY, nombre TEXT NOT NULL, email TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tickets(id INTEGER PRIMARY KEY, usuario_id INTEGER NOT NULL REFERENCES usuarios(id),
    titulo TEXT NOT NULL, estado TEXT NOT NULL, prioridad INTEGER NOT NULL, creado REAL NOT NULL);
CREATE TABLE IF NOT EXISTS interacciones(id INTEGER PRIMARY KEY, ticket_id INTEGER NOT NULL REFERENCES tickets(id),
    texto TEXT NOT NULL, creado REAL NOT NULL);
"""


def create_ticket_db(path, page_size=None, rows=0):
    """Creates the ticket-system database in WAL mode, optionally with some rows."""
    con = sqlite3.connect(str(path), timeout=10)
    if page_size:
        con.execute(f"PRAGMA page_size={page_size}")
    con.execute("PRAGMA journal_mode=WAL")
    con.executescript(TICKET_SCHEMA)
    for i in range(rows):
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)", (f"u{i}", f"u{i}@example.com"))
    con.commit()
    con.close()


def checkpoint_truncate(path):
    con = sqlite3.connect(str(path), timeout=30)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.close()


def table_contents(path, tables=("usuarios", "tickets", "interacciones")):
    """Every row of every table, sorted, for exact comparisons."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=30)
    out = {t: con.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in tables}
    con.close()
    return out


def assert_restores_exact(db, replicas, out_dir, env=None):
    """Restores the latest state from each (url, name) into out_dir; each must equal db byte for
    byte (checkpoint db first)."""
    for url, name in replicas:
        out = out_dir / f"latest-{name}.db"
        p = run_walship("restore", url, "-o", out, env=env)
        assert p.returncode == 0, p.stderr
        assert file_bytes_equal(db, out), f"the {name} replica is not exact"


def swap_paths(a, b):
    """Exchanges two paths in one step (renameat2 RENAME_EXCHANGE): neither is ever missing,
    as a replica that becomes unreachable and comes back would look to an agent."""
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    if libc.renameat2(at_fdcwd, os.fsencode(str(a)), at_fdcwd, os.fsencode(str(b)), rename_exchange) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(a))


def unreachable(replica, away):
    """Puts a plain file where the replica directory was (moved to `away`), in one step."""
    Path(away).write_text("the replica is unreachable for a while\n")
    swap_paths(replica, away)


def reachable(replica, away):
    """Undoes `unreachable`, in one step."""
    swap_paths(replica, away)
    os.unlink(away)


def file_bytes_equal(a, b):
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(1 << 20), fb.read(1 << 20)
            if x != y:
                return False
            if not x:
                return True


@pytest.fixture(scope="session")
def clock_shift_lib(tmp_path_factory):
    """Builds the preload shim that shifts a process's wall clock (WALSHIP_CLOCK_SHIFT_US)."""
    cc = require_tool("cc", "install gcc (build-essential)")
    out = tmp_path_factory.mktemp("shims") / "clockshift.so"
    p = subprocess.run([cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(HERE / "shims" / "clockshift.c"), "-ldl"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return str(out)


def shifted_clock_env(lib, shift_us, base=None):
    """An environment whose processes see the wall clock moved by shift_us microseconds."""
    e = dict(base or os.environ)
    e["LD_PRELOAD"] = lib
    e["WALSHIP_CLOCK_SHIFT_US"] = str(int(shift_us))
    return e
