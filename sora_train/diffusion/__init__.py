"""Diffusion objectives, the masked loss and classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .ddpm import DDPM, DDPMConfig
from .flow import FlowConfig, RectifiedFlow


@dataclass
class DiffusionConfig:
    kind: str = "flow"  # flow | ddpm
    flow: FlowConfig = field(default_factory=FlowConfig)
    ddpm: DDPMConfig = field(default_factory=DDPMConfig)
    sampler: str = "euler"  # euler | heun (flow), ddim (ddpm)
    steps: int = 30
    guidance: float = 4.0


OBJECTIVES = {"flow": RectifiedFlow, "ddpm": DDPM}  # diffusion.kind -> objective; each reads cfg.<kind>


def build_objective(cfg: DiffusionConfig):
    if cfg.kind not in OBJECTIVES:
        raise ValueError(f"diffusion.kind={cfg.kind!r}: use {' or '.join(OBJECTIVES)}")
    return OBJECTIVES[cfg.kind](getattr(cfg, cfg.kind))


def check_sampler(kind: str, sampler: str) -> None:
    """Refuse a sampler the objective does not have before any weights, text or noise are touched
    (the objective's own check would fire only at its first step, after the rest of the work)."""
    allowed = OBJECTIVES[kind].SAMPLERS
    if sampler not in allowed:
        raise ValueError(f"sampler {sampler!r}: diffusion.kind={kind} samples with {' or '.join(allowed)}")


def per_token(values: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """values [B,M] per sample -> [B,S,1] per token (padding gets sample 0's, masked later)."""
    return torch.gather(values, 1, (seg - 1).clamp(min=0))[..., None]


def masked_mse_sum(pred: torch.Tensor, target: torch.Tensor, seg: torch.Tensor,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over real tokens of the per-token mean squared error; padding never counts.
    Divide by the real-token count of the *whole* micro-batch (not of an SP shard), so that
    the sum over sequence-parallel ranks equals the full-sequence mean."""
    err = (pred.float() - target.float()).pow(2).mean(-1)
    if weight is not None:  # [B,S,1] per token
        err = err * weight[..., 0]
    return (err * (seg > 0)).sum()


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


__all__ = ["DiffusionConfig", "FlowConfig", "DDPMConfig", "RectifiedFlow", "DDPM", "OBJECTIVES", "build_objective",
           "check_sampler", "per_token", "masked_mse_sum", "guided"]
