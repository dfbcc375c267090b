"""Run context shared by the parts: tools, scratch and log directories, S3 server, parameters."""
import os

from .s3 import FileReplica, S3Replica


class Ctx:
    def __init__(self, tools, work, logdir, seed, s3, params):
        self.tools, self.work, self.logdir, self.seed, self.s3, self.p = tools, work, logdir, seed, s3, params
        self.progress = None

    def tool(self, name):
        return next(t for t in self.tools if t.name == name)

    def dir(self, name):
        d = os.path.join(self.work, name)
        os.makedirs(d)
        return d

    def logpath(self, name):
        return os.path.join(self.logdir, name + ".log")

    def replica(self, backend, d, prefix, port=None):
        if backend == "s3":
            if self.s3 is None:
                raise RuntimeError("S3 replica requested but no S3 server is running")
            return S3Replica(self.s3, prefix, port=port)
        return FileReplica(os.path.join(d, "replica"))


def start_tool(tool, db, rep, interval, logpath, snapshot_timeout=120):
    """Start the tool and wait until it replicates and its initial snapshot is written (walship logs
    'replicating' after its snapshot; Litestream logs 'replicating to' first, 'snapshot complete' ~1s later)."""
    from .common import wait_for_marker
    p = tool.start(db, rep, interval, logpath)
    try:
        wait_for_marker(p, logpath, tool.ready_marker, 60)
        wait_for_marker(p, logpath, tool.snapshot_marker, snapshot_timeout)
    except Exception:
        p.kill()
        p.wait()
        raise
    return p
