"""sora-sample: a checkpoint (or an export) + prompts -> mp4 and gif files on one device."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import torch
from safetensors.torch import load_file

from . import CONF_DIR
from .codecs import codec_from_manifest_name
from .codecs.text import text_encoder_named
from .config import model_args, register, saved_model_config
from .diffusion import DDPMConfig, DiffusionConfig, FlowConfig, build_objective, check_sampler
from .engine.checkpoint import find_latest, is_complete
from .generate import generate_latents, latent_grid, to_frames, write_videos
from .models import DiT


register()


def load_for_sampling(path: str | Path, use_ema: bool = True) -> tuple[DiT, dict]:
    """An export dir (model.safetensors, ema.safetensors, meta.json) or a checkpoint (step dir or its parent)."""
    path = Path(path)
    if (path / "model.safetensors").exists():
        meta = json.loads((path / "meta.json").read_text())
        weights = path / ("ema.safetensors" if use_ema and (path / "ema.safetensors").exists() else "model.safetensors")
        state = load_file(str(weights))
    else:
        step_dir = path if is_complete(path) else find_latest(path)
        if step_dir is None:
            raise FileNotFoundError(f"{path}: no export and no complete checkpoint found")
        from .export import consolidated_ema, fp32_weights

        meta = json.loads((step_dir / "meta.json").read_text())
        use_ema = use_ema and (step_dir / "ema" / "layout.json").exists()
        state = consolidated_ema(step_dir) if use_ema else fp32_weights(step_dir)
    model = DiT(model_args(saved_model_config(meta["config"]["model"])))
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


def diffusion_from_meta(meta: dict) -> DiffusionConfig:
    d = meta["config"]["diffusion"]
    return DiffusionConfig(kind=d["kind"], flow=FlowConfig(**d["flow"]), ddpm=DDPMConfig(**d["ddpm"]),
                           sampler=d["sampler"], steps=d["steps"], guidance=d["guidance"])


def run(cfg) -> list[Path]:
    device = torch.device("cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    model, meta = load_for_sampling(cfg.checkpoint, cfg.use_ema)
    dc = diffusion_from_meta(meta)
    sampler = cfg.sampler or dc.sampler
    check_sampler(dc.kind, sampler)
    model.to(device)
    manifest = meta.get("manifest") or {}
    if not manifest and not cfg.text_encoder:
        raise ValueError("the checkpoint names no dataset manifest: set text_encoder=<local HF dir>")
    text_name = cfg.text_encoder or manifest["text_encoder"]["name"]
    encoder = text_encoder_named(text_name, device=device)
    codec = codec_from_manifest_name(manifest["codec"]["name"], device=str(device))
    a = model.args
    grid = latent_grid(codec, a.patch_size, cfg.frames, cfg.height, cfg.width)
    latents = generate_latents(model, build_objective(dc), encoder.encode(list(cfg.prompts)), grid, a.patch_size,
                               a.in_channels, a.text_dim, cfg.steps, cfg.guidance, sampler, cfg.seed, device)
    gifs = write_videos(Path(cfg.out_dir), list(cfg.prompts), [to_frames(codec, z) for z in latents], cfg.fps)
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
