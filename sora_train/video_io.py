"""Video files in and out, through PyAV (torchvision 0.29 has no video IO any more)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import av.filter
import numpy as np
from PIL import Image


class VideoReadError(RuntimeError):
    """A video file could not be decoded (corrupt, unreadable, no video stream)."""


@dataclass
class VideoInfo:
    """What the container says, without decoding a frame (one demux pass over the packets)."""

    fps: float
    frame_times: list[float]  # presentation time of each frame in seconds, in display order
    coded_height: int
    coded_width: int
    rotation: int  # degrees counterclockwise that make the stored frames upright (PyAV's VideoFrame.rotation)
    sample_aspect: float  # the width of a stored pixel over its height (anamorphic video: not 1)

    @property
    def frames(self) -> int:
        return len(self.frame_times)

    @property
    def duration(self) -> float:
        """Seconds from the first frame to the end of the last."""
        return round(self.frame_times[-1] + 1.0 / (self.fps or 1.0), 4)

    @property
    def display_size(self) -> tuple[int, int]:
        """(height, width) as a player shows it: pixel aspect applied (stretching the shorter way), then rotation."""
        h, w = self.coded_height, self.coded_width
        h, w = (h, round(w * self.sample_aspect)) if self.sample_aspect >= 1 else (round(h / self.sample_aspect), w)
        return (w, h) if self.rotation % 180 else (h, w)

    def window(self, start: float = 0.0, end: float | None = None) -> list[int]:
        """Indices of the frames shown in [start, end) seconds."""
        return [i for i, t in enumerate(self.frame_times) if t >= start - 1e-6 and (end is None or t < end - 1e-6)]


def _open(path):
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(f"{path}: {type(e).__name__}: {e}") from e
    if not container.streams.video:
        container.close()
        raise VideoReadError(f"{path}: no video stream")
    return container


@contextmanager
def _reading(path):
    """The open container; a decoder or I/O failure inside becomes a VideoReadError naming the file."""
    try:
        with _open(path) as container:
            yield container
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError) as e:
        raise VideoReadError(f"{path}: {type(e).__name__}: {e}") from e


def _seconds(pts: int, stream) -> float:
    """A timestamp in seconds from the stream's start, rounded so that the demuxer's and the decoder's agree."""
    return round((pts - (stream.start_time or 0)) * float(stream.time_base), 4)


def _rotation(stream) -> int:
    """The stream's display rotation (side data), read from its first frame (PyAV exposes it per frame)."""
    for frame in stream.container.decode(stream):
        return int(round(frame.rotation / 90)) * 90 % 360
    return 0


def probe_video(path: str | Path) -> VideoInfo:
    with _reading(path) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        pts = [p.pts for p in container.demux(stream) if p.size]
        if pts and None not in pts and stream.time_base:
            times = sorted(_seconds(p, stream) for p in pts)
        else:  # no timestamps (raw streams): a constant rate
            times = [i / (fps or 1.0) for i in range(len(pts))]
        container.seek(0)
        sar = stream.sample_aspect_ratio or stream.codec_context.sample_aspect_ratio
        info = VideoInfo(fps, times, stream.codec_context.height, stream.codec_context.width, _rotation(stream),
                         float(sar) if sar else 1.0)
    if not info.frames:
        raise VideoReadError(f"{path}: no video frames")
    return info


def read_frames(path: str | Path, indices: list[int], info: VideoInfo) -> np.ndarray:
    """The frames at `indices` (increasing), upright, at the stored resolution: uint8 [len(indices),H,W,3].
    Decodes only up to the last one asked for and converts only those kept, from the keyframe before the first
    (a seek), so memory is bounded by the frames kept, not by the file. Pixel aspect is left to the resize."""
    wanted = sorted(set(indices))
    wanted_set, by_time = set(wanted), {info.frame_times[i]: i for i in wanted}
    out: dict[int, np.ndarray] = {}
    with _reading(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        start = info.frame_times[wanted[0]]
        seek = wanted[0] > 0 and stream.time_base is not None
        if seek:  # backward: to the keyframe at or before `start`; frames are then matched by timestamp
            try:
                container.seek(int(start / float(stream.time_base)) + (stream.start_time or 0), stream=stream,
                               backward=True)
            except av.FFmpegError:  # a format that cannot seek (some GIFs): decode from the start
                seek = False
        for n, frame in enumerate(container.decode(stream)):
            if seek:
                i = by_time.get(_seconds(frame.pts, stream)) if frame.pts is not None else None
            else:  # from the first frame: by count (robust to odd timestamps)
                i = n if n in wanted_set else None
            if i is not None and i not in out:
                out[i] = np.rot90(frame.to_ndarray(format="rgb24"), k=int(round(frame.rotation / 90)))
            if len(out) == len(wanted) or (not seek and n >= wanted[-1]):
                break
    if not out:
        raise VideoReadError(f"{path}: no decodable frames")
    kept = [out[i] for i in wanted if i in out]  # a damaged tail: what decoded
    return np.ascontiguousarray(np.stack(kept))


def read_video(path: str | Path, first: int | None = None, last: int | None = None) -> tuple[np.ndarray, float]:
    """Every frame (or only the `first` n / the `last` n), upright. Returns (frames uint8 [T,H,W,3], fps)."""
    info = probe_video(path)
    indices = list(range(info.frames))
    indices = indices[:first] if first is not None else indices[-last:] if last is not None else indices
    return read_frames(path, indices, info), info.fps


def scene_cuts(path: str | Path, threshold: float = 10.0, width: int = 160) -> list[float]:
    """Times (seconds) where a new shot starts, by FFmpeg's scene-change detector (the scdet filter: the mean
    absolute difference between successive frames, normalised, above `threshold` out of 100), on frames scaled
    to `width` pixels wide. Chosen over PySceneDetect: the same kind of content detector, already inside the
    FFmpeg that PyAV ships (no OpenCV dependency), and it runs in C inside the decode pass."""
    cuts = []
    with _reading(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        graph = av.filter.Graph()
        nodes = [graph.add_buffer(template=stream), graph.add("scale", f"{width}:-2"),
                 graph.add("scdet", f"threshold={threshold}"), graph.add("buffersink")]
        graph.link_nodes(*nodes).configure()
        for frame in container.decode(stream):
            graph.push(frame)
            while True:
                try:
                    out = graph.pull()
                except (av.BlockingIOError, av.EOFError):
                    break
                if "lavfi.scd.time" in out.metadata and out.pts is not None:
                    cuts.append(_seconds(out.pts, stream))
    return cuts


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
