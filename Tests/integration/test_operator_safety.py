"""Operator safety: what an operator does by the book (init containers, replica-list changes,
one-off snapshots) never leaves the application on an empty database or a replica that
cannot be restored."""
import socket
import time

from conftest import create_ticket_db, run_walship
from s3server import s3server  # noqa: F401  (fixture)


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def test_if_replica_exists_skips_only_a_replica_that_answers_empty(tmp_path, s3server, agent_factory):
    """`restore --if-replica-exists` printed "no replica at ..." and exited 0 on any error: a
    wrong secret, a missing bucket, a prefix that holds something else, a refused connection.
    In an init container that starts the application on an empty database. Now only a
    replica that answers and holds nothing is skipped; every other answer fails."""
    out = tmp_path / "app.db"

    def restore(url, env=None):
        return run_walship("restore", url, "-o", out, "--if-not-exists", "--if-replica-exists", env=env)

    # Truly empty: an existing bucket with nothing under the prefix, an empty directory.
    p = restore(s3server.url("walship", "fresh"), env=s3server.env())
    assert p.returncode == 0 and not out.exists(), p.stdout + p.stderr
    empty_dir = tmp_path / "empty-replica"
    empty_dir.mkdir()
    p = restore("file://" + str(empty_dir))
    assert p.returncode == 0 and not out.exists(), p.stdout + p.stderr

    # A replica with a backup behind each failure.
    db = tmp_path / "src.db"
    create_ticket_db(db, rows=3)
    agent = agent_factory(db, [s3server.url("walship", "team/app")], ["--sync-interval", "100ms"],
                          env=s3server.env()).start().wait_ready()
    agent.stop()
    failures = {
        "wrong secret": (s3server.url("walship", "team/app"), s3server.env(secret_key="not-the-secret")),
        "missing bucket": (s3server.url("no-such-bucket", "team/app"), s3server.env()),
        "prefix one level short": (s3server.url("walship", "team"), s3server.env()),
        "refused connection": (s3server.url("walship", "team/app").replace(f":{s3server.port}", f":{_free_port()}"), s3server.env()),
        "missing directory": ("file://" + str(tmp_path / "no-such-dir" / "replica"), None),
        "directory of other files": ("file://" + str(tmp_path), None),
    }
    for what, (url, env) in failures.items():
        p = restore(url, env)
        assert p.returncode != 0, f"{what}: exited 0 ({p.stdout}{p.stderr})"
        assert not out.exists(), what
    # And the real one restores.
    p = restore(s3server.url("walship", "team/app"), s3server.env())
    assert p.returncode == 0 and out.exists(), p.stdout + p.stderr


def test_if_replica_exists_with_a_config_fails_when_a_replica_cannot_answer(tmp_path, s3server):
    """With --config, every replica empty means no backup; one that cannot be reached (the
    others empty) means nobody knows: fail."""
    out = tmp_path / "app.db"
    empty_dir = tmp_path / "dir-replica"
    empty_dir.mkdir()
    cfg = tmp_path / "walship.yml"

    def write(first_url):
        cfg.write_text(f"databases:\n  - path: {tmp_path / 'app.db'}\n    replicas:\n"
                       f"      - url: {first_url}\n      - url: file://{empty_dir}\n")
    write(s3server.url("walship", "fresh"))
    p = run_walship("restore", "--config", cfg, tmp_path / "app.db", "--if-not-exists", "--if-replica-exists", env=s3server.env())
    assert p.returncode == 0 and not out.exists(), p.stdout + p.stderr
    p = run_walship("restore", "--config", cfg, tmp_path / "app.db", "--if-not-exists", "--if-replica-exists",
                    env=s3server.env(secret_key="not-the-secret"))
    assert p.returncode != 0 and not out.exists(), p.stdout + p.stderr


def _write(db, n, tag):
    import sqlite3
    con = sqlite3.connect(db, timeout=10)
    for i in range(n):
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)", (f"{tag}{i}", f"{tag}{i}@example.com"))
        con.commit()
    con.close()


