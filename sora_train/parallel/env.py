"""The distributed environment from torchrun or SLURM, exported the way torch and DeepSpeed read it.

This is the only place that knows launcher variables: elsewhere code reads RANK/WORLD_SIZE etc.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_master() -> str:
    nodes = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    try:
        first = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                               check=True).stdout.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError):
        first = nodes.split(",")[0]
    return first or "127.0.0.1"


def detect() -> DistEnv:
    e = os.environ
    if "RANK" in e and "WORLD_SIZE" in e:  # torchrun, or a launcher that already exported them
        return DistEnv(int(e["RANK"]), int(e["WORLD_SIZE"]), int(e.get("LOCAL_RANK", 0)),
                       e.get("MASTER_ADDR", "127.0.0.1"), int(e.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in e and "SLURM_NTASKS" in e and int(e["SLURM_NTASKS"]) > 1:  # srun, one task per GPU
        port = int(e.get("MASTER_PORT", 10000 + int(e.get("SLURM_JOB_ID", "0")) % 50000))
        return DistEnv(int(e["SLURM_PROCID"]), int(e["SLURM_NTASKS"]), int(e.get("SLURM_LOCALID", 0)),
                       e.get("MASTER_ADDR") or _slurm_master(), port, "slurm")
    return DistEnv(0, 1, 0, "127.0.0.1", int(e.get("MASTER_PORT", 0)) or _free_port(), "single")


def export(env: DistEnv) -> None:
    os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                      MASTER_ADDR=env.master_addr, MASTER_PORT=str(env.master_port))
