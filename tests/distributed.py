"""Helpers for multi-process tests: torchrun on CPU (gloo) with the project's own entries."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The run that resumed and restarted runs must reach exactly (conftest.py's straight_run): ZeRO-3 DP=2 with
# EMA, checkpoints every 5 steps.
RESUMABLE = {"checkpoint.every": 5, "ema.enabled": True, "data.seq_len": 512}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    # TORCHDYNAMO_DISABLE: DeepSpeed compiles Muon's update per matrix shape, ~30 s per process on 2 cores,
    # in every Muon run; these tests compare runs with each other, not the compiler. The quickstart's
    # compiled path keeps its own test (test_stage0_muon_run_resumes_exactly_exports_and_samples_without_ema).
    e = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
             PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", TORCHDYNAMO_DISABLE="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # each job picks its own
        e.pop(k, None)
    return e


def torchrun(nproc: int, args: list[str], timeout: float = 300, check: bool = True,
             extra_env: dict | None = None) -> subprocess.CompletedProcess:
    # One process without torchrun, with the variables torchrun would export: its parent process and agent cost
    # ~1.6 s a launch on 2 cores.
    single = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
              "MASTER_PORT": str(free_port())} if nproc == 1 else {}
    cmd = [sys.executable, *args] if nproc == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
        *args]
    r = subprocess.run(cmd, cwd=ROOT, env={**env(), **single, **(extra_env or {})}, capture_output=True, text=True,
                       timeout=timeout)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-6000:]}")
    return r


def tiny_model(shards: Path, out: Path, **extra) -> list[str]:
    """Overrides for a small, fast model on the test dataset."""
    kv = {"model": "tiny", "data.train": str(shards), "model.dim": 48, "model.depth": 2, "model.heads": 4, "data.seq_len": 256,
          "data.text_len": 64, "data.max_per_row": 16, "data.lookahead": 8, "data.num_workers": 0,
          "optim.warmup_steps": 2, "optim.decay": "constant", "optim.lr": 1e-3, "optim.name": "adamw", "logging.wandb.mode": "disabled",
          "logging.every": 1, "out_dir": str(out), "checkpoint.every": 0, "ema.enabled": False,
          "parallel.zero_stage": 3, "parallel.activation_checkpointing": "none", "diffusion": "flow", **extra}
    return [f"{k}={v}" for k, v in kv.items()]


def step_losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}
