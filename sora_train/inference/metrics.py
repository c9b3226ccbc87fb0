"""FVD, FID and CLIPScore of a model against held-out real clips: what `sora-eval task=metrics` reports and what
`logging.metrics_every` logs during training (engine/quality.py), computed the same way by both.

One sample is generated per held-out caption, at the clip's own size and length (or `metrics.size`), with a seed of
its own (seed + the clip's index), so a sample is the same whatever batch or rank generated it. Generation is
sharded over data-parallel ranks by batches (every rank runs as many, so ZeRO-3's collectives line up; a rank short
of work repeats a batch and drops it); features are gathered to every rank, in clip order.

The floor beside the scores: the same distances between two halves of the real set (even and odd clips), and the
real clips' own CLIPScore. FVD and FID are biased upward on few clips (StyleGAN-V's FVD uses 2048): the report
says how many were used, and compare only figures over the same count."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .features import (FID_FRAMES, PROTOCOLS, MetricNetworkError, clip_network, first_frames, image_network,
                       video_network)
from .frechet import Gaussian, frechet_distance

REFERENCE_CLIPS = 2048  # StyleGAN-V's FVD_2048 and FID-50k's smaller cousin: fewer clips, a larger bias


@dataclass
class HeldOut:
    """One held-out clip: its caption, the size [frames, height, width] its sample is generated at, and where its
    real frames come from (a shard's latent, decoded by the checkpoint's codec, or a video file)."""

    index: int
    caption: str
    size: tuple[int, int, int]
    where: str
    latent: np.ndarray | None = None
    path: str | None = None
    codec: object | None = None  # the one the shards were encoded with, where it is not the checkpoint's

    def frames(self, codec) -> np.ndarray:
        """The real clip, uint8 [T,H,W,3] at `size` (resized to cover it and centre-cropped where it differs)."""
        if self.latent is not None:
            from .generate import to_frames

            video = to_frames(self.codec or codec, torch.from_numpy(self.latent.astype(np.float32)))
        else:
            from ..video_io import read_video

            video = read_video(self.path, first=self.size[0])[0]
        return fit(first_frames(video, self.size[0]), self.size[1], self.size[2])


def fit(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """uint8 [T,H,W,3] resized to cover height x width (bilinear, antialiased) and centre-cropped to it."""
    if video.shape[1:3] == (height, width):
        return video
    from torchvision.transforms.v2 import functional as TF

    x = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2)
    s = max(height / x.shape[2], width / x.shape[3])
    x = TF.resize(x, [max(height, round(x.shape[2] * s)), max(width, round(x.shape[3] * s))], antialias=True)
    return TF.center_crop(x, [height, width]).permute(0, 2, 3, 1).contiguous().numpy()


def held_out(real: str, clips: int, codec, size: list[int] | None, key: str = "real") -> tuple[list[HeldOut], int]:
    """The first `clips` usable clips of `real` (shards, or a captions.jsonl of videos, rows {"path", "caption"})
    in order, and how many were skipped (unreadable, or without a caption)."""
    if not real:
        raise ValueError(f"{key}: no held-out clips given (shards, or a captions.jsonl of videos)")
    fixed = tuple(int(v) for v in size) if size else None
    if str(real).endswith(".jsonl"):
        return _videos(Path(real), clips, fixed, key)
    from ..codecs import codec_from_manifest_name
    from ..data.decode import BadSample, load_npy
    from ..data.shards import list_shards, load_manifest
    from ..data.stream import read_shard

    items, skipped, errors = [], 0, []
    try:
        urls = list_shards(real)
        manifest = load_manifest(real) or {}
    except (ValueError, FileNotFoundError) as e:
        raise ValueError(f"{key}={real}: {e}") from e
    own = manifest.get("codec", {}).get("name")  # decoded by the codec they were encoded with
    device = str(getattr(codec, "device", "cpu"))  # a VAE's; the pixel codec has none
    real_codec = codec_from_manifest_name(own, device=device) if own and own != codec.info.name else None
    ft, fh, fw = (real_codec or codec).info.factors
    causal = (real_codec or codec).info.causal_time
    for url in urls:
        for raw in read_shard(url, lambda u, k, why: errors.append(f"{u}: {why}")):
            if len(items) == clips:
                break
            try:
                latent = load_npy(raw["latent.npy"], "latent.npy") if "latent.npy" in raw else None
                caption = raw.get("txt", b"")
                caption = caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)
                if latent is None or latent.ndim != 4 or not caption:
                    raise BadSample("no latent.npy or no caption")
            except (BadSample, UnicodeDecodeError):
                skipped += 1
                continue
            _, t, h, w = latent.shape
            frames = 1 + (t - 1) * ft if causal else t * ft
            items.append(HeldOut(len(items), caption, fixed or (frames, h * fh, w * fw), f"{url}#{raw['__key__']}",
                                 latent=latent, codec=real_codec))
        if len(items) == clips:
            break
    if not items:
        raise ValueError(f"{key}={real}: no clip with a latent and a caption in {len(urls)} shard(s)")
    return items, skipped + len(errors)


def _videos(path: Path, clips: int, size, key: str) -> tuple[list[HeldOut], int]:
    if not path.is_file():
        raise ValueError(f"{key}={path}: no such file")
    if size is None:
        raise ValueError(f"{key}={path}: videos have no encoded size: set metrics.size=[frames,height,width] "
                         "(or pass the held-out shards, whose clips each have their own)")
    items, skipped = [], 0
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if len(items) == clips:
            break
        try:
            row = json.loads(line)
            video, caption = row["path"], row["caption"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{path}:{line_no}: a row needs \"path\" and \"caption\" ({e})") from e
        video = Path(video) if Path(video).is_absolute() else path.parent / video
        if not video.is_file() or not isinstance(caption, str) or not caption or not _readable(video):
            skipped += 1
            continue
        items.append(HeldOut(len(items), caption, size, f"{path}:{line_no}", path=str(video)))
    if not items:
        raise ValueError(f"{key}={path}: no row with an existing video and a caption")
    return items, skipped


def _readable(video: Path) -> bool:
    """A video whose container and stream PyAV can open (a corrupt one is skipped and counted, not read later)."""
    from ..video_io import VideoReadError, probe_video

    try:
        return probe_video(video).frames > 0
    except VideoReadError:
        return False


def batches(items: list[HeldOut], batch: int) -> list[list[HeldOut]]:
    """Clips of one size together (a generation batch has one size), `batch` at most, in clip order within."""
    by_size: dict[tuple, list[HeldOut]] = {}
    for it in items:
        by_size.setdefault(it.size, []).append(it)
    return [group[i : i + batch] for group in by_size.values() for i in range(0, len(group), batch)]


def share(all_batches: list, dp_rank: int, dp: int) -> list[tuple[list, bool]]:
    """This data-parallel rank's batches, round-robin, as (batch, counted): every rank gets as many (its last one
    repeated, not counted, where it is short), so their collectives line up."""
    n = -(-len(all_batches) // dp)
    mine = all_batches[dp_rank::dp]
    return [(mine[i], True) if i < len(mine) else (mine[-1] if mine else all_batches[0], False) for i in range(n)]


class Metrics:
    """The feature networks a MetricsConfig names (each optional), loaded once and run once on a dummy clip (a
    network that cannot take the protocol's input is refused there, in one line naming its path, before any sample
    is generated). rows(): per clip, one float64 row [index | FVD features | FID features | CLIPScore]."""

    def __init__(self, cfg, device: torch.device, prefix: str = "metrics"):
        given = {"fvd": ("fvd_network", video_network), "fid": ("fid_network", image_network),
                 "clipscore": ("clip_network", clip_network)}
        self.nets, self.widths = {}, {}
        for name, (attr, load) in given.items():
            path = getattr(cfg, attr)
            if not path:
                continue
            key = f"{prefix}.{attr}"
            net = self.nets[name] = load(key, path, device)
            dummy = [np.zeros((2, 32, 32, 3), np.uint8)]
            try:
                out = net(dummy, ["a"]).reshape(1, -1) if name == "clipscore" else net(dummy)
            except Exception as e:  # noqa: BLE001 - whatever the network raises, the message names it
                raise MetricNetworkError(f"{key}={path}: the network fails on the protocol's input {net.takes} "
                                         f"({str(e).strip().splitlines()[-1][:200]})") from e
            if out.ndim != 2 or out.shape[0] != 1:
                raise MetricNetworkError(f"{key}={path}: returned {tuple(out.shape)} for one clip, not one feature "
                                         "vector [1,D]")
            self.widths[name] = out.shape[1]
        if not self.nets:
            raise ValueError(f"{prefix}: no feature network given: set {prefix}.fvd_network, {prefix}.fid_network "
                             f"and/or {prefix}.clip_network")
        self.width = 1 + sum(self.widths.values())

    def describe(self) -> dict:
        return {name: {"network": net.name, "protocol": PROTOCOLS[net.protocol]} for name, net in self.nets.items()}

    def rows(self, items: list[HeldOut], videos: list[np.ndarray]) -> torch.Tensor:
        parts = [torch.tensor([[float(it.index)] for it in items], dtype=torch.float64)]
        for name, net in self.nets.items():
            f = net(videos, [it.caption for it in items]) if name == "clipscore" else net(videos)
            parts.append(f.reshape(len(items), -1).double())
        return torch.cat(parts, 1)

    def empty(self) -> torch.Tensor:
        return torch.zeros(0, self.width, dtype=torch.float64)

    def split(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        out, at = {}, 1
        for name in self.nets:
            out[name], at = rows[:, at : at + self.widths[name]], at + self.widths[name]
        return out

    def scores(self, real: torch.Tensor, generated: torch.Tensor) -> dict[str, float]:
        """Each metric of the generated clips' rows against the real ones'."""
        r, g = self.split(real), self.split(generated)
        out = {}
        if "fvd" in r:
            out["fvd"] = frechet_distance(Gaussian.of(r["fvd"]), Gaussian.of(g["fvd"]))
        if "fid" in r:  # each clip's FID_FRAMES frames are samples of the image distribution
            frames = lambda x: x.reshape(-1, self.widths["fid"] // FID_FRAMES)  # noqa: E731
            out["fid"] = frechet_distance(Gaussian.of(frames(r["fid"])), Gaussian.of(frames(g["fid"])))
        if "clipscore" in g:
            out["clipscore"] = float(g["clipscore"].mean())
        return out

    def floor(self, real: torch.Tensor) -> dict[str, float]:
        """The distances between two halves of the real set, and the real clips' own CLIPScore."""
        a, b = halves(len(real))
        out = self.scores(real[a], real[b]) if len(real) >= 4 else {}
        if "clipscore" in self.nets:
            out["clipscore"] = float(self.split(real)["clipscore"].mean())
        return out

    def at_half(self, real: torch.Tensor, generated: torch.Tensor) -> dict[str, float]:
        """FVD/FID of one half of the generated clips against the other half of the real ones: the same counts as
        the floor's (the bias of a Fréchet distance grows as the count falls, so only these compare with it)."""
        a, b = halves(len(real))
        if len(real) < 4:
            return {}
        return {f"{k}_at_half": v for k, v in self.scores(real[b], generated[a]).items() if k != "clipscore"}


