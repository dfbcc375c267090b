"""Point-in-time restore to instants in the middle of a run, checked for an exact match.

Per tool: fresh ticket DB, start the tool (1s sync interval, directory replica), run the writer for
N seconds; at evenly spaced instants inside the run the writer pauses for `pause` seconds, and during
the pause copies the database with SQLite's backup API (the reference: every transaction committed
before the instant, none after). The instant T is the middle of the pause. After the run and once the
replica stops changing, restore to T (`walship restore --timestamp T`, `litestream restore
-timestamp T`) and compare the three ticket tables row by row with the reference (SHA-1 over all
rows). Exact = identical. Also reported: transactions missing from the restore (reference's newest
sequence - restored newest; negative = transactions after T were included).

The pause exists because walship stamps a commit with the first moment it saw it (a few ms after the
real commit): without a gap between transactions, "the state at T" would be ambiguous to within
those milliseconds for either tool.
"""
import datetime
import os
import shutil

from .common import kill_hard, log, run_timed, suspicious_lines, wait_quiet
from .ctx import start_tool
from .s3 import FileReplica
from .workload import make_ticket_db, start_writer, ticket_digest, ticket_state, writer_result


def rfc3339(t):
    return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def run_pitr(ctx, seconds, points, pause_s):
    out = {"seconds": seconds, "points": points, "pause_s": pause_s, "interval": "1s"}
    p = ctx.p
    pause_at = [seconds * (k + 1) / (points + 1) for k in range(points)]
    for tool in ctx.tools:
        tag = f"pitr-{tool.name}"
        d = ctx.dir(tag)
        db = os.path.join(d, "app.db")
        rep = FileReplica(os.path.join(d, "replica"))
        logpath = ctx.logpath(tag)
        make_ticket_db(db, ctx.seed)
        res = {"points": []}
        tp = wp = None
        try:
            tp = start_tool(tool, db, rep, "1s", logpath)
            wp = start_writer(db, p["rate"], p["size"], seconds, ctx.seed, d, txn_size=p["txn_size"],
                              pause_at=pause_at, pause_s=pause_s, ref_prefix=os.path.join(d, "ref"))
            w = writer_result(wp, seconds + 120)
            res["writer"] = w
            res["quiet_wait_s"] = wait_quiet(rep.local_dir(), 2.5, 120)
            for pz in w["pauses"]:
                ref = os.path.join(d, f"ref-{pz['k']}.db")
                outp = os.path.join(d, f"pitr-{pz['k']}.db")
                ts = rfc3339(pz["T"])
                pt = {"k": pz["k"], "T": ts, "at_s": round(pz["T"] - w["t0"], 3), "ref_seq": pz["seq"]}
                pt["restore_s"], r = run_timed(tool.restore_cmd(rep, outp, timestamp=ts), env=rep.env(),
                                               timeout=600)
                pt["rc"] = r.returncode
                pt["restore_output"] = (r.stdout + r.stderr).strip()[-400:]
                if r.returncode == 0:
                    a, b = ticket_digest(ref), ticket_digest(outp)
                    pt["exact"] = a["sha1"] == b["sha1"]
                    pt["ref_rows"], pt["restored_rows"] = a["rows"], b["rows"]
                    pt["ref_seq"] = ticket_state(ref)["seq"]
                    pt["restored_seq"] = ticket_state(outp)["seq"]
                    pt["missing_tx"] = pt["ref_seq"] - pt["restored_seq"]
                else:
                    pt["exact"] = False
                res["points"].append(pt)
                log(f"pitr {tool.name:10s}: T={ts} (+{pt['at_s']:.1f}s)  restore rc {r.returncode} "
                    f"{pt['restore_s']:.2f}s  exact: {pt['exact']}"
                    + (f"  missing {pt['missing_tx']} tx" if "missing_tx" in pt else
                       f"  {pt['restore_output'][-200:]}"))
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {e}"
            log(f"pitr {tool.name}: ERROR {res['error']}")
        finally:
            kill_hard(wp, tp)
            res["log_warnings"] = suspicious_lines(logpath)[:10]
            shutil.rmtree(d, ignore_errors=True)
        res["exact_all"] = bool(res["points"]) and all(pt.get("exact") for pt in res["points"])
        out[tool.name] = res
        if ctx.progress:
            ctx.progress.step()
    return out