def _restores_to(db, url, out, env):
    from conftest import table_contents
    if out.exists():
        out.unlink()
    p = run_walship("restore", url, "-o", out, env=env)
    assert p.returncode == 0, f"{url} cannot be restored: {p.stderr}"
    assert table_contents(out) == table_contents(db), f"{url} restores another state than the database's"


def test_changing_the_replica_list_never_leaves_a_replica_unrestorable(tmp_path, s3server, agent_factory):
    """Replica lists change between runs. A replica left out of a run misses what the others
    took (the spool keeps an object only until every replica of the run has it): with A
    back in the list, the agent shipped it segments after a hole, and A's latest state
    could not be restored ("gap after txid 17"). Now a replica is checked (one LIST of the
    generation) before the first object the agent ships to it in a run, and one that lacks
    the base or missed objects gets a new generation, with a snapshot, before anything else.
    The same holds for a replica emptied while the agent was stopped."""
    db = tmp_path / "x.db"
    create_ticket_db(db, rows=2)
    env = s3server.env()
    url = {n: s3server.url("walship", n) for n in "abc"}
    out = tmp_path / "out.db"
    phases = [("a",), ("b",), ("a", "c"), ("c",), ("a", "c"), ("b", "c")]
    for i, names in enumerate(phases):
        agent = agent_factory(db, [url[n] for n in names], ["--sync-interval", "100ms"], env=env,
                              log_path=tmp_path / f"agent-{i}.log").start().wait_ready()
        _write(db, 5, f"p{i}-")
        time.sleep(1.0)
        agent.stop()
        for n in names:
            _restores_to(db, url[n], out, env)
    _delete_all(s3server, env, "c")
    agent = agent_factory(db, [url["c"]], ["--sync-interval", "100ms"], env=env, log_path=tmp_path / "agent-wiped.log").start().wait_ready()
    _write(db, 5, "wiped-")
    time.sleep(1.0)
    agent.stop()
    _restores_to(db, url["c"], out, env)


def _start_config_agent(cfg, env, log, dir_replica, s3server, prefix):
    """`walship replicate --config cfg`, once both replicas hold a snapshot."""
    import subprocess
    from conftest import WALSHIP
    agent = subprocess.Popen([str(WALSHIP), "replicate", "--config", str(cfg)], env=env,
                             stdout=open(log, "a"), stderr=subprocess.STDOUT)
    deadline = time.time() + 30
    while not list(dir_replica.glob("generations/*/snapshots/*")) or not s3server.objects("walship", prefix):
        if time.time() > deadline or agent.poll() is not None:
            agent.terminate()
            raise AssertionError(log.read_text())
        time.sleep(0.1)
    return agent


def _database_with_two_replicas(tmp_path, s3server):
    """A ticket database and a config that replicates it to S3 (prefix x) and a directory."""
    db = tmp_path / "x.db"
    create_ticket_db(db, rows=2)
    dir_replica = tmp_path / "dir-replica"
    cfg = tmp_path / "walship.yml"
    cfg.write_text(f"defaults:\n  sync-interval: 100ms\ndatabases:\n  - path: {db}\n    replicas:\n"
                   f"      - url: {s3server.url('walship', 'x')}\n      - url: file://{dir_replica}\n")
    return db, s3server.env(), dir_replica, cfg


def _replicate_a_while(cfg, env, log, dir_replica, s3server, db):
    """Runs the config agent, writes five rows, lets them ship, stops the agent."""
    agent = _start_config_agent(cfg, env, log, dir_replica, s3server, "x")
    try:
        _write(db, 5, "before-")
        time.sleep(1.0)
    finally:
        agent.terminate()
        agent.wait(timeout=60)


