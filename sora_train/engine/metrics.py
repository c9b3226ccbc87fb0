"""Throughput maths (tokens/s, MFU) and the one log() that feeds console, JSONL and W&B."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from ..models.flops import achieved


class DeviceClock:
    """Points in time on the training device's stream (CUDA events; the host's clock on a CPU) and seconds between
    two. Phases timed on the host would be the host's: a GPU runs kernels after their launch, so backward's tail
    would be counted in whatever waits for it next (the optimizer step's gradient norm). An event costs no
    synchronisation; reading one waits for it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def seconds(self, a, b) -> float:
        if not self.cuda:
            return b - a
        b.synchronize()
        return a.elapsed_time(b) / 1e3


class Throughput:
    """Per log window: tokens/s, samples/s, achieved TFLOP/s and MFU per device, and where the steps' time went:
    waiting for data, forward and backward, the optimizer step, on the device's clock."""

    def __init__(self, peak_tflops: float | None, world_size: int, device: torch.device = torch.device("cpu")):
        self.peak, self.world, self.clock = peak_tflops, world_size, DeviceClock(device)
        self.reset()

    def reset(self):
        self.t0, self.tokens, self.samples, self.flops = time.perf_counter(), 0, 0, 0.0
        self.spent, self.pending = [0.0, 0.0, 0.0], []  # seconds waiting for data, forward + backward, optimizer

    def add(self, tokens: int, samples: int, flops: float):
        self.tokens, self.samples, self.flops = self.tokens + tokens, self.samples + samples, self.flops + flops

    def add_phases(self, *points) -> None:
        """One micro-batch's clock points: before its batch, its forward, its optimizer step, after. Earlier
        micro-batches' have run by now (the agreement on a finite loss waited for this one's forward): they are
        summed at once, so a window of any length holds one micro-batch's events."""
        self._fold()
        self.pending = [points]

    def _fold(self) -> None:
        for p in self.pending:
            for i in range(3):
                self.spent[i] += self.clock.seconds(p[i], p[i + 1])
        self.pending = []

    def summary(self) -> dict:
        """Per-rank figures; tokens/s is for this rank's share (multiply by dp for the job)."""
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self._fold()
        data, fwd_bwd, optim = self.spent
        out = {"perf/tokens_per_s": self.tokens / dt, "perf/samples_per_s": self.samples / dt,
               **{f"perf/{k}": v for k, v in achieved(self.flops, dt, self.peak).items()},
               "time/data_wait_s": data, "time/fwd_bwd_s": fwd_bwd, "time/optimizer_s": optim,
               "time/data_wait_pct": 100 * data / dt}
        if torch.cuda.is_available():
            out["mem/peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        return out


class MetricLogger:
    """Rank 0 logs: console line, metrics.jsonl, and W&B (offline by default)."""

    CONSOLE = ("loss", "val/loss", "lr", "grad_norm", "perf/tokens_per_s", "perf/mfu", "data/skipped", "eta_min")

    def __init__(self, out_dir: str | Path, enabled: bool, wandb_cfg=None, config: dict | None = None,
                 run_id: str | None = None, every: int = 1):
        self.enabled, self.run, self.every = enabled, None, every
        self.run_id = run_id
        if not enabled:
            return
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(self.out / "metrics.jsonl", "a")
        if wandb_cfg is not None and wandb_cfg.mode != "disabled":
            import wandb

            self.run = wandb.init(project=wandb_cfg.project, entity=wandb_cfg.entity, name=wandb_cfg.name,
                                  mode=wandb_cfg.mode, dir=str(self.out), config=config, id=run_id,
                                  resume="allow" if run_id else None)
            self.run_id = self.run.id

    def should_log(self, step: int, last_step: int) -> bool:
        """The training line: every logging.every steps and at the last one (every rank agrees: no collective)."""
        return (self.every > 0 and step % self.every == 0) or step == last_step

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                                for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.run is not None:
            self.run.log(metrics, step=step)
        # val/loss as val_loss: a validation line must not read like a training one
        shown = [f"{k.replace('val/', 'val_').split('/')[-1]}={row[k]:.4g}" for k in self.CONSOLE
                 if isinstance(row.get(k), float)]
        print(f"step {step:>7} " + " ".join(shown), flush=True)

    def log_videos(self, step: int, paths: list[Path], captions: list[str], key: str = "samples") -> None:
        if self.enabled and self.run is not None:
            import wandb

            self.run.log({key: [wandb.Video(str(p), caption=c, format="gif") for p, c in zip(paths, captions)]},
                         step=step)

    def close(self) -> None:
        if self.enabled and not self.jsonl.closed:
            self.jsonl.close()
            if self.run is not None:
                self.run.finish()


class SampleIds:
    """logging.sample_ids: the audit trail of the data order, <out_dir>/sample_ids/dp<rank>.jsonl with each trained
    sample's (epoch, shard, index) and key per step. One writer per data-parallel rank (SP members see the same)."""

    def __init__(self, out_dir: str | Path, dp_rank: int, enabled: bool):
        self.path = Path(out_dir) / "sample_ids" / f"dp{dp_rank:05d}.jsonl"
        self.enabled, self.file = enabled, None

    def record(self, step: int, batch) -> None:
        if not self.enabled:
            return
        if self.file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "a")
        keys = [k for row in batch.keys for k in row]
        self.file.write(json.dumps({"step": step, "ids": batch.consumed[: len(keys)], "keys": keys}) + "\n")
        self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def describe_run(cfg, engine, dims, device) -> str:
    """One line at start-up: what is being trained, where, and how fast it will have to go."""
    m, d, o = cfg.model, cfg.data, cfg.optim
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    dtype = "bf16" if engine.bfloat16_enabled() else "fp32"
    return (f"sora-train: model {m.name} ({params / 1e6:.1f}M parameters: dim {m.dim}, depth {m.depth}, "
            f"{m.heads} heads), attention {m.attention}; {dims.world_size} process(es) = dp {dims.dp} x sp {dims.sp} "
            f"on {device.type}, ZeRO stage {cfg.parallel.zero_stage}, {dtype}; {d.seq_len} tokens x {d.rows} row(s) "
            f"x {o.grad_accum} micro-batch(es) per rank per step; {o.steps} steps of {o.name} -> {cfg.out_dir}")
