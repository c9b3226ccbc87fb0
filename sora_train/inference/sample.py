"""sora-sample: a checkpoint (or an export) + prompts -> mp4 and gif files on one device."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra

from .. import CONF_DIR
from ..config import register
from .generate import write_videos
from .pipeline import load_pipeline

register()


def run(cfg) -> list[Path]:
    pipe = load_pipeline(cfg.checkpoint, cfg.use_ema, cfg.device, cfg.text_encoder)
    videos = pipe.generate(list(cfg.prompts), cfg.frames, cfg.height, cfg.width, cfg.steps, cfg.guidance, cfg.sampler,
                           cfg.seed)
    gifs = write_videos(Path(cfg.out_dir), list(cfg.prompts), videos, cfg.fps)
    for g in gifs:
        print(f"wrote {g.with_suffix('.mp4')} and {g}")
    return gifs


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg) -> None:
    try:
        run(cfg)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"sample error: {e}")


if __name__ == "__main__":
    main()