def test_snapshot_while_the_agent_is_stopped_keeps_the_configured_replicas_whole(tmp_path, s3server):
    """`walship snapshot DB` with the agent stopped shipped to the default replica beside the
    database, not the configured ones, and left those with a gap. It now takes `--config`,
    and without it refuses to ship to other replicas than the spool's last run."""
    db, env, dir_replica, cfg = _database_with_two_replicas(tmp_path, s3server)
    _replicate_a_while(cfg, env, tmp_path / "agent.log", dir_replica, s3server, db)
    _write(db, 3, "while-stopped-")
    p = run_walship("snapshot", db, env=env)
    assert p.returncode != 0 and "was last replicated to" in p.stderr, f"shipped elsewhere: {p.stdout}{p.stderr}"
    assert not (tmp_path / "x.db-replica").exists()
    p = run_walship("snapshot", "--config", cfg, db, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    out = tmp_path / "out.db"
    for url in (s3server.url("walship", "x"), f"file://{dir_replica}"):
        _restores_to(db, url, out, env)
        p = run_walship("verify", url, env=env)
        assert p.returncode == 0, p.stdout + p.stderr


def test_reading_commands_take_the_config_and_need_only_its_variables(tmp_path, s3server, agent_factory):
    """The sample config turns encryption on, but `verify` and `list` took no --config (so no
    key), and every command failed on an unset variable it did not need
    (`${WALSHIP_WEBHOOK_URL}`). Now list, verify, restore, snapshot and status read the
    config, with its key; only `replicate` needs every variable; `${NAME:-default}` gives a
    value that may be unset, and an empty S3 endpoint means AWS."""
    import json
    import os
    from conftest import table_contents
    db = tmp_path / "x.db"
    create_ticket_db(db, rows=4)
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, 0o600)
    dir_replica = tmp_path / "dir-replica"
    cfg = tmp_path / "walship.yml"
    cfg.write_text(
        "defaults:\n  sync-interval: 100ms\n  webhook-url: ${WALSHIP_WEBHOOK_URL}\n"
        f"databases:\n  - path: {db}\n    encryption:\n      key-file: {key}\n    replicas:\n"
        f"      - url: s3://walship/x?endpoint=${{TEST_S3_ENDPOINT}}&region=us-east-1&path-style=true\n"
        f"      - url: file://{dir_replica}\n")
    env = s3server.env()
    env.pop("WALSHIP_WEBHOOK_URL", None)
    env["TEST_S3_ENDPOINT"] = s3server.endpoint
    p = run_walship("replicate", "--config", cfg, env=env, timeout=30)
    assert p.returncode == 1 and "WALSHIP_WEBHOOK_URL" in p.stderr, p.stderr   # replicate needs it
    env_agent = dict(env, WALSHIP_WEBHOOK_URL="http://127.0.0.1:9/hook")
    agent = _start_config_agent(cfg, env_agent, tmp_path / "agent.log", dir_replica, s3server, "x")
    try:
        _write(db, 3, "more-")
        time.sleep(1.0)
        p = run_walship("status", "--config", cfg, env=env)
        assert p.returncode == 0 and str(db) in p.stdout, p.stdout + p.stderr
    finally:
        agent.terminate()
        agent.wait(timeout=60)
    p = run_walship("list", "--config", cfg, db, "--json", env=env)
    assert p.returncode == 0, p.stderr
    listing = json.loads(p.stdout)
    assert len(listing) == 2 and all("encrypted with this key" in g[-1]["encryption"] for g in listing.values()), p.stdout
    assert "\\/" not in p.stdout
    p = run_walship("verify", "--config", cfg, db, env=env)
    assert p.returncode == 0 and p.stdout.count(": OK") == 2, p.stdout + p.stderr
    out = tmp_path / "out.db"
    p = run_walship("restore", "--config", cfg, db, "-o", out, env=env)
    assert p.returncode == 0 and table_contents(out) == table_contents(db), p.stdout + p.stderr
    p = run_walship("snapshot", "--config", cfg, db, env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    # ${NAME:-} unset, and the endpoint it leaves empty means AWS: the file loads.
    aws = tmp_path / "aws.yml"
    aws.write_text(f"databases:\n  - path: {db}\n    replicas:\n"
                   "      - url: s3://bucket/app?endpoint=${TEST_UNSET_ENDPOINT:-}&region=eu-west-1\n")
    env.pop("TEST_UNSET_ENDPOINT", None)
    p = run_walship("status", "--config", aws, env=env)
    assert p.returncode == 3 and "error" not in p.stderr, p.stdout + p.stderr   # 3: no agent runs


def test_common_mistakes_get_one_clear_answer(tmp_path, agent_factory):
    """Small things a new user hit, each with the answer it now gets."""
    import json
    import sqlite3
    db = tmp_path / "x.db"
    create_ticket_db(db, rows=2)
    replica = tmp_path / "replica"
    # A log level that does not exist was taken for "info".
    p = run_walship("replicate", db, "--log-level", "verbose", timeout=30)
    assert p.returncode != 0 and "--log-level must be one of" in p.stderr, p.stderr
    # A parse error points at the subcommand's help, not the top-level one.
    p = run_walship("restore", "file://" + str(replica), "-o", tmp_path / "o.db", "--txid", "x")
    assert p.returncode != 0 and "walship restore --help" in p.stderr, p.stderr
    # A missing file is said once.
    p = run_walship("verify", "--config", tmp_path / "missing.yml", db)
    assert p.returncode != 0 and p.stderr.lower().count("no such file") == 1, p.stderr
    # A bad replica leaves the database in the journal mode it had.
    plain = tmp_path / "plain.db"
    con = sqlite3.connect(plain)
    con.execute("CREATE TABLE t(a)")
    con.commit()
    con.close()
    p = run_walship("replicate", plain, "s3://bucket/p?endpoint=http://127.0.0.1:1&region=us-east-1",
                    env={**__import__("os").environ, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}, timeout=120)
    assert p.returncode != 0
    con = sqlite3.connect(plain)
    assert con.execute("PRAGMA journal_mode").fetchone()[0] == "delete", "a failed start switched the database to WAL"
    con.close()
    # `snapshot` with nothing new since the last one says so instead of "shipped".
    p = run_walship("snapshot", db, "file://" + str(replica))
    assert p.returncode == 0 and "shipped" in p.stdout, p.stdout + p.stderr
    p = run_walship("snapshot", db, "file://" + str(replica))
    assert p.returncode == 0 and "no new snapshot needed" in p.stdout, p.stdout + p.stderr
    # A time after the newest commit restores the latest state, and says so.
    p = run_walship("restore", "file://" + str(replica), "-o", tmp_path / "late.db", "--timestamp", "2100-01-01T00:00:00Z")
    assert p.returncode == 0 and "after the newest commit the replica holds" in p.stderr, p.stderr
    # -o naming a directory fails before anything is downloaded.
    outdir = tmp_path / "outdir"
    outdir.mkdir()
    for flag in ("--force", "--if-not-exists"):   # neither replaces nor "keeps" a directory
        p = run_walship("restore", "file://" + str(replica), "-o", outdir, flag)
        assert p.returncode == 1 and "is a directory" in p.stderr and "restoring" not in p.stderr, (flag, p.stderr)
    # `status` of a database that does not exist says that, not only "no agent running".
    p = run_walship("status", tmp_path / "typo.db")
    assert p.returncode != 0 and "does not exist" in p.stderr, p.stdout + p.stderr
    # `status --json` is snake_case like `list --json`, and versioned.
    agent = agent_factory(db, ["file://" + str(replica)], ["--sync-interval", "100ms"]).start().wait_ready()
    time.sleep(1.5)
    p = run_walship("status", db, "--json")
    agent.stop()
    out = json.loads(p.stdout)
    assert out["format_version"] == 1 and "last_commit_unix" in out["databases"][0]["status"], p.stdout
    assert "\\/" not in p.stdout


def _delete_all(s3server, env, prefix):
    """Empties a prefix through signed S3 DELETEs, as an operator's tool would."""
    import subprocess
    from s3server import REGION
    for key in s3server.objects("walship", prefix):
        subprocess.run(["curl", "-sf", "-X", "DELETE", "--aws-sigv4", f"aws:amz:{REGION}:s3",
                        "--user", f"{env['AWS_ACCESS_KEY_ID']}:{env['AWS_SECRET_ACCESS_KEY']}",
                        f"{s3server.endpoint}/walship/{key}"], check=True, timeout=30)
    assert not s3server.objects("walship", prefix)


def test_one_off_snapshot_gives_an_emptied_replica_a_new_generation(tmp_path, s3server):
    """`walship snapshot --config` with the agent stopped, after one replica was emptied: the
    replica's copy lacked the generation's base, its backlog was dropped, and the command
    still said "shipped" with nothing usable there. Now the one-off run starts the new
    generation the replica needs, and the replica restores."""
    db, env, dir_replica, cfg = _database_with_two_replicas(tmp_path, s3server)
    _replicate_a_while(cfg, env, tmp_path / "agent.log", dir_replica, s3server, db)
    _delete_all(s3server, env, "x")
    import sqlite3
    con = sqlite3.connect(db)   # kept open: the log stays, so the generation continues
    for i in range(3):
        con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, 'stopped@example.com')", (f"while-stopped-{i}",))
        con.commit()
    p = run_walship("snapshot", "--config", cfg, db, env=env)
    con.close()
    assert p.returncode == 0, p.stdout + p.stderr
    assert "continuity lost" not in p.stderr, p.stderr   # the generation went on: the replica's hole is what is tested
    assert "does not hold generation" in p.stderr, p.stderr
    out = tmp_path / "out.db"
    for url in (s3server.url("walship", "x"), f"file://{dir_replica}"):
        _restores_to(db, url, out, env)


