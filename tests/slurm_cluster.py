"""A private two-node SLURM cluster on localhost for tests: munged, slurmctld and two slurmd, all
state under one temp dir, no system file touched, daemons stopped by pid on teardown."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

from distributed import free_port

# cred_expire is also how long SLURM holds a requeued job (120 s by default); sched_interval (60 s) and
# bf_interval (30 s) are how often pending jobs are looked at. Short here so that tests do not sit idle.
CONF = """ClusterName=soratest
SlurmctldHost=localhost
SlurmctldPort={ctld_port}
AuthType=auth/munge
AuthInfo=socket={d}/run/munge.socket,cred_expire=10
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/slurmctld.log
SlurmdLogFile={d}/slurmd-%n.log
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=10
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port={p1}-{p2} CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""


def ensure_installed() -> str | None:
    """Installs Debian's slurm + munge when missing (root + apt); returns a reason when impossible."""
    if all(shutil.which(t) for t in ("slurmctld", "slurmd", "munged", "sbatch")):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "SLURM is not installed and cannot be (needs root and apt-get)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = "apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge"
    r = subprocess.run(cmd, shell=True, env=env, capture_output=True, text=True, timeout=600)
    if r.returncode:
        r = subprocess.run("apt-get update -qq && " + cmd, shell=True, env=env, capture_output=True, text=True,
                           timeout=900)
    return None if r.returncode == 0 else f"installing slurm failed: {r.stderr[-500:]}"


class Cluster:
    def __init__(self, d: Path):
        self.d = d
        for sub in ("run", "state", "spool/node1", "spool/node2", "log"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        os.chmod(d / "run", 0o755)
        self.procs: list[subprocess.Popen] = []
        self.env = dict(os.environ, SLURM_CONF=str(d / "slurm.conf"))

    def start(self) -> None:
        d = self.d
        subprocess.run(["mungekey", "--create", f"--keyfile={d}/munge.key"], check=True, capture_output=True)
        os.chmod(d / "munge.key", 0o600)
        self._spawn(["munged", "-F", "--force", f"--key-file={d}/munge.key", f"--socket={d}/run/munge.socket",
                     f"--pid-file={d}/munged.pid", f"--log-file={d}/munged.log", f"--seed-file={d}/munge.seed"])
        self._wait(lambda: (d / "run" / "munge.socket").exists(), "munged socket")
        p1 = free_port()
        (d / "slurm.conf").write_text(CONF.format(d=d, ctld_port=free_port(), p1=p1, p2=p1 + 1,
                                                  cpus=os.cpu_count() or 2))
        self._spawn(["slurmctld", "-D", "-i", "-f", str(d / "slurm.conf")])
        time.sleep(1)
        for n in ("node1", "node2"):
            self._spawn(["slurmd", "-D", "-N", n, "-f", str(d / "slurm.conf")])
        self._wait(lambda: self.idle_nodes() == 2, "two idle nodes")

    def _spawn(self, cmd):
        log = open(self.d / "log" / f"{Path(cmd[0]).name}-{len(self.procs)}.out", "w")
        self.procs.append(subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT))

    def _wait(self, ok, what, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            if ok():
                return
            time.sleep(0.5)
        logs = "\n".join(p.read_text()[-1500:] for p in sorted(self.d.glob("*.log")))
        raise TimeoutError(f"SLURM test cluster: no {what} after {timeout}s\n{logs}")

    def idle_nodes(self) -> int:
        r = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
        return sum(s.strip() == "idle" for s in r.stdout.splitlines())

    def run(self, *args, check=True) -> subprocess.CompletedProcess:
        r = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=120)
        if check and r.returncode:
            raise RuntimeError(f"{' '.join(args)}: {r.stderr}")
        return r

    def sbatch(self, *args, env: dict | None = None) -> str:
        r = subprocess.run(["sbatch", "--parsable", f"--output={self.d}/log/slurm-%j.out", *args], env={**self.env, **(env or {})}, capture_output=True,
                           text=True, timeout=60, cwd=Path(__file__).parents[1])
        if r.returncode:
            raise RuntimeError(f"sbatch failed: {r.stderr}")
        return r.stdout.strip().split(";")[0]

    def state(self, job: str) -> dict[str, str]:
        """JobState per job (array tasks listed separately)."""
        r = self.run("scontrol", "show", "job", "-o", job, check=False)
        out = {}
        for line in r.stdout.splitlines():
            jid = re.search(r"JobId=(\d+)", line).group(1)
            task = re.search(r"ArrayTaskId=(\S+)", line)
            out[f"{jid}_{task.group(1)}" if task else jid] = re.search(r"JobState=(\S+)", line).group(1)
        return out

    def wait(self, job: str, timeout: float = 600, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                           "NODE_FAIL", "OUT_OF_MEMORY")) -> dict[str, str]:
        end = time.time() + timeout
        while time.time() < end:
            s = self.state(job)
            if s and all(v in until for v in s.values()):
                return s
            time.sleep(1)
        raise TimeoutError(f"job {job} still {self.state(job)} after {timeout}s")

    def stop(self) -> None:
        for p in reversed(self.procs):
            p.terminate()
        for p in reversed(self.procs):
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
