"""Agent crash: SIGKILL of `walship replicate` at seeded random instants while a separate
writer process commits continuously; restart each time. Nothing acknowledged may be lost,
every generation must chain without gaps, the final state must restore byte-identically and
points in time covered by a running agent must restore exactly."""
import json
import random
import time

import pytest

from conftest import (checkpoint_truncate, create_ticket_db, file_bytes_equal, run_walship,
                      table_contents)
from workload import chain_problems, digest_of, list_generations, rfc3339, start_writer

SEED = 20241214
KILLS = 12
AGENT_ARGS = ["--sync-interval", "200ms", "--checkpoint-frames", "300"]
# An instant is checked by --timestamp only if one agent ran from before its commit until
# this long after its recorded time (so the commit was seen live and shipped before a kill).
SHIP_MARGIN = 1.0


# The default compaction window (5 min) never closes in this test; with 1 s windows kills also
# land while level-1 objects are built in the spool and while they and their deletion lists ship.
@pytest.mark.parametrize("compaction", [None, "1s,1h"], ids=["default", "level1-every-1s"])
def test_sigkill_at_random_instants_then_restart(tmp_path, agent_factory, walship_bin, compaction):
    rng = random.Random(SEED)
    agent_args = AGENT_ARGS + (["--compaction", compaction, "--fine-window", "1h"] if compaction else [])
    db = tmp_path / "tickets.db"
    replica = tmp_path / "replica"
    url = f"file://{replica}"
    create_ticket_db(db, rows=20)

    stop_file = tmp_path / "stop-writer"
    instants_file = tmp_path / "instants.jsonl"
    writer = start_writer("tickets", db, "--seed", SEED, "--stop-file", stop_file,
                          "--instants-file", instants_file, "--rate", 200, "--instant-every", 0.4,
                          log_path=tmp_path / "writer.log")
    windows = []     # (ready, killed) of every agent that became ready
    logs = []
    kill_points = []
    try:
        for i in range(KILLS):
            ag = agent_factory(db, [url], args=agent_args, log_path=tmp_path / f"agent-{i:02d}.log")
            logs.append(ag.log_path)
            ag.start()
            if rng.random() < 0.25:
                # kill during start-up (state load, snapshot of a new generation, catch-up)
                time.sleep(rng.uniform(0.0, 0.5))
                kill_points.append("startup")
                ag.kill9()
            else:
                ag.wait_ready()
                ready = time.time()
                time.sleep(rng.uniform(0.3, 4.0))
                killed = time.time()
                ag.kill9()
                windows.append((ready, killed))
                kill_points.append(f"after {killed - ready:.2f}s")
            assert writer.poll() is None, f"writer died: {(tmp_path / 'writer.log').read_text()}"
            time.sleep(rng.uniform(0.0, 1.2))   # agent down, writer keeps committing

        final = agent_factory(db, [url], args=agent_args, log_path=tmp_path / "agent-final.log")
        logs.append(final.log_path)
        final.start().wait_ready()
        ready = time.time()
        time.sleep(3)
        stop_file.write_text("stop")
        writer.wait(timeout=60)
        assert writer.returncode == 0, (tmp_path / "writer.log").read_text()
        time.sleep(1.0)
        stopped = time.time()
        final.stop()
        windows.append((ready, stopped))
    finally:
        stop_file.write_text("stop")
        if writer.poll() is None:
            writer.wait(timeout=60)

    problems = []
    log_text = [p.read_text() for p in logs]
    continued = sum("continuing generation" in t for t in log_text[1:])
    new_gens = sum("starting a new generation" in t for t in log_text[1:])
    for n, t in enumerate(log_text):
        for line in t.splitlines():
            if " error " in line or "critical" in line:
                problems.append(f"agent run {n} logged an error: {line}")

    # 1. every generation chains with no gap from its snapshot
    gens = list_generations(walship_bin, url)
    problems += chain_problems(gens)
    level1 = sum(1 for g in gens for s in g["segments"] if s["level"] == "1")

    # 2. the latest state restores byte-identically after the final clean stop
    checkpoint_truncate(db)
    out = tmp_path / "latest.db"
    p = run_walship("restore", url, "-o", out)
    if p.returncode != 0:
        problems.append(f"restore latest failed: {p.stderr}")
    else:
        assert p.stdout.startswith(f"restored {out}: generation "), p.stdout
        if not file_bytes_equal(db, out):
            problems.append("latest restore is not byte-identical to the source: "
                            f"{table_contents(out) == table_contents(db)=}")

    # 3. PITR exactness at instants recorded by the writer
    instants = [json.loads(l) for l in instants_file.read_text().splitlines() if l.strip()]
    covered = [x for x in instants
               if any(r <= x["t_commit"] and x["t"] + SHIP_MARGIN <= k for r, k in windows)]
    checked = covered if len(covered) <= 40 else random.Random(SEED + 1).sample(covered, 40)
    pitr_bad = []
    for k, x in enumerate(sorted(checked, key=lambda x: x["t"])):
        o = tmp_path / f"pitr-{k}.db"
        p = run_walship("restore", url, "-o", o, "--timestamp", rfc3339(x["t"]), "--integrity", "quick")
        if p.returncode != 0:
            pitr_bad.append(f"t={rfc3339(x['t'])}: restore failed: {p.stderr.strip()}")
            continue
        got = table_contents(o)
        if digest_of(got) != x["digest"]:
            pitr_bad.append(f"t={rfc3339(x['t'])} (commit {rfc3339(x['t_commit'])}): rows "
                            f"{ {t: len(v) for t, v in got.items()} } expected {x['rows']}; {p.stdout.strip()}")
        o.unlink()
    problems += pitr_bad

    summary = {
        "kills": KILLS, "kill_points": kill_points, "restarts_continued": continued,
        "restarts_new_generation": new_gens, "generations": len(gens),
        "instants": len(instants), "instants_covered": len(covered), "instants_checked": len(checked),
        "pitr_mismatches": len(pitr_bad), "level1_objects": level1,
    }
    print("crash summary:", json.dumps(summary))
    (tmp_path / "summary.json").write_text(json.dumps(summary, indent=1))

    assert len(kill_points) >= 10
    for n, t in enumerate(log_text):
        if "replicating" in t:
            assert "continuing generation" in t or "starting a new generation" in t, f"run {n} said neither:\n{t}"
    assert len(checked) >= 10, f"too few PITR instants covered by a running agent: {summary}"
    if compaction:
        assert level1 >= 3, f"too few level-1 objects for the kills to have met compaction: {summary}"
    assert not problems, "\n".join(problems[:30]) + f"\n{summary}"
