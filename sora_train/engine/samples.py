"""Videos during training: logging.sample_prompts every logging.sample_every steps, through the same Pipeline as
sora-sample (its text encoder and codec built once, at the first sample: a T5-XXL-class encoder is ~19 GB to
load), written under <out_dir>/samples/step_<N>/ and logged to W&B."""

from __future__ import annotations

from pathlib import Path

from ..inference import Pipeline
from ..inference.generate import write_videos

SIZE = (8, 48, 48)  # frames, height, width


class TrainingSamples:
    def __init__(self, cfg, pipeline: Pipeline | None, logger, is_main: bool):
        """pipeline None: nothing to sample with (no dataset manifest names a text encoder and codec)."""
        self.prompts, self.every = list(cfg.logging.sample_prompts), cfg.logging.sample_every
        self.diffusion, self.seed, self.out_dir = cfg.diffusion, cfg.seed, Path(cfg.out_dir)
        self.pipeline, self.logger, self.is_main = pipeline, logger, is_main

    @property
    def enabled(self) -> bool:
        return bool(self.prompts) and self.pipeline is not None

    def should_sample(self, step: int) -> bool:
        return self.enabled and self.every > 0 and step % self.every == 0

    def write(self, step: int) -> list[Path]:
        """Collective under sequence parallelism (every rank runs the sampler); rank 0 writes and logs."""
        if not self.enabled:
            return []
        d = self.diffusion
        videos = self.pipeline.generate(self.prompts, *SIZE, d.steps, d.guidance, d.sampler, self.seed)
        if not self.is_main:
            return []
        gifs = write_videos(self.out_dir / "samples" / f"step_{step:08d}", self.prompts, videos, fps=8)
        self.logger.log_videos(step, gifs, self.prompts)
        return gifs
