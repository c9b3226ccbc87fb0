"""Diffusion objectives, the masked loss and classifier-free guidance."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .conditioning import ConditionConfig, draw_given
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
    condition: ConditionConfig = field(default_factory=ConditionConfig)  # frames given clean in training


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


def token_errors(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """[B,S]: each token's mean squared error (times its loss weight [B,S,1]), padding included."""
    err = (pred.float() - target.float()).pow(2).mean(-1)
    return err * weight[..., 0] if weight is not None else err


def masked_mse_sum(pred: torch.Tensor, target: torch.Tensor, seg: torch.Tensor,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over real tokens of the per-token mean squared error; padding never counts.
    Divide by the real-token count of the *whole* micro-batch (not of an SP shard), so that
    the sum over sequence-parallel ranks equals the full-sequence mean."""
    return (token_errors(pred, target, weight) * (seg > 0)).sum()


def packed_loss(objective, pred: torch.Tensor, x_t: torch.Tensor, t_tok: torch.Tensor, target: torch.Tensor,
                seg: torch.Tensor, real_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The objective's loss over packed rows (or an SP shard of them), normalised by the real tokens of the full
    rows (the SP ranks' losses sum to the full mean), and each token's error [B,S] (per-source figures)."""
    err = token_errors(objective.velocity(pred.float(), x_t, t_tok), target, objective.loss_weight(t_tok))
    return (err * (seg > 0)).sum() / real_tokens, err


def step_generator(*key: int) -> torch.Generator:
    """Noise and timesteps are a pure function of a key such as (seed, step, micro, dp_rank): resume needs no RNG
    state for them, and all SP ranks of a group draw the same noise for the same row."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([abs(k) for k in key]).generate_state(1)[0]))


def noise(shape, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """Standard normal noise of `shape` drawn on `device`, from a generator there seeded by `generator`'s next draw:
    still a pure function of the step's key, whatever the device. A 64k-token row is ~4M values: 20-40 ms a step
    drawn and mixed on the host (2 cores), while the GPU, synchronised by the step's collectives, waits."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return torch.randn(shape, generator=torch.Generator(device).manual_seed(seed), device=device)


def guided(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond + scale * (cond - uncond)


__all__ = ["ConditionConfig", "draw_given", "DiffusionConfig", "FlowConfig", "DDPMConfig", "RectifiedFlow", "DDPM", "OBJECTIVES", "build_objective",
           "check_sampler", "per_token", "masked_mse_sum", "token_errors", "packed_loss", "step_generator", "noise",
           "guided"]
