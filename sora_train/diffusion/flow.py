"""Rectified flow (Liu et al. 2022; SD3 training recipe, Esser et al. 2024).

x_t = (1 - t) x0 + t * noise, t in [0,1] (t = 1 is pure noise). The loss is on the velocity
v = noise - x0. The network predicts either v directly (`prediction: velocity`) or the clean x0
(`prediction: x0`, then v = (x_t - x0) / t): with wide patch vectors (pixel-space codecs: 8x8x3 =
192 values per token) predicting v forces the net to carry full-rank noise, while x0 lies on a
low-dimensional manifold (Li & He 2025, "Back to Basics: Let Denoising Generative Models Denoise"). Training t is logit-normal, then shifted towards noise for larger samples:
t' = s t / (1 + (s - 1) t) with s = clamp(sqrt(n_tokens / base_tokens), 1, max_shift), because
more tokens carry more redundant signal and need more noise to be destroyed (SD3 Sec. 5.3.2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class FlowConfig:
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift: float = 1.0  # fixed shift when resolution_shift is off
    resolution_shift: bool = True
    base_tokens: int = 256
    max_shift: float = 6.0
    prediction: str = "velocity"  # velocity | x0
    t_min: float = 0.05  # x0 prediction: v = (x_t - x0) / max(t, t_min)
    # The v-loss weighs an x0 error by 1/t^2: near-clean samples (trivial to denoise) then dominate
    # the gradient, and a small budget never learns the high-noise end where layout, colour and
    # motion are decided. Below loss_t_floor the weight stops growing: (t / max(t, floor))^2 on the
    # v-loss. 0 = the plain v-loss; 1 = an x0-error loss.
    loss_t_floor: float = 0.0


def shift_time(t: torch.Tensor, s: torch.Tensor | float) -> torch.Tensor:
    return s * t / (1 + (s - 1) * t)


class RectifiedFlow:
    SAMPLERS = ("euler", "heun")

    def __init__(self, cfg: FlowConfig):
        if cfg.prediction not in ("velocity", "x0"):
            raise ValueError(f"diffusion.flow.prediction={cfg.prediction!r}: use velocity or x0")
        self.cfg = cfg

    def shift_for(self, n_tokens: torch.Tensor) -> torch.Tensor:
        if not self.cfg.resolution_shift:
            return torch.full_like(n_tokens, self.cfg.shift, dtype=torch.float32)
        return (n_tokens.float() / self.cfg.base_tokens).sqrt().clamp(1.0, self.cfg.max_shift)

    def sample_t(self, n_tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """n_tokens [B,M] per sample -> model time [B,M]."""
        u = torch.randn(n_tokens.shape, generator=generator) * self.cfg.logit_std + self.cfg.logit_mean
        return shift_time(torch.sigmoid(u), self.shift_for(n_tokens))

    def corrupt(self, x0, noise, t):
        """x0, noise [B,S,P]; t [B,S,1] per token -> (x_t, v target)."""
        return (1 - t) * x0 + t * noise, noise - x0

    def velocity(self, out, x_t, t):
        """Network output -> velocity (what the loss and the sampler use)."""
        if self.cfg.prediction == "velocity":
            return out
        return (x_t - out) / t.clamp(min=self.cfg.t_min) if isinstance(t, torch.Tensor) else (x_t - out) / max(t, self.cfg.t_min)

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        """Per-token weight of the squared velocity error; t [B,S,1]."""
        if self.cfg.loss_t_floor <= 0:
            return torch.ones_like(t)
        return (t / t.clamp(min=self.cfg.loss_t_floor)).pow(2)

    def timesteps(self, steps: int, n_tokens: int) -> list[float]:
        """The times a `steps`-step sampling run visits, from 1 (noise) to 0 (clean): steps + 1 values."""
        ts = torch.linspace(1.0, 0.0, steps + 1)
        return shift_time(ts, self.shift_for(torch.tensor(float(n_tokens)))).tolist()

    def sample(self, predict, x, steps: int, n_tokens: int, solver: str = "euler", start: int = 0) -> torch.Tensor:
        """predict(x, t: float) -> network output (guidance applied by the caller). x starts as noise, or (start > 0:
        an edit) as a clip noised to timesteps(...)[start]: the full run's schedule from there on, not a shorter one."""
        if solver not in self.SAMPLERS:
            raise ValueError(f"flow sampler {solver!r}: use {' or '.join(self.SAMPLERS)}")
        ts = self.timesteps(steps, n_tokens)[start:]
        for t, t_next in zip(ts[:-1], ts[1:]):
            v = self.velocity(predict(x, t), x, t)
            if solver == "heun" and t_next > 0:
                x_euler = x + (t_next - t) * v
                v = 0.5 * (v + self.velocity(predict(x_euler, t_next), x_euler, t_next))
            x = x + (t_next - t) * v
        return x
