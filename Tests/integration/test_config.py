"""The README's sample config works as written (paths moved to a scratch directory), and bad
configs get one clear error naming their place."""
import os
import re
import sqlite3
import subprocess
import time

from conftest import ROOT, WALSHIP, checkpoint_truncate, create_ticket_db, file_bytes_equal, run_walship
from s3server import S3Server


def readme_sample():
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- sample-config[^>]*-->\s*```yaml\n(.*?)```", text, re.S)
    assert m, "README.md lost its sample config block"
    return m.group(1)


def test_readme_sample_config_replicates_and_restores(tmp_path):
    srv = S3Server(tmp_path / "s3", buckets=["tickets-backup"]).start()
    try:
        scratch = tmp_path / "var-lib-tickets"
        scratch.mkdir()
        cfg = tmp_path / "walship.yml"
        # the sample's metrics port may be taken on a test machine: any free one will do
        cfg.write_text(readme_sample().replace("/var/lib/tickets", str(scratch)).replace("127.0.0.1:9187", "127.0.0.1:0"))
        env = dict(srv.env(), S3_ENDPOINT=srv.endpoint)
        tickets, audit = scratch / "tickets.db", scratch / "audit.db"
        create_ticket_db(tickets, rows=50)
        create_ticket_db(audit, rows=5)
        log = open(tmp_path / "agent.log", "w")
        proc = subprocess.Popen([str(WALSHIP), "replicate", "--config", str(cfg)], stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 30
        while (tmp_path / "agent.log").read_text().count("replicating") < 2 and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "agent.log").read_text()
            time.sleep(0.1)
        for db in (tickets, audit):
            con = sqlite3.connect(db, timeout=5)
            for i in range(30):
                con.execute("INSERT INTO usuarios(nombre, email) VALUES(?, ?)", (f"n{i}", f"e{i}"))
                con.commit()
            con.close()
        time.sleep(1.5)
        proc.terminate()
        assert proc.wait(timeout=60) == 0, (tmp_path / "agent.log").read_text()
        for db in (tickets, audit):
            checkpoint_truncate(db)
        # restore DB --config: first healthy replica (S3 here), then with S3 down, the directory.
        out = tmp_path / "t1.db"
        p = run_walship("restore", tickets, "--config", cfg, "-o", out, env=env)
        assert p.returncode == 0, p.stderr
        assert file_bytes_equal(tickets, out)
        srv.stop()
        out2 = tmp_path / "t2.db"
        p = run_walship("restore", tickets, "--config", cfg, "-o", out2, env=env, timeout=600)
        assert p.returncode == 0, p.stderr
        assert file_bytes_equal(tickets, out2)
        out3 = tmp_path / "a.db"
        p = run_walship("restore", audit, "--config", cfg, "-o", out3, env=env)
        assert p.returncode == 0, p.stderr
        assert file_bytes_equal(audit, out3)
        assert (scratch / "audit.db-replica").is_dir()
    finally:
        srv.stop()


