"""The spool has a bound (G7): a replica that stays down past it loses its backlog, never the
disk, and gets a new generation when it returns; the other replica is not affected."""
import json
import os
import time

from conftest import assert_restores_exact, checkpoint_truncate, create_ticket_db, run_walship
from s3server import S3Server
from test_s3 import run_py, WORKLOAD
from workload import chain_problems


def outbox_bytes(db):
    d = os.path.join(os.path.dirname(db), "." + os.path.basename(db) + "-walship", "outbox")
    return sum(os.path.getsize(os.path.join(d, n)) for n in os.listdir(d))


def generations(url, env):
    p = run_walship("list", url, "--json", env=env)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_spool_limit_drops_backlog_of_a_down_replica_then_new_generation(tmp_path, agent_factory):
    srv = S3Server(tmp_path / "s3", buckets=["walship"]).start()
    try:
        env = srv.env()
        s3url = srv.url("walship", "app")
        fileurl = "file://" + str(tmp_path / "file-replica")
        db = tmp_path / "app.db"
        create_ticket_db(db, rows=10)
        agent = agent_factory(db, [s3url, fileurl], ["--sync-interval", "200ms", "--spool-limit", "200KB"],
                              env=env).start().wait_ready()
        # The first generation reaches S3 before the outage (a slow agent may not be there yet
        # when it logs that it is replicating).
        deadline = time.time() + 60
        def first_on_s3():
            p = run_walship("list", s3url, "--json", env=env)   # fails while the prefix is empty
            return p.returncode == 0 and any(g["snapshots"] for g in json.loads(p.stdout))
        while not first_on_s3() and time.time() < deadline:
            time.sleep(0.2)
        assert first_on_s3(), "the first generation never reached S3"
        srv.stop()
        # Write well past the limit while S3 is down.
        for seed in range(4):
            run_py(WORKLOAD, "mixed", db, "--seed", seed, "--tx", 150)
        agent.wait_for_log("dropping that replica's backlog")
        time.sleep(1)
        assert outbox_bytes(db) < 2 * 200 * 1024, outbox_bytes(db)   # the disk is not filled
        # The directory replica kept up all along.
        checkpoint_truncate(db)
        p = run_walship("restore", fileurl, "-o", tmp_path / "from-file.db", env=env)
        assert p.returncode == 0, p.stderr

        srv.start()   # same port
        agent.wait_for_log("it answers again after its backlog was dropped")
        run_py(WORKLOAD, "mixed", db, "--seed", 99, "--tx", 20)
        time.sleep(1.5)
        agent.stop()

        checkpoint_truncate(db)
        assert_restores_exact(db, [(s3url, "s3"), (fileurl, "file")], tmp_path, env=env)
        # S3 got a new generation; its first one stays a consistent (older) history.
        gens = generations(s3url, env)
        assert len(gens) >= 2, gens
        assert gens[-1]["snapshots"], gens[-1]
    finally:
        srv.stop()


def test_dropped_backlog_survives_an_agent_restart(tmp_path, agent_factory):
    """The agent is killed after it dropped a replica's backlog: restarted, it still gives that
    replica a new generation instead of going on in the old one past a hole."""
    srv = S3Server(tmp_path / "s3", buckets=["walship"]).start()
    try:
        env = srv.env()
        s3url = srv.url("walship", "app")
        db = tmp_path / "app.db"
        create_ticket_db(db, rows=10)
        args = ["--sync-interval", "200ms", "--spool-limit", "200KB"]
        agent = agent_factory(db, [s3url], args, env=env).start().wait_ready()
        srv.stop()
        for seed in range(4):
            run_py(WORKLOAD, "mixed", db, "--seed", seed, "--tx", 150)
        agent.wait_for_log("dropping that replica's backlog")
        run_py(WORKLOAD, "mixed", db, "--seed", 50, "--tx", 20)   # shipped after the hole, if nothing remembers it
        time.sleep(0.5)
        agent.kill9()

        srv.start()
        again = agent_factory(db, [s3url], args, env=env, log_path=tmp_path / "again.log").start().wait_ready()
        again.wait_for_log("it answers again after its backlog was dropped")
        run_py(WORKLOAD, "mixed", db, "--seed", 99, "--tx", 20)
        time.sleep(1.5)
        again.stop()

        gens = generations(s3url, env)
        assert len(gens) >= 2 and gens[-1]["snapshots"], gens
        # Within each generation, no hole (between them there is one: the dropped backlog).
        inside = [p for p in chain_problems(gens) if "previous generation ended" not in p]
        assert not inside, inside
        checkpoint_truncate(db)
        assert_restores_exact(db, [(s3url, "s3")], tmp_path, env=env)
    finally:
        srv.stop()
