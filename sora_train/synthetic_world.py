"""The synthetic world: its vocabulary (colours, backgrounds, shapes, motions, the held-out pairs) and how a clip of
it is drawn. One module for the generator (data_tools/synthetic.py) and the evaluator that scores generated clips
and draws the given frames of image-to-video and extension tasks (sora_train/inference/evaluate.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (230, 30, 30),
    "yellow": (235, 215, 30),
    "green": (30, 200, 60),
    "cyan": (30, 210, 220),
    "blue": (40, 70, 235),
    "magenta": (220, 40, 210),
}
BACKGROUNDS = {"black": (0, 0, 0), "white": (245, 245, 245), "gray": (128, 128, 128)}
SHAPES = ("square", "circle", "triangle", "heart")
MOTIONS = ("left", "right", "up", "down", "beating")

# (colour, shape) pairs never generated for training: evaluation asks for them to test that
# the model composes attributes rather than memorising captions.
HELDOUT_PAIRS = frozenset({("red", "circle"), ("blue", "heart"), ("green", "triangle"), ("yellow", "square")})

# What only a detailed caption says (sora-synth --detailed draws them; the short caption leaves them out): the
# shape's size (radius range, fraction of the shorter side), its speed (share of the frame crossed in the clip)
# and where across its path it runs (fraction of the perpendicular side).
SIZES = {"small": (0.12, 0.16), "large": (0.25, 0.30)}
SPEEDS = {"slowly": 0.25, "quickly": 0.6}
PLACES = {"horizontal": {"in the upper part": 0.3, "in the middle": 0.5, "in the lower part": 0.7},
          "vertical": {"on the left side": 0.3, "in the middle": 0.5, "on the right side": 0.7}}


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

    @property
    def size_word(self) -> str:
        return "small" if self.size < 0.2 else "large"

    @property
    def speed_word(self) -> str | None:
        return None if self.motion == "beating" else ("slowly" if self.travel < 0.4 else "quickly")

    @property
    def place_word(self) -> str:
        axis = "vertical" if self.motion in ("up", "down") else "horizontal"
        across = self.start[0] if axis == "vertical" else self.start[1]
        return min(PLACES[axis], key=lambda w: abs(PLACES[axis][w] - across))

    @property
    def detailed_caption(self) -> str:
        verb = "beating" if self.motion == "beating" else f"moving {self.motion} {self.speed_word}"
        return (f"a {self.size_word} {self.colour} {self.shape} {verb} {self.place_word} of the frame, "
                f"on a {self.background} background")


def centred_start(motion: str, travel: float, across: float = 0.5) -> tuple[float, float]:
    """Where a shape starts (fractions of width, height) so that its path is centred along the motion: the clip's
    middle frame has it in the middle; `across` places the path on the other axis."""
    a, b = 0.5 + travel / 2, 0.5 - travel / 2
    return {"left": (a, across), "right": (b, across), "up": (across, a), "down": (across, b)}.get(motion, (0.5, 0.5))


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