def halves(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two halves of n clips drawn at random (a fixed seed): clip order can carry structure (a dataset written by
    source or by kind; the synthetic world's neighbours differ), which an even/odd split would turn into a
    distance."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    return order[: n // 2].sort().values, order[n // 2 : 2 * (n // 2)].sort().values


def gathered(rows: torch.Tensor, device: torch.device, world: int, sends: bool = True) -> torch.Tensor:
    """Every rank's rows on every rank, in clip order. sends=False: a sequence-parallel member's copy of its
    group's rows (the group's first rank sends them)."""
    if world > 1:
        from ..parallel.collectives import gather_rows

        rows = gather_rows(rows if sends else rows[:0], device)
    return rows[rows[:, 0].argsort()]


def generate_rows(pipe, metrics: Metrics, my_batches, steps: int, guidance: float, sampler: str, seed: int,
                  keep: int = 0) -> tuple[torch.Tensor, list[tuple[HeldOut, np.ndarray]]]:
    """This rank's samples' rows (counted batches only), and the first `keep` samples with their clips."""
    rows, kept = [], []
    for batch, counted in my_batches:
        f, h, w = batch[0].size
        videos = pipe.generate([it.caption for it in batch], f, h, w, steps, guidance, sampler,
                               [seed + it.index for it in batch])
        if counted:
            rows.append(metrics.rows(batch, videos))
            kept += list(zip(batch, videos))[: max(0, keep - len(kept))]
    return (torch.cat(rows) if rows else metrics.empty()), kept


def real_rows(codec, metrics: Metrics, my_batches) -> torch.Tensor:
    rows = [metrics.rows(batch, [it.frames(codec) for it in batch]) for batch, counted in my_batches if counted]
    return torch.cat(rows) if rows else metrics.empty()


def bias_note(n: int) -> str | None:
    if n < REFERENCE_CLIPS:
        return (f"FVD/FID over {n} clips (< {REFERENCE_CLIPS}, StyleGAN-V's count) are biased upward: compare only "
                "figures over the same number of clips")
    return None
