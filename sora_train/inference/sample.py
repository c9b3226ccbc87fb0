"""sora-sample: a checkpoint (or an export) + prompts (+ an image to animate, a video to extend or to edit, or two
clips to connect; or a loop) -> mp4 and gif files on one device."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import numpy as np

from .. import CONF_DIR
from ..config import register
from ..video_io import VideoReadError, read_video
from .generate import Edit, GivenFrames, write_videos
from .pipeline import load_pipeline

register()


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_frames_of(key: str, path: str, first: int | None = None, last: int | None = None) -> np.ndarray:
    """An image (one frame) or a video's frames (only its `first` n or `last` n, decoding no more), uint8 [T,H,W,3],
    writable (torch.from_numpy warns on a read-only array). `key`: the option that named the file, for errors."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}={path}: no such file")
    if Path(path).suffix.lower() in IMAGE_SUFFIXES:
        from PIL import Image, UnidentifiedImageError

        try:
            return np.array(Image.open(path).convert("RGB"))[None]
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"{key}={path}: not an image that can be read ({e})") from None
    try:
        frames = read_video(path, first, last)[0]
    except VideoReadError as e:
        raise ValueError(f"{key}={path}: not a video that can be read ({e})") from None
    return frames if frames.flags.writeable else frames.copy()


def edit_of(cfg, pipe) -> Edit | None:
    """video= with strength= -> the clip to re-prompt (video-to-video editing)."""
    if cfg.strength is None:
        return None
    if not cfg.video:
        raise ValueError("strength= edits a clip: give it as video=")
    others = [k + "=" for k in ("image", "first", "last") if cfg[k]]
    if others:
        raise ValueError(f"video= with strength= edits the whole clip: {' and '.join(others)} cannot be given too")
    return pipe.edit(read_frames_of("video", cfg.video, first=cfg.frames), cfg.frames, cfg.height, cfg.width,
                     cfg.strength)


def given_frames(cfg, pipe) -> GivenFrames | None:
    """image= | video= with extend= | first= and/or last= -> the frames the sampler keeps."""
    editing = cfg.strength is not None  # then video= is the clip to edit (edit_of), not given frames
    asked = [k for k in ("image", "video", "first", "last") if cfg[k] and not (k == "video" and editing)]
    if not asked:
        return None
    if len(asked) > 1 and set(asked) != {"first", "last"}:
        raise ValueError(f"give one of image=, video= or first=/last=, not {' and '.join(k + '=' for k in asked)}")
    first = last = None
    if cfg.image:
        first = read_frames_of("image", cfg.image, first=1)
    if cfg.video:
        if cfg.extend not in ("forward", "backward"):
            raise ValueError(f"extend={cfg.extend!r}: use forward or backward")
        if cfg.extend == "forward":  # the clip's end opens the output
            first = read_frames_of("video", cfg.video, last=cfg.context_frames)
        else:  # its start closes it
            last = read_frames_of("video", cfg.video, first=cfg.context_frames)
        got = len(first if first is not None else last)
        if got < cfg.context_frames:
            print(f"warning: video={cfg.video} has {got} frame(s), fewer than context_frames={cfg.context_frames}: "
                  f"all {got} are given", file=sys.stderr, flush=True)
    if cfg.first:
        first = read_frames_of("first", cfg.first, last=1)
    if cfg.last:
        last = read_frames_of("last", cfg.last, first=1)
    return pipe.given_frames(cfg.frames, cfg.height, cfg.width, first, last)


def check_inputs(cfg) -> None:
    """The prompting options' combinations, refused before any weights or files are read."""
    given = [k + "=" for k in ("image", "first", "last") if cfg[k]] + (["video="] if cfg.video and cfg.strength is None
                                                                      else [])
    if cfg.loop and given:
        raise ValueError(f"loop=true with given frames ({' and '.join(given)}): a loop has no first or last frame to "
                         f"give (loop=true with video= strength= loops an edit)")
    if cfg.strength is not None:
        Edit(None, cfg.strength).start(1)


def run(cfg) -> list[Path]:
    from ..preflight import check_known_keys

    check_known_keys(cfg)
    check_inputs(cfg)
    pipe = load_pipeline(cfg.checkpoint, cfg.use_ema, cfg.device, cfg.text_encoder)
    prompts = list(cfg.prompts)
    if cfg.upsample:  # the files keep the user's prompts' names; prompts.jsonl records both
        from .upsample import upsample

        rewritten = upsample(prompts, cfg.upsample, max_new_tokens=cfg.upsample_max_new_tokens)
        Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
        with open(Path(cfg.out_dir) / "prompts.jsonl", "w") as f:
            for p, r in zip(prompts, rewritten):
                print(f"prompt: {p}\n  upsampled: {r}")
                f.write(json.dumps({"prompt": p, "upsampled": r, "upsampler": Path(cfg.upsample).name}) + "\n")
    videos = pipe.generate(rewritten if cfg.upsample else prompts, cfg.frames, cfg.height, cfg.width, cfg.steps,
                           cfg.guidance, cfg.sampler, cfg.seed, given_frames(cfg, pipe), edit_of(cfg, pipe), cfg.loop)
    gifs = write_videos(Path(cfg.out_dir), prompts, videos, cfg.fps)
    for g in gifs:
        print(f"wrote {g.with_suffix('.mp4')} and {g}")
    return gifs


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="sample")
def main(cfg) -> None:
    try:
        run(cfg)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"sample error: {e}")


if __name__ == "__main__":
    main()
