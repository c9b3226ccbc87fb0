"""DDPM (Ho et al. 2020) with epsilon or v prediction (Salimans & Ho 2022), DDIM sampling (Song et al. 2021)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class DDPMConfig:
    timesteps: int = 1000
    schedule: str = "cosine"  # or linear
    prediction: str = "v"  # or eps


def alphas_cumprod(n: int, schedule: str) -> torch.Tensor:
    if schedule == "linear":
        return torch.cumprod(1 - torch.linspace(1e-4, 0.02, n, dtype=torch.float64), 0).float()
    if schedule == "cosine":
        s = torch.arange(n + 1, dtype=torch.float64) / n
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return torch.cumprod(1 - betas, 0).float()
    raise ValueError(f"unknown DDPM schedule {schedule!r}; use linear or cosine")


class DDPM:
    SAMPLERS = ("ddim",)

    def __init__(self, cfg: DDPMConfig):
        if cfg.prediction not in ("eps", "v"):
            raise ValueError(f"diffusion.ddpm.prediction={cfg.prediction!r}: use eps or v")
        self.cfg, self.prediction = cfg, cfg.prediction
        self.ab = alphas_cumprod(cfg.timesteps, cfg.schedule)

    def sample_t(self, n_tokens: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Model time t = k / T for a uniform integer step k."""
        k = torch.randint(0, self.cfg.timesteps, n_tokens.shape, generator=generator)
        return k.float() / self.cfg.timesteps

    def _coeffs(self, t):
        ab = self.ab.to(t.device)[(t * self.cfg.timesteps).round().long().clamp(0, self.cfg.timesteps - 1)]
        return ab.sqrt(), (1 - ab).sqrt()

    def corrupt(self, x0, noise, t):
        a, s = self._coeffs(t)
        target = noise if self.prediction == "eps" else a * noise - s * x0
        return a * x0 + s * noise, target

    def velocity(self, out, x_t, t):
        """DDPM trains on its own target (eps or v) directly."""
        return out

    def loss_weight(self, t: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(t)

    def _steps(self, steps: int) -> list[int]:
        T = self.cfg.timesteps
        return torch.linspace(T - 1, 0, steps).round().long().tolist()

    def timesteps(self, steps: int, n_tokens: int = 0) -> list[float]:
        """The model times a `steps`-step DDIM run visits (k / T, from T - 1 down to 0): steps values."""
        return [k / self.cfg.timesteps for k in self._steps(steps)]

    def sample(self, predict, x, steps: int, n_tokens: int = 0, solver: str = "ddim", start: int = 0) -> torch.Tensor:
        """Deterministic DDIM (eta = 0) over `steps` evenly spaced timesteps; from the `start`-th of them (an edit:
        x is then a clip noised to timesteps(steps)[start], and the run is the full one's tail)."""
        if solver not in self.SAMPLERS:
            raise ValueError(f"DDPM sampler {solver!r}: use {' or '.join(self.SAMPLERS)}")
        T = self.cfg.timesteps
        ks = self._steps(steps)
        for i in range(start, len(ks)):
            k = ks[i]
            out = predict(x, k / T)
            a, s = self.ab[k].sqrt(), (1 - self.ab[k]).sqrt()
            if self.prediction == "eps":
                eps, x0 = out, (x - s * out) / a
            else:
                x0, eps = a * x - s * out, s * x + a * out
            if i + 1 == len(ks):
                return x0
            ab_next = self.ab[ks[i + 1]]
            x = ab_next.sqrt() * x0 + (1 - ab_next).sqrt() * eps
        return x
