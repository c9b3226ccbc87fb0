"""Video files in and out, through PyAV (torchvision 0.29 has no video IO any more)."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


class VideoReadError(RuntimeError):
    """A video file could not be decoded (corrupt, unreadable, no video stream)."""


def read_video(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode every frame. Returns (frames uint8 [T,H,W,3], fps)."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0.0)
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(f"{path}: {type(e).__name__}: {e}") from e
    if not frames:
        raise VideoReadError(f"{path}: no decodable frames")
    return np.stack(frames), fps


def write_mp4(path: str | Path, frames: np.ndarray, fps: float, crf: int = 18) -> None:
    """frames: uint8 [T,H,W,3]; H and W are padded to even sizes as yuv420p requires."""
    t, h, w, _ = frames.shape
    ph, pw = h + h % 2, w + w % 2
    if (ph, pw) != (h, w):
        frames = np.pad(frames, ((0, 0), (0, ph - h), (0, pw - w), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = pw, ph, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_gif(path: str | Path, frames: np.ndarray, fps: float, scale: int = 1) -> None:
    images = [Image.fromarray(f) for f in frames]
    if scale > 1:
        images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    images[0].save(str(path), save_all=True, append_images=images[1:], duration=int(1000 / max(fps, 1)), loop=0)
