"""Prompts -> latents -> frames, with classifier-free guidance. Shared by training-time samples,
`sora-sample` and `sora-eval`. `forward` takes full rows (sequence parallelism is the caller's)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..codecs import VideoCodec
from ..data.patchify import grid_positions, patchify, unpatchify
from ..diffusion import guided
from ..video_io import write_gif, write_mp4


def latent_grid(codec: VideoCodec, patch, frames: int, height: int, width: int) -> tuple[int, int, int]:
    ft, fh, fw = codec.info.factors
    for key, pixels, step in (("height", height, fh * patch[1]), ("width", width, fw * patch[2])):
        if pixels % step:  # a silent round-down (50 -> 48) gives a video of another size than asked for
            low = pixels // step * step
            raise ValueError(f"{key}={pixels} is not a multiple of {step} (the codec's factor x the patch): use "
                             f"{' or '.join(str(v) for v in (low, low + step) if v > 0)}")
    lt = codec.info.latent_frames(frames)
    grid = (lt // patch[0], height // fh // patch[1], width // fw // patch[2])
    if min(grid) < 1:
        raise ValueError(f"{frames} frames of {height}x{width} px is smaller than one patch "
                         f"(codec factors {codec.info.factors}, patch {list(patch)})")
    return grid


def generation_batch(texts: list[np.ndarray], grid, text_dim: int, multiple: int = 1):
    """One row per prompt, conditional rows then unconditional ones (a single zero text token, as
    caption dropout trains it). Rows are padded to a multiple of `multiple` (the SP degree)."""
    B, n = len(texts), math.prod(grid)
    S = math.ceil(n / multiple) * multiple
    L = max(t.shape[0] for t in texts)
    pos = torch.zeros(2 * B, S, 3, dtype=torch.long)
    pos[:, :n] = grid_positions(grid)
    extent = torch.tensor(grid, dtype=torch.long).expand(2 * B, S, 3)
    seg = torch.zeros(2 * B, S, dtype=torch.long)
    seg[:, :n] = 1
    text = torch.zeros(2 * B, L, text_dim)
    text_seg = torch.zeros(2 * B, L, dtype=torch.long)
    for i, t in enumerate(texts):
        text[i, : t.shape[0]] = torch.from_numpy(t.astype(np.float32))
        text_seg[i, : t.shape[0]] = 1
    text_seg[B:, 0] = 1  # unconditional: one zero token
    return pos, seg, text, text_seg, extent, n, S


@dataclass
class GivenFrames:
    """Latent frames the sampler keeps as given (image-to-video, extension, interpolation): `latent` [C,T,H,W] at
    the output's size, and for each of its latent frames (patch units along time) where it goes in the output."""

    latent: torch.Tensor
    at: list[int]

    def tokens(self, grid, patch, S: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(clean tokens [S,P] at their places in the output's rows, mask [S] of the given ones)."""
        tokens, pos = patchify(self.latent.float(), patch)
        if tuple(int(v) for v in pos.max(0).values + 1)[1:] != tuple(grid[1:]):
            raise ValueError(f"the given frames' latent grid {tuple(pos.max(0).values + 1)} does not match the "
                             f"output's {tuple(grid)} in space")
        n = math.prod(grid)
        clean, mask = torch.zeros(S, tokens.shape[1]), torch.zeros(S, dtype=torch.bool)
        for frame, place in enumerate(self.at):
            if not 0 <= place < grid[0]:
                raise ValueError(f"given frame {frame} goes to latent frame {place}, outside the output's {grid[0]}")
            src = (pos[:, 0] == frame).nonzero().flatten()
            dst = place * grid[1] * grid[2] + torch.arange(grid[1] * grid[2])
            clean[dst], mask[dst] = tokens[src], True
        mask[n:] = False
        return clean, mask


@dataclass
class Edit:
    """Video-to-video editing (SDEdit, Meng et al. 2022, as Sora's report edits zero-shot): `latent` [C,T,H,W], the
    clip at the output's size, noised to the level the last `strength` of the sampling run starts from, then
    denoised under the prompt. strength 1 is text-to-video (from noise); towards 0 the clip comes back as it is."""

    latent: torch.Tensor
    strength: float

    def start(self, steps: int) -> int:
        """The first of the full run's `steps` steps the edit runs: the last round(strength * steps) are run."""
        if not 0 < self.strength <= 1:
            raise ValueError(f"strength={self.strength}: use 0 < strength <= 1 (1: from noise, text-to-video)")
        return steps - round(self.strength * steps)


def roll_frames(x: torch.Tensor, shift: int, grid) -> torch.Tensor:
    """Tokens [B,S,P] of one (t,h,w)-raster clip (its first prod(grid) tokens) rolled by `shift` latent frames."""
    n = math.prod(grid)
    clip = x[:, :n].unflatten(1, (grid[0], grid[1] * grid[2])).roll(shift, 1).flatten(1, 2)
    return torch.cat([clip, x[:, n:]], 1)


@torch.no_grad()
def generate_latents(forward, objective, texts: list[np.ndarray], grid, patch, channels: int, text_dim: int,
                     steps: int, guidance: float, solver: str, seed: int | list[int], device, multiple: int = 1,
                     given: GivenFrames | None = None, edit: Edit | None = None, loop: bool = False):
    """given: frames kept as given; the model reads them clean (t = 0) and they are put back at every step, so
    the output holds them exactly. edit: a clip to re-prompt (Edit). loop: the output's end leads into its start.

    How loops are made: at each call the model sees the clip rolled in time by one more latent frame than the last
    (its output rolled back), so every frame boundary, the wrap from the last frame to the first included, lies
    inside the clip the model denoises at most steps, and is made continuous like any other. Zero-shot: any
    checkpoint, no frame conditioning (which would need a second pass to bridge the end to the start), and no
    extra model calls; the price is that no frame is the clip's first for long, so a prompted motion that cannot
    come back to where it started (moving right across the frame) is traded for continuity at the wrap."""
    pos, seg, text, text_seg, extent = (x.to(device) for x in generation_batch(texts, grid, text_dim, multiple)[:5])
    n, S = math.prod(grid), pos.shape[1]
    B, P = len(texts), channels * math.prod(patch)
    if isinstance(seed, int):
        x = torch.randn(B, S, P, generator=torch.Generator().manual_seed(seed)).to(device)
    else:  # a seed per prompt: each sample's noise whatever else is in its batch (sharded metrics, tests/test_metrics)
        x = torch.stack([torch.randn(S, P, generator=torch.Generator().manual_seed(s)) for s in seed]).to(device)
    kw, impose = {}, lambda v: v  # noqa: E731
    if given is not None:
        if loop:
            raise ValueError("loop=true with given frames: a loop has no first or last frame to give")
        clean, mask = (v.to(device) for v in given.tokens(grid, patch, S))
        kw["given"] = mask.expand(2 * B, S)
        impose = lambda v: torch.where(mask[None, :, None], clean[None].to(v.dtype), v)  # noqa: E731
    start = 0
    if edit is not None:
        start = edit.start(steps)
        source = GivenFrames(edit.latent, list(range(edit.latent.shape[1] // patch[0])))
        clip = source.tokens(grid, patch, S)[0].to(device)[None].expand(B, S, P)
        if start == steps:  # nothing left to denoise: the clip itself
            return [unpatchify(clip[i, :n].cpu(), grid, patch, channels) for i in range(B)]
        if start > 0:  # strength 1 starts from the noise itself: the text-to-video path, bit for bit
            t0 = torch.tensor(objective.timesteps(steps, n)[start], device=device)
            x = objective.corrupt(clip, x, t0)[0]
    calls = 0

    def predict(x, t: float):
        nonlocal calls
        shift, calls = (calls % grid[0] if loop else 0), calls + 1
        x = roll_frames(impose(x), shift, grid) if shift else impose(x)
        out = forward(torch.cat([x, x]), torch.full((2 * B, 1), t, device=device), pos, seg, text, text_seg,
                      extent=extent, **kw).float()
        cond, uncond = out.chunk(2)
        out = guided(cond, uncond, guidance)
        return roll_frames(out, -shift, grid) if shift else out

    x0 = impose(objective.sample(predict, x, steps, n, solver, start=start))
    return [unpatchify(x0[i, :n].cpu(), grid, patch, channels) for i in range(B)]


def to_frames(codec: VideoCodec, latent: torch.Tensor) -> np.ndarray:
    """latent [C,T,H,W] -> uint8 frames [T,H,W,3]."""
    video = codec.decode(latent[None].float())[0].clamp(-1, 1)  # [3,T,H,W]
    return ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().to(torch.uint8).numpy()


def slug(prompt: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in prompt.lower())[:60].strip("_")


def write_videos(out_dir: Path, prompts: list[str], videos: list[np.ndarray], fps: int, prefix: str = "") -> list[Path]:
    """Writes <slug>.mp4 and <slug>.gif per prompt (gif scaled up for small videos); returns the gifs."""
    out_dir.mkdir(parents=True, exist_ok=True)
    gifs = []
    for i, (p, v) in enumerate(zip(prompts, videos)):
        stem = out_dir / f"{prefix}{i:02d}_{slug(p)}"
        write_mp4(stem.with_suffix(".mp4"), v, fps)
        write_gif(stem.with_suffix(".gif"), v, fps, scale=max(1, 192 // max(v.shape[1], v.shape[2])))
        gifs.append(stem.with_suffix(".gif"))
    return gifs
