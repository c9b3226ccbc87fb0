"""Frame conditioning: some latent frames of a sample are given clean (noise level 0, no loss), so one base model
also animates an image, extends a video forwards or backwards, and connects two clips (Sora's prompting with
images and videos; Open-Sora 1.2's mask strategies, LTX-Video's first-frame conditioning).

In the model a given token reads its sample's second conditioning slot, at t = 0 (DiT.forward `given`): adaLN
stays per slot, and a conditioned sample packs beside unconditioned ones. Chosen over a channel-concatenated mask
and clean latent (Wan's image-to-video): that widens the patch embedding, costs every token the extra input
width, and makes the base model's checkpoints incompatible with the conditioned one's; the slot costs 2x the
(tiny) per-sample adaLN and nothing per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

KINDS = ("first", "first_k", "last", "first_last", "random")


@dataclass
class ConditionConfig:
    """diffusion.condition: the share of training samples (of two latent frames or more) with given frames, by
    kind; the rest (1 - the sum) are text-to-video."""

    first: float = 0.0  # the first latent frame: image-to-video
    first_k: float = 0.0  # the first k latent frames: extension forwards
    last: float = 0.0  # the last latent frame: extension backwards (from an end frame)
    first_last: float = 0.0  # the first and the last: interpolation between two frames
    random: float = 0.0  # each latent frame given with probability 1/2 (at least one left to generate)
    k: int = 2  # frames given by first_k (patch units along time)

    @property
    def enabled(self) -> bool:
        return any(getattr(self, kind) > 0 for kind in KINDS)

    def validate(self) -> None:
        shares = [getattr(self, kind) for kind in KINDS]
        if any(s < 0 for s in shares) or sum(shares) > 1 + 1e-9:
            raise ValueError(f"diffusion.condition: shares must be >= 0 and sum to <= 1, got "
                             f"{dict(zip(KINDS, shares))}")
        if self.k < 1:
            raise ValueError(f"diffusion.condition.k={self.k}: give at least one frame")


def given_frames(kind: str, frames: int, k: int, generator: torch.Generator) -> list[int]:
    """Latent frame indices (patch units) given for a sample of `frames` frames; never all of them."""
    if kind == "first":
        return [0]
    if kind == "first_k":
        return list(range(min(k, frames - 1)))
    if kind == "last":
        return [frames - 1]
    if kind == "first_last":
        return [0, frames - 1] if frames > 2 else [0]
    if kind == "random":
        keep = (torch.rand(frames, generator=generator) < 0.5).nonzero().flatten().tolist()
        return keep if len(keep) < frames else keep[:-1]
    return []


def draw_given(cfg: ConditionConfig, pos: torch.Tensor, seg: torch.Tensor, grids: torch.Tensor,
               generator: torch.Generator) -> torch.Tensor:
    """[R,S] bool: the tokens given clean, per packed sample drawn from `cfg` (samples of one latent frame are
    never conditioned). pos [R,S,3] (t,h,w) in patch units, seg [R,S], grids [R,M,3]."""
    R, M = grids.shape[:2]
    chosen = torch.zeros(R, M + 1, max(int(grids[..., 0].max()), 1), dtype=torch.bool)  # [row, slot, frame]
    edges = torch.tensor([getattr(cfg, kind) for kind in KINDS]).cumsum(0)
    for r in range(R):
        for j in range(M):
            frames = int(grids[r, j, 0])
            if frames == 0:
                break
            u = float(torch.rand(1, generator=generator))  # drawn for every sample: the stream of draws is fixed
            pick = int((u >= edges).sum())
            if frames >= 2 and pick < len(KINDS):
                chosen[r, j + 1, given_frames(KINDS[pick], frames, cfg.k, generator)] = True
    # Each token looks up its own sample slot and frame (slot 0, padding, has none given).
    return chosen[torch.arange(R)[:, None], seg, pos[..., 0].clamp(max=chosen.shape[2] - 1)]
