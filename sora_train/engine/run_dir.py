"""A run directory belongs to one run at a time: rank 0 holds an advisory lock on <out_dir>/.lock while it runs.

flock, not a pid file: the kernel drops the lock when the process dies however it dies (kill -9, a lost node),
so a crashed run never blocks its own restart; a second live run on the same directory is refused before it
writes anything (two runs on one out_dir used to interleave their checkpoints).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


class RunDirInUse(RuntimeError):
    pass


class RunLock:
    def __init__(self, out_dir: str | Path):
        self.path = Path(out_dir) / ".lock"
        self.file = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise RunDirInUse(f"out_dir={str(self.path.parent)!r} is in use by a running job ({holder}); wait for "
                              f"it, stop it, or give this run another out_dir") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "job": os.environ.get("SLURM_JOB_ID"),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        f.flush()
        self.file = f
        return self

    def release(self) -> None:
        if self.file is not None:
            fcntl.flock(self.file, fcntl.LOCK_UN)
            self.file.close()
            self.file = None