def test_a_replica_down_at_start_does_not_stop_the_others(tmp_path, s3server):
    """The agent refused to start while a replica it had shipped to before was down, so a
    restart during an outage replicated nowhere, not even to the replica that was up. Now a
    known replica that does not answer is retried in the background (a new one must still
    answer at start)."""
    db, env, dir_replica, cfg = _database_with_two_replicas(tmp_path, s3server)
    agent = _start_config_agent(cfg, env, tmp_path / "agent.log", dir_replica, s3server, "x")
    agent.terminate()
    agent.wait(timeout=60)
    s3server.stop()
    import subprocess
    from conftest import WALSHIP
    agent = subprocess.Popen([str(WALSHIP), "replicate", "--config", str(cfg)], env=env,
                             stdout=open(tmp_path / "agent2.log", "a"), stderr=subprocess.STDOUT)
    try:
        _write(db, 5, "during-outage-")
        out = tmp_path / "out.db"
        deadline = time.time() + 30
        while True:   # the directory replica keeps up while S3 is down
            assert agent.poll() is None, (tmp_path / "agent2.log").read_text()
            p = run_walship("restore", f"file://{dir_replica}", "-o", out, "--force")
            from conftest import table_contents
            if p.returncode == 0 and table_contents(out) == table_contents(db):
                break
            assert time.time() < deadline, (tmp_path / "agent2.log").read_text()[-3000:]
            time.sleep(0.3)
        s3server.restart()
        deadline = time.time() + 60
        while True:   # and S3 catches up once it is back
            p = run_walship("restore", s3server.url("walship", "x"), "-o", out, "--force", env=env)
            if p.returncode == 0 and table_contents(out) == table_contents(db):
                break
            assert time.time() < deadline, (tmp_path / "agent2.log").read_text()[-3000:]
            time.sleep(0.5)
    finally:
        agent.terminate()
        agent.wait(timeout=60)
    # A replica this spool never shipped to must answer at start.
    cfg.write_text(cfg.read_text() + f"      - url: file://{tmp_path / 'nowhere' / 'deeper'}\n")
    (tmp_path / "nowhere").write_text("a file where a directory should be")
    p = run_walship("replicate", "--config", cfg, env=env, timeout=60)
    assert p.returncode == 1, p.stdout + p.stderr
