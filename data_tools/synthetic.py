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
from dataclasses import asdict
from pathlib import Path

from PIL import Image

from sora_train.synthetic_world import (BACKGROUNDS, COLOURS, HELDOUT_PAIRS, MOTIONS, PLACES, SHAPES, SIZES, SPEEDS,
                                        ClipSpec, centred_start, render)
from sora_train.video_io import write_mp4


def random_spec(rng: random.Random, min_size=32, max_size=128, min_frames=4, max_frames=64,
                max_aspect: float = 2.0, travel: float = 0.45, radius: tuple[float, float] = (0.16, 0.24),
                heldout: bool = False, detailed: bool = False) -> ClipSpec:
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
    frames, fps, size = rng.randint(min_frames, max_frames), rng.choice((8, 12, 16, 24)), rng.uniform(*radius)
    across = 0.5
    if detailed:  # drawn after the others: without --detailed the clips are what they always were
        size = rng.uniform(*SIZES[rng.choice(sorted(SIZES))])
        travel = SPEEDS[rng.choice(sorted(SPEEDS))]
        places = PLACES["vertical" if motion in ("up", "down") else "horizontal"]
        across = places[rng.choice(sorted(places))] if motion != "beating" else 0.5
    return ClipSpec(colour, shape, motion, background, height, width, frames=frames, fps=fps, size=size,
                    start=centred_start(motion, travel, across), travel=travel)


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
            long = {"caption_long": spec.detailed_caption} if ranges.get("detailed") else {}
            f.write(json.dumps({"path": rel, "caption": caption, **long, "attributes": asdict(spec)}) + "\n")
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
    p.add_argument("--detailed", action="store_true",
                   help="also vary size, speed and place, and write a detailed caption_long beside the short caption")
    a = p.parse_args(argv)
    path = generate(a.out, a.num_clips, a.seed, a.heldout, a.stills, min_size=a.min_size, max_size=a.max_size,
                    min_frames=a.min_frames, max_frames=a.max_frames, max_aspect=a.max_aspect, travel=a.travel,
                    radius=tuple(a.radius), detailed=a.detailed)
    print(f"wrote {a.num_clips} clips and {path}")


if __name__ == "__main__":
    main()