def test_bad_configs_name_their_place(tmp_path):
    db = tmp_path / "a.db"
    create_ticket_db(db)
    cases = {
        "unknown key": (f"databases:\n  - path: {db}\n    colour: red\n", "databases[0]: unknown key 'colour'"),
        "bad duration": (f"databases:\n  - path: {db}\n    sync-interval: 5x\n", "databases[0].sync-interval"),
        "missing bucket": (f"databases:\n  - path: {db}\n    replicas:\n      - url: s3:///p?endpoint=http://127.0.0.1:1\n", "bucket name is missing"),
        "duplicate": (f"databases:\n  - path: {db}\n  - path: {db}\n", "listed twice"),
        "unset variable": (f"databases:\n  - path: ${{NOPE_NOT_SET}}\n", "${NOPE_NOT_SET} is not set"),
        "no databases": ("defaults:\n  sync-interval: 1s\n", "databases"),
        "not yaml": ("databases: [\n", "not valid YAML"),
        "shared database id": (f"databases:\n  - path: {db}\n    database-id: 00000000000000a1\n"
                               f"  - path: {tmp_path / 'b.db'}\n    database-id: 00000000000000a1\n", "databases[1].database-id"),
        "bad database id": (f"databases:\n  - path: {db}\n    database-id: a1\n", "16 hexadecimal digits"),
        "bad default": (f"defaults:\n  sync-interval: 1ms\ndatabases:\n  - path: {db}\n", "defaults.sync-interval: must be at least 10ms"),
        "credentials on a directory replica": (f"databases:\n  - path: {db}\n    replicas:\n      - url: file://{tmp_path}/r\n        region: eu-west-1\n",
                                               "databases[0].replicas[0]: access-key-id, secret-access-key, session-token and region do not apply to file replicas"),
        "database id in defaults": (f"defaults:\n  database-id: 00000000000000a1\ndatabases:\n  - path: {db}\n", "unknown key 'database-id'"),
    }
    env = dict(os.environ, AWS_ACCESS_KEY_ID="AKIAWALSHIPTEST0001", AWS_SECRET_ACCESS_KEY="x" * 40)
    env.pop("NOPE_NOT_SET", None)
    for name, (text, expected) in cases.items():
        cfg = tmp_path / f"{name.replace(' ', '-')}.yml"
        cfg.write_text(text)
        p = run_walship("replicate", "--config", cfg, env=env, timeout=30)
        assert p.returncode == 1, (name, p.returncode, p.stderr)
        lines = [l for l in p.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("walship: error:"), (name, p.stderr)
        assert expected in lines[0] and cfg.name in lines[0], (name, lines[0])


def test_the_command_line_and_the_config_file_take_the_same_values(tmp_path):
    """Each option `replicate` takes both as --KEY and as KEY: in a file is refused or taken the
    same way by both, with the same message. They drifted: a file took checkpoint-frames: 5,
    which the command line refused, and the command line refused --verify-interval 0 (never),
    which the file took (as 0s)."""
    db = tmp_path / "a.db"
    create_ticket_db(db, rows=1)
    refused = [("sync-interval", "5ms"), ("sync-interval", "x"), ("snapshot-interval", "soon"),
               ("checkpoint-frames", "5"), ("checkpoint-frames", "ten"), ("read-delay", "-1s"),
               ("spool-limit", "lots"), ("retention", "500ms"), ("compaction", "1h,5m"), ("fine-window", "x"),
               ("verify-interval", "500ms"), ("webhook-url", "ftp://x"), ("alert-lag", "x"),
               ("alert-sync-failure", "x")]
    for key, value in refused:
        cli = run_walship("replicate", db, "--spool-dir", tmp_path / "spool", f"--{key}={value}", timeout=30)
        cfg = tmp_path / "c.yml"
        cfg.write_text(f"databases:\n  - path: {db}\n    spool-dir: {tmp_path / 'spool'}\n    {key}: '{value}'\n")
        conf = run_walship("replicate", "--config", cfg, timeout=30)
        assert cli.returncode != 0 and conf.returncode != 0, (key, value, cli.stderr, conf.stderr)
        cli_why = cli.stderr.strip().splitlines()[-1].split(f"--{key}: ", 1)[-1].split(" (see `walship replicate --help`)")[0]
        conf_why = conf.stderr.strip().splitlines()[-1].split(f"databases[0].{key}: ", 1)[-1]
        assert cli_why == conf_why and cli_why, (key, value, cli.stderr, conf.stderr)
    # Taken by both: a run that gets past its options reaches the database (here a missing one).
    missing = tmp_path / "missing.db"
    for key, value in [("verify-interval", "0s"), ("checkpoint-frames", "10"), ("compaction", "off")]:
        cli = run_walship("replicate", missing, f"--{key}", value, timeout=30)
        cfg = tmp_path / "ok.yml"
        cfg.write_text(f"databases:\n  - path: {missing}\n    {key}: '{value}'\n")
        conf = run_walship("replicate", "--config", cfg, timeout=30)
        for p in (cli, conf):
            assert p.returncode != 0 and "does not exist" in p.stderr, (key, value, p.stderr)
    # Every shared option is on the command line, with its help.
    help_text = run_walship("replicate", "--help", timeout=30).stdout
    for key in {k for k, _ in refused}:
        assert f"--{key} <" in help_text, key
    # Commands that only read the replicas do not fail over a value only `replicate` uses.
    good, bad = tmp_path / "good.yml", tmp_path / "bad.yml"
    good.write_text(f"databases:\n  - path: {db}\n")
    bad.write_text(f"databases:\n  - path: {db}\n    checkpoint-frames: 5\n    sync-interval: 1ms\n")
    want = run_walship("list", "--config", good, db, timeout=30)
    got = run_walship("list", "--config", bad, db, timeout=30)
    # (no replica yet: both get past the file and stop at the replica, the same way)
    assert "not a walship replica" in want.stderr, want.stderr
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr), (want.stderr, got.stderr)
    assert "checkpoint-frames" not in got.stderr and "sync-interval" not in got.stderr, got.stderr


def test_relative_paths_in_a_config_are_relative_to_the_file(tmp_path):
    """A relative `path:` (and spool-dir, key-file) resolved against the directory the
    command ran in, so the same file named another database from elsewhere."""
    conf_dir, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    conf_dir.mkdir()
    elsewhere.mkdir()
    create_ticket_db(conf_dir / "app.db", rows=1)
    cfg = conf_dir / "walship.yml"
    cfg.write_text("databases:\n  - path: app.db\n    spool-dir: spool\n")
    p = subprocess.run([str(WALSHIP), "status", "--config", str(cfg)], capture_output=True, text=True, cwd=elsewhere)
    assert p.returncode == 3 and str(conf_dir / "app.db") in p.stdout + p.stderr, p.stdout + p.stderr
    assert str(elsewhere) not in p.stdout + p.stderr, p.stdout + p.stderr
