"""From weights to videos: the pipeline (load_pipeline), generation, the CLIs sora-sample, sora-eval,
sora-export and sora-probe."""

from .pipeline import Pipeline, diffusion_from_meta, load_model, load_pipeline

__all__ = ["Pipeline", "diffusion_from_meta", "load_model", "load_pipeline"]
