"""Encode captioned videos into webdataset shards of latents + text states, with a manifest.

Policy for each clip (documented in README "Data"):
  1. frames: keep every `stride`-th frame (stride = round(fps / target_fps) when target_fps is
     set), keep at most `max_frames`, then snap down to a count the codec maps to a whole number
     of temporal patches; fewer than `min_frames` left -> the clip is skipped as too short. With
     span=True the same number of frames is taken evenly from the first to the last frame.
  2. space: keep the aspect ratio, scale down (never up) so H*W <= max_pixels, snap H and W down
     to multiples of codec factor x patch size, resize (antialiased) and centre-crop to that.
  3. codec.encode(frames in [-1,1]) -> latent (C,T',H',W') float16; caption -> text states.

Inputs are cut into fixed chunks of `clips_per_shard` lines of the captions file and chunk i is
written to shard-{i:06d}.tar. We write each chunk with webdataset's TarWriter rather than
ShardWriter because ShardWriter cuts shards by size as it goes: the inputs of a shard are then
unknown in advance, so a rerun cannot skip finished shards and array tasks cannot own disjoint
outputs. A shard's size stays bounded because the policy caps pixels and frames per clip.
Finished shards are published by rename with a sidecar .json, so reruns skip them; a bad video
is skipped, counted and listed in failures.jsonl, never aborting the job.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torchvision.transforms.v2 import functional as TF

from sora_train.codecs import VideoCodec, build_codec
from sora_train.video_io import VideoReadError, read_video

MANIFEST_VERSION = 1


@dataclass
class EncodePolicy:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    max_pixels: int = 64 * 64
    max_frames: int = 32
    min_frames: int = 2
    target_fps: float | None = None
    span: bool = False  # stride so that max_frames cover the whole clip (short clips, motion datasets)


class ClipRejected(ValueError):
    """The clip cannot be used under the policy (too short, too small)."""


def frame_indices(num_frames: int, fps: float, policy: EncodePolicy, codec: VideoCodec) -> list[int]:
    stride = max(1, round(fps / policy.target_fps)) if policy.target_fps and fps else 1
    kept = min(math.ceil(num_frames / stride), policy.max_frames)
    kept = codec.info.snap_frames(kept, latent_multiple=policy.patch_size[0])
    if kept < max(policy.min_frames, 1):
        raise ClipRejected(f"too short: {num_frames} frames at stride {stride} leave {kept} usable (< {policy.min_frames})")
    if policy.span:  # a whole-number stride would stop short (15 frames -> 8 at stride 1 cover half the clip)
        return np.linspace(0, num_frames - 1, kept).round().astype(int).tolist()
    return list(range(0, kept * stride, stride))


def target_size(h: int, w: int, policy: EncodePolicy, codec: VideoCodec) -> tuple[int, int]:
    mh = codec.info.factors[1] * policy.patch_size[1]
    mw = codec.info.factors[2] * policy.patch_size[2]
    scale = min(1.0, math.sqrt(policy.max_pixels / (h * w)))
    th, tw = int(h * scale) // mh * mh, int(w * scale) // mw * mw
    if th < mh or tw < mw:
        raise ClipRejected(f"too small: {h}x{w} cannot give a {mh}x{mw} multiple")
    return th, tw


def prepare_frames(frames: np.ndarray, fps: float, policy: EncodePolicy, codec: VideoCodec) -> torch.Tensor:
    """uint8 [T,H,W,3] -> float [1,3,T',H',W'] in [-1,1] under the policy."""
    idx = frame_indices(len(frames), fps, policy, codec)
    video = torch.from_numpy(frames[idx]).permute(0, 3, 1, 2)  # [T,3,H,W] uint8
    th, tw = target_size(video.shape[2], video.shape[3], policy, codec)
    s = max(th / video.shape[2], tw / video.shape[3])
    rh, rw = max(th, round(video.shape[2] * s)), max(tw, round(video.shape[3] * s))
    if (rh, rw) != tuple(video.shape[2:]):
        video = TF.resize(video, [rh, rw], antialias=True)
    video = TF.center_crop(video, [th, tw])
    return (video.float() / 127.5 - 1.0).permute(1, 0, 2, 3).unsqueeze(0)


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


# ---- one worker process: models loaded once, then chunks ----------------------------------

_worker: dict = {}


def _init_worker(codec_kw: dict, text_path: str | None, policy: EncodePolicy, threads: int) -> None:
    from sora_train.codecs.text import HFTextEncoder

    torch.set_num_threads(threads)
    _worker.update(codec=build_codec(**codec_kw), text=HFTextEncoder(text_path), policy=policy)


def encode_chunk(chunk: int, rows: list[dict], base: str, out_dir: str) -> dict:
    codec, text, policy = _worker["codec"], _worker["text"], _worker["policy"]
    out, final = Path(out_dir), Path(out_dir) / f"shard-{chunk:06d}.tar"
    tmp = final.with_suffix(".tar.tmp")
    stats = {"shard": final.name, "samples": 0, "latent_positions": 0, "tokens": 0, "failures": []}
    ph, pw, pt = policy.patch_size[1], policy.patch_size[2], policy.patch_size[0]
    text_states = text.encode([r["caption"] for r in rows])
    with wds.TarWriter(str(tmp)) as sink:
        for j, (row, states) in enumerate(zip(rows, text_states)):
            src = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
            try:
                frames, fps = read_video(src)
                latent = codec.encode(prepare_frames(frames, fps, policy, codec))[0]
            except (VideoReadError, ClipRejected) as e:
                stats["failures"].append({"path": src, "reason": str(e)})
                continue
            c, t, h, w = latent.shape
            meta = {"source": src, "fps": fps, "frames": int(len(frames)), "source_height": int(frames.shape[1]),
                    "source_width": int(frames.shape[2]), "latent_shape": [c, t, h, w], "codec": codec.info.name,
                    "text_encoder": text.name, "caption": row["caption"]}
            sink.write({"__key__": f"c{chunk:06d}_{j:04d}", "latent.npy": npy_bytes(latent.numpy().astype(np.float16)),
                        "text.npy": npy_bytes(states), "txt": row["caption"], "json": json.dumps(meta)})
            stats["samples"] += 1
            stats["latent_positions"] += t * h * w
            stats["tokens"] += (t // pt) * (h // ph) * (w // pw)
    stats["sha256"] = file_sha256(tmp)  # the dataset's identity for resume (sora_train.data.shards.fingerprint)
    os.replace(tmp, final)  # publish the shard, then its sidecar: a sidecar means "done"
    _write_json(out / f"shard-{chunk:06d}.json", stats)
    return stats


class OutputInUse(ValueError):
    """--out holds the output of other inputs or settings."""


def claim_output(out_dir: Path, settings: dict) -> None:
    """A rerun continues an encode only with the same inputs and settings: finished shards are skipped by name,
    so another caption file, codec or policy would mix two datasets under one manifest. The first run records
    its settings (encode_settings.json); later runs and array tasks must match them."""
    path = out_dir / "encode_settings.json"
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they come back from the file
    if path.exists():
        old = json.loads(path.read_text())
        changed = [f"{k}: {old.get(k)!r} -> {settings.get(k)!r}" for k in sorted(set(old) | set(settings))
                   if old.get(k) != settings.get(k)]
        if changed:
            raise OutputInUse(f"--out {out_dir} holds shards encoded from other inputs or settings ("
                              f"{'; '.join(changed)}); encode into a new --out, or delete this one to start over")
        return
    _write_json(path, settings)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_json(path: Path, obj) -> None:
    # A name of this process's own: array tasks write the same settings file at the same moment, and a shared
    # temporary name let one task's rename pull the file from under the other's.
    tmp = path.with_suffix(f"{path.suffix}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def read_captions(path: str | Path) -> list[dict]:
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                row = json.loads(line)
                if "path" not in row or "caption" not in row:
                    raise ValueError(f"{path}:{n}: each line needs 'path' and 'caption'")
                rows.append(row)
    return rows


def finalize(out_dir: Path, num_chunks: int, header: dict) -> Path | None:
    """Writes manifest.json and failures.jsonl once every chunk's sidecar exists."""
    sidecars = [out_dir / f"shard-{i:06d}.json" for i in range(num_chunks)]
    done = [p for p in sidecars if p.exists()]
    if len(done) < num_chunks:
        print(f"{len(done)}/{num_chunks} shards done; the manifest is written when all are")
        return None
    shards = [json.loads(p.read_text()) for p in sidecars]
    with open(out_dir / "failures.jsonl", "w") as f:
        for s in shards:
            for fail in s["failures"]:
                f.write(json.dumps(fail) + "\n")
    manifest = dict(header, version=MANIFEST_VERSION,
                    shards=[{k: s[k] for k in ("shard", "samples", "latent_positions", "tokens", "sha256") if k in s}
                            for s in shards],
                    samples=sum(s["samples"] for s in shards), failures=sum(len(s["failures"]) for s in shards))
    _write_json(out_dir / "manifest.json", manifest)
    return out_dir / "manifest.json"


def run(captions: str, out: str, codec_kw: dict, text_path: str | None, policy: EncodePolicy,
        clips_per_shard: int = 64, workers: int = 1, num_tasks: int = 1, task_index: int = 0,
        progress: bool = True) -> Path | None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_output(out_dir, {"captions_sha256": file_sha256(Path(captions)), "codec": codec_kw,
                           "text_encoder": text_path or "minilm", "policy": asdict(policy),
                           "clips_per_shard": clips_per_shard})
    rows = read_captions(captions)
    base = str(Path(captions).resolve().parent)
    chunks = [rows[i : i + clips_per_shard] for i in range(0, len(rows), clips_per_shard)]
    todo = [i for i in range(len(chunks)) if i % num_tasks == task_index
            and not (out_dir / f"shard-{i:06d}.json").exists()]
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    init = (codec_kw, text_path, policy, threads)
    from tqdm import tqdm

    bar = tqdm(total=sum(len(chunks[i]) for i in todo), unit="clip", disable=not progress, desc="encode")
    t0, n_fail = time.time(), 0
    if workers <= 1:
        _init_worker(*init)
        results = (encode_chunk(i, chunks[i], base, out) for i in todo)
    else:
        import multiprocessing as mp

        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker, initargs=init)
        results = pool.map(encode_chunk, todo, [chunks[i] for i in todo], [base] * len(todo), [out] * len(todo))
    for stats in results:
        n_fail += len(stats["failures"])
        bar.update(stats["samples"] + len(stats["failures"]))
        bar.set_postfix(clips_per_s=f"{bar.n / max(time.time() - t0, 1e-9):.1f}", failed=n_fail)
    bar.close()
    if workers > 1:
        pool.shutdown()
    if not _worker:  # with worker processes the models live there; the manifest header needs their identity
        _init_worker(*init)
    codec, text = _worker["codec"], _worker["text"]
    header = {"codec": asdict(codec.info), "text_encoder": {"name": text.name, "width": text.width},
              "patch_size": list(policy.patch_size), "policy": asdict(policy)}
    return finalize(out_dir, len(chunks), header)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Encode captioned videos to webdataset latent shards.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--captions", required=True, help="JSONL with path and caption per line (paths relative to it)")
    p.add_argument("--out", required=True, help="shard directory; a rerun continues it (same inputs and settings)")
    p.add_argument("--codec", default="pixel", choices=["pixel", "image_vae", "video_vae"],
                   help="pixel: built in, lossless space-to-depth; *_vae: a diffusers VAE from --codec-path")
    p.add_argument("--codec-path", default=None, help="local diffusers VAE directory")
    p.add_argument("--codec-class", default=None, help="diffusers video VAE class, e.g. AutoencoderKLWan")
    p.add_argument("--codec-factors", default="1,4,4", help="pixel codec (t,h,w) space-to-depth factors")
    p.add_argument("--text-encoder", default=None, help="local HF text encoder dir (default: shipped MiniLM)")
    p.add_argument("--patch-size", default="1,2,2",
                   help="the model's (t,h,w) patch: frames and sizes are snapped to it")
    p.add_argument("--max-pixels", type=int, default=64 * 64,
                   help="frames larger than this (h x w) are scaled down, aspect kept")
    p.add_argument("--max-frames", type=int, default=32, help="most frames kept per clip")
    p.add_argument("--min-frames", type=int, default=2, help="clips with fewer frames are skipped as too short")
    p.add_argument("--target-fps", type=float, default=None, help="take frames at this rate (default: every frame)")
    p.add_argument("--span", action="store_true", help="subsample frames to span the whole clip")
    p.add_argument("--clips-per-shard", type=int, default=64,
                   help="clips per shard (a shard is a unit of work and of reading)")
    p.add_argument("--workers", type=int, default=1, help="encoder processes on this machine")
    p.add_argument("--num-tasks", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)),
                   help="array tasks sharing the work (default: SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--task-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
                   - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0)),
                   help="this task (default: from SLURM_ARRAY_TASK_ID)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs, batch jobs)")
    a = p.parse_args(argv)
    if not 0 <= a.task_index < a.num_tasks:
        p.error(f"--task-index {a.task_index} must be in [0, {a.num_tasks})")
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    codec_kw = {"kind": a.codec, "path": a.codec_path, "factors": ints(a.codec_factors), "class_name": a.codec_class}
    policy = EncodePolicy(ints(a.patch_size), a.max_pixels, a.max_frames, a.min_frames, a.target_fps, a.span)
    try:
        manifest = run(a.captions, a.out, codec_kw, a.text_encoder, policy, a.clips_per_shard, a.workers,
                       a.num_tasks, a.task_index, progress=not a.no_progress)
    except OutputInUse as e:
        p.exit(2, f"sora-encode: {e}\n")
    if manifest:
        m = json.loads(manifest.read_text())
        print(f"wrote {len(m['shards'])} shards, {m['samples']} samples, {m['failures']} failures -> {manifest}")


if __name__ == "__main__":
    main()
