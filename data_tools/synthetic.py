"""A synthetic captioned-video dataset whose captions are ground truth.

Each clip is one shape of a named colour moving in a named direction (or beating: pulsing in
size) over a plain background. Clips vary in resolution, aspect ratio, duration and fps like a
scraped dataset, and are written as real mp4 files plus a JSONL captions file, so the whole
encode -> shards -> train path runs on them exactly as it would on real data.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from sora_train.synthetic_world import BACKGROUNDS, COLOURS, HELDOUT_PAIRS, MOTIONS, SHAPES  # noqa: F401 (re-exported)
from sora_train.video_io import write_mp4


@dataclass(frozen=True)
class ClipSpec:
    colour: str
    shape: str
    motion: str
    background: str
    height: int
    width: int
    frames: int
    fps: int
    size: float  # shape radius as a fraction of min(height, width)
    start: tuple[float, float]  # centre at frame 0, as fractions of (width, height)
    travel: float = 0.45  # fraction of the frame crossed over the clip, whatever its length

    @property
    def caption(self) -> str:
        verb = "beating" if self.motion == "beating" else f"moving {self.motion}"
        return f"a {self.colour} {self.shape} {verb} on a {self.background} background"

    @property
    def still_caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"


def shape_mask(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """u, v: coordinates in units of the radius, v pointing down. Returns a boolean mask."""
    if shape == "square":
        return (np.abs(u) <= 0.85) & (np.abs(v) <= 0.85)
    if shape == "circle":
        return u * u + v * v <= 1.0
    if shape == "triangle":  # apex up
        return (v >= -1.0) & (v <= 0.9) & (np.abs(u) <= (v + 1.0) * 0.55)
    if shape == "heart":
        x, y = u * 1.15, -v * 1.15 + 0.15
        return (x * x + y * y - 1.0) ** 3 - x * x * y**3 <= 0.0
    raise ValueError(f"unknown shape {shape!r}; known: {SHAPES}")


def motion_centre(spec: ClipSpec, i: int) -> tuple[float, float]:
    """Centre of the shape at frame i, in pixels."""
    progress = i / max(spec.frames - 1, 1)
    travel = spec.travel
    cx, cy = spec.start
    dx, dy = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}.get(spec.motion, (0, 0))
    return (cx + dx * travel * progress) * spec.width, (cy + dy * travel * progress) * spec.height


def render(spec: ClipSpec) -> np.ndarray:
    """Returns uint8 frames [T,H,W,3]."""
    ys, xs = np.mgrid[0 : spec.height, 0 : spec.width].astype(np.float32) + 0.5
    base_r = spec.size * min(spec.height, spec.width)
    bg = np.array(BACKGROUNDS[spec.background], np.uint8)
    fg = np.array(COLOURS[spec.colour], np.uint8)
    out = np.empty((spec.frames, spec.height, spec.width, 3), np.uint8)
    for i in range(spec.frames):
        r = base_r
        if spec.motion == "beating":  # 2.5 beats per clip whatever its length: survives frame subsampling
            r = base_r * (1.0 + 0.35 * np.sin(2 * np.pi * 2.5 * i / max(spec.frames, 4)))
        cx, cy = motion_centre(spec, i)
        mask = shape_mask(spec.shape, (xs - cx) / r, (ys - cy) / r)
        out[i] = np.where(mask[..., None], fg, bg)
    return out


def random_spec(rng: random.Random, min_size=32, max_size=128, min_frames=4, max_frames=64,
                max_aspect: float = 2.0, travel: float = 0.45, radius: tuple[float, float] = (0.16, 0.24),
                heldout: bool = False) -> ClipSpec:
    pairs = [(c, s) for c, s in itertools.product(COLOURS, SHAPES) if ((c, s) in HELDOUT_PAIRS) == heldout]
    colour, shape = rng.choice(pairs)
    motion = rng.choice(MOTIONS)
    background = rng.choice(list(BACKGROUNDS))
    aspect = max_aspect ** rng.uniform(-1.0, 1.0)  # width / height in [1:max_aspect, max_aspect:1]
    long_side = rng.randrange(min_size, max_size + 1, 8)
    if aspect >= 1:
        width, height = long_side, max(min_size, int(long_side / aspect) // 8 * 8)
    else:
        height, width = long_side, max(min_size, int(long_side * aspect) // 8 * 8)
    a, b = 0.5 + travel / 2, 0.5 - travel / 2  # centred paths: the clip's middle frame has the shape in the middle
    start = {"left": (a, 0.5), "right": (b, 0.5), "up": (0.5, a), "down": (0.5, b)}.get(motion, (0.5, 0.5))
    return ClipSpec(colour, shape, motion, background, height, width,
                    frames=rng.randint(min_frames, max_frames), fps=rng.choice((8, 12, 16, 24)),
                    size=rng.uniform(*radius), start=start, travel=travel)


def generate(out_dir: str | Path, num_clips: int, seed: int = 0, heldout: bool = False, stills: bool = False,
             **ranges) -> Path:
    """Writes out_dir/videos/*.mp4 (stills: out_dir/images/*.png, each a clip's middle frame, captioned without
    the motion: images train as one-frame clips) and out_dir/captions.jsonl; returns the captions path."""
    out = Path(out_dir)
    (out / ("images" if stills else "videos")).mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    captions = out / "captions.jsonl"
    with open(captions, "w") as f:
        for i in range(num_clips):
            spec = random_spec(rng, heldout=heldout, **ranges)
            if stills:
                rel, caption = f"images/still_{i:06d}.png", spec.still_caption
                Image.fromarray(render(spec)[spec.frames // 2]).save(out / rel)
            else:
                rel, caption = f"videos/clip_{i:06d}.mp4", spec.caption
                write_mp4(out / rel, render(spec), spec.fps)
            f.write(json.dumps({"path": rel, "caption": caption, "attributes": asdict(spec)}) + "\n")
    return captions


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="directory for videos/ and captions.jsonl")
    p.add_argument("--num-clips", type=int, default=512, help="clips to write")
    p.add_argument("--seed", type=int, default=0, help="random seed (the same seed writes the same clips)")
    p.add_argument("--min-size", type=int, default=32, help="smallest frame side in pixels")
    p.add_argument("--max-size", type=int, default=128, help="largest frame side in pixels")
    p.add_argument("--min-frames", type=int, default=4, help="fewest frames per clip")
    p.add_argument("--max-frames", type=int, default=64, help="most frames per clip")
    p.add_argument("--max-aspect", type=float, default=2.0, help="widest width:height (and height:width); 1 = square")
    p.add_argument("--travel", type=float, default=0.45, help="fraction of the frame a moving shape crosses")
    p.add_argument("--radius", type=float, nargs=2, default=(0.16, 0.24), metavar=("MIN", "MAX"),
                   help="shape radius range, as a fraction of the frame's shorter side")
    p.add_argument("--heldout", action="store_true", help="generate only the held-out (colour, shape) pairs")
    p.add_argument("--stills", action="store_true", help="write still images (png, a clip's middle frame) instead")
    a = p.parse_args(argv)
    path = generate(a.out, a.num_clips, a.seed, a.heldout, a.stills, min_size=a.min_size, max_size=a.max_size,
                    min_frames=a.min_frames, max_frames=a.max_frames, max_aspect=a.max_aspect, travel=a.travel,
                    radius=tuple(a.radius))
    print(f"wrote {a.num_clips} clips and {path}")


if __name__ == "__main__":
    main()
