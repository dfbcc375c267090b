"""A short slice of the torture harness (Tests/integration/torture/torture.py) in the normal
suite: a few fixed seeds, each a randomized run of application steps (large blobs, rolled-back
transactions that spilled into the WAL, savepoints, VACUUM, application checkpoints, WITHOUT
ROWID tables, two connections, a second application process) and operator events (SIGKILL,
SIGSTOP, SIGTERM, a directory or S3 replica outage, snapshot requests, the database file
replaced by a restored copy) against a real `walship replicate`, checked against the
application's own record of every commit. Longer soaks: `make torture DURATION=2h`."""
import subprocess
import sys

import pytest

from conftest import HERE

TORTURE = HERE / "torture" / "torture.py"
STEPS = 45
# Chosen for variety: page sizes 512 / 4096 / 1024, auto_vacuum NONE / FULL / INCREMENTAL,
# SIGSTOP and SIGTERM restarts, SIGKILL and a replica outage, snapshot requests, runs that
# end with a rolled-back spill followed by one small commit, an S3 replica beside the
# directory one (2, 6, 176; 176 freezes the S3 server and takes the directory away at once),
# a second application process and the database file replaced (4, 176).
# With seeds 2 and 6 the application's own WAL gets frames with zeroed salts inside its
# committed part: SQLite 3.40.1's savepoint rollback bug (torture/savepoint_hole.py shows it
# with SQLite alone). The harness notices such a hole by itself and then requires only that
# the agent reported it; a hole the watcher samples too late leaves an unexcused self-check
# report, so these two stay non-strict expected failures.
KNOWN_OPEN = {2, 6}
SEEDS = [pytest.param(s, marks=pytest.mark.xfail(reason="SQLite 3.40.1 writes committed WAL frames with zeroed salts", strict=False))
         if s in KNOWN_OPEN else s for s in (2, 4, 6, 176)]


@pytest.mark.parametrize("seed", SEEDS)
def test_torture_seed(seed, walship_bin, tmp_path):
    cmd = [sys.executable, str(TORTURE), "--seed", str(seed), "--steps", str(STEPS),
           "--walship", walship_bin, "--workdir", str(tmp_path)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    if p.returncode != 0:
        repro = f"python3 Tests/integration/torture/torture.py --seed {seed} --steps {STEPS}"
        pytest.fail(f"torture seed {seed} failed; reproduce with: {repro}\n{p.stdout[-5000:]}\n{p.stderr[-3000:]}",
                    pytrace=False)
