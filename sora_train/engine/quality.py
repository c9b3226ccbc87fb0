"""FVD, FID and CLIPScore during training (logging.metrics_every): the EMA weights (the trained ones where EMA is
off) generate one sample per clip of a fixed held-out subset, sharded over all ranks, and the features are gathered
(inference/metrics.py, as sora-eval task=metrics computes them). The real clips' features are computed once, at
the first measurement. Logged as metrics/fvd, metrics/fid, metrics/clipscore, the floor (metrics/floor_*, once),
what the measurement cost (metrics/seconds, metrics/time_share: its share of the wall time since the last one, to
set the cadence by), and the first logging.metrics.videos samples as videos."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from ..inference.generate import write_videos
from ..inference.metrics import Metrics, batches, gathered, generate_rows, held_out, real_rows, share


WARN_SHARE = 0.05  # a measurement taking more of the wall time than this is said once


class QualityMetrics:
    def __init__(self, cfg, dims, pipeline, ema, logger, device: torch.device):
        """pipeline None: nothing to generate with (no dataset manifest names a text encoder and codec)."""
        self.every, self.cfg, self.dims = cfg.logging.metrics_every, cfg.logging.metrics, dims
        self.pipeline, self.ema, self.logger, self.device = pipeline, ema, logger, device
        self.seed, self.diffusion, self.out_dir = cfg.seed, cfg.diffusion, Path(cfg.out_dir)
        self.real = None  # the held-out clips' rows, once computed
        self.warned = False
        self.since = time.time()
        if not self.enabled:
            return
        self.metrics = Metrics(self.cfg, device, "logging.metrics")
        self.items, _ = held_out(self.cfg.real or cfg.data.val, self.cfg.clips, pipeline.codec, self.cfg.size,
                                 "logging.metrics.real")
        self.mine = share(batches(self.items, self.cfg.batch), dims.dp_rank, dims.dp)
        mine = {it.index for batch, _ in self.mine for it in batch}
        for it in self.items:  # a rank decodes only its own clips: the others' latents need not stay in its memory
            if it.index not in mine:
                it.latent = None

    @property
    def enabled(self) -> bool:
        return self.every > 0 and self.pipeline is not None

    def should_measure(self, step: int) -> bool:
        return self.enabled and step % self.every == 0

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        return gathered(rows, self.device, self.dims.world_size, sends=self.dims.sp_rank == 0)

    def measure(self, step: int) -> dict[str, float]:
        """Collective: every rank generates its share. Returns the figures to log (every rank has them)."""
        start, out = time.time(), {}
        if self.real is None:
            self.real = self.gather(real_rows(self.pipeline.codec, self.metrics, self.mine))
            for it in self.items:  # the real clips' features are all that is kept of them
                it.latent = None
            out.update({f"metrics/floor_{k}": v for k, v in self.metrics.floor(self.real).items()})
        d = self.diffusion
        with self.ema.applied() if self.ema is not None else nullcontext():
            rows, kept = generate_rows(self.pipeline, self.metrics, self.mine, d.steps, d.guidance, d.sampler,
                                       self.seed, keep=self.cfg.videos if self.dims.is_main else 0)
        rows = self.gather(rows)
        scores = {**self.metrics.scores(self.real, rows), **self.metrics.at_half(self.real, rows)}
        out.update({f"metrics/{k}": v for k, v in scores.items()})
        if kept:
            captions = [it.caption for it, _ in kept]
            gifs = write_videos(self.out_dir / "metrics" / f"step_{step:08d}", captions, [v for _, v in kept], fps=8)
            self.logger.log_videos(step, gifs, captions, key="metrics/samples")
        seconds = time.time() - start
        time_share = seconds / max(time.time() - self.since, 1e-9)
        out.update({"metrics/seconds": seconds, "metrics/time_share": time_share,
                    "metrics/clips": float(len(self.items))})
        if time_share > WARN_SHARE and not self.warned and self.dims.is_main:
            self.warned = True
            print(f"note: FVD/FID/CLIPScore took {seconds:.1f} s, {time_share:.0%} of the wall time since the last "
                  f"measurement: raise logging.metrics_every or lower logging.metrics.clips to spend less",
                  file=sys.stderr, flush=True)
        self.since = time.time()
        return out
