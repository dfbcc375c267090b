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
