"""Latents <-> spacetime patch tokens, and the positions the model's 3D RoPE reads."""

from __future__ import annotations

import torch


def patchify(latent: torch.Tensor, patch: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """latent [C,T,H,W] -> tokens [N, C*pt*ph*pw] in (t,h,w) raster order, positions [N,3] (t,h,w)."""
    c, t, h, w = latent.shape
    pt, ph, pw = patch
    gt, gh, gw = t // pt, h // ph, w // pw
    x = latent.reshape(c, gt, pt, gh, ph, gw, pw).permute(1, 3, 5, 0, 2, 4, 6)  # [gt,gh,gw,C,pt,ph,pw]
    tokens = x.reshape(gt * gh * gw, c * pt * ph * pw)
    return tokens, grid_positions((gt, gh, gw))


def grid_positions(grid: tuple[int, int, int]) -> torch.Tensor:
    gt, gh, gw = grid
    return torch.stack(torch.meshgrid(torch.arange(gt), torch.arange(gh), torch.arange(gw), indexing="ij"), -1).reshape(-1, 3)


def unpatchify(tokens: torch.Tensor, grid: tuple[int, int, int], patch: tuple[int, int, int], channels: int) -> torch.Tensor:
    """tokens [N, C*pt*ph*pw] (N = gt*gh*gw) -> latent [C,T,H,W]; the exact inverse of patchify."""
    gt, gh, gw = grid
    pt, ph, pw = patch
    x = tokens.reshape(gt, gh, gw, channels, pt, ph, pw).permute(3, 0, 4, 1, 5, 2, 6)
    return x.reshape(channels, gt * pt, gh * ph, gw * pw)
