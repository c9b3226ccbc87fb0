"""Encode captioned videos into webdataset shards of latents + text states, with a manifest.

Policy (documented in docs/guide.md, "Data"):
  0. clips: a captions line gives one clip, the whole video from its start, or its own `start`/`end` seconds;
     --scenes cuts it at shot changes and --clip-seconds into windows, each clip a sample (source and time range
     in its json).
  1. frames of a clip: keep every `stride`-th frame (stride = round(fps / target_fps) when target_fps is
     set), keep at most `max_frames`, then snap down to a count the codec maps to a whole number
     of temporal patches; fewer than `min_frames` left -> the clip is skipped as too short. With
     span=True the same number of frames is taken evenly from the first to the last frame. Only the
     kept frames are decoded to pixels, from a seek to the clip's start: memory is bounded by max_frames.
  2. space: the frames upright (the display rotation) and at their display aspect (anamorphic pixels
     made square); scale down (never up) so H*W <= max_pixels, snap H and W down to multiples of codec
     factor x patch size, resize (antialiased) and centre-crop to that.
  3. codec.encode(frames in [-1,1]) -> latent (C,T',H',W') float16; caption -> text states (cut at
     --text-max-length tokens, counted; an empty caption -> the unconditional one: one zero vector).

Inputs are cut into fixed chunks of `clips_per_shard` lines of the captions file and chunk i is
written to shard-{i:06d}.tar. We write each chunk with webdataset's TarWriter rather than
ShardWriter because ShardWriter cuts shards by size as it goes: the inputs of a shard are then
unknown in advance, so a rerun cannot skip finished shards and array tasks cannot own disjoint
outputs. A shard's size stays bounded because the policy caps pixels and frames per clip.
Finished shards are published by rename with a sidecar .json, so reruns skip them; a bad video
or a bad captions line is skipped, counted and listed in failures.jsonl (file:line, reason), never
aborting the job.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torchvision.transforms.v2 import functional as TF

from sora_train.codecs import VideoCodec, build_codec
from sora_train.video_io import VideoInfo, VideoReadError, probe_video, read_frames, scene_cuts

MANIFEST_VERSION = 1


@dataclass
class EncodePolicy:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    max_pixels: int = 64 * 64
    max_frames: int = 32
    min_frames: int = 2
    target_fps: float | None = None
    span: bool = False  # stride so that max_frames cover the whole clip (short clips, motion datasets)
    clip_seconds: float | None = None  # cut each video (or each scene) into consecutive windows of this length
    scenes: bool = False  # cut each video at its shot changes (video_io.scene_cuts) into one clip per shot
    scene_threshold: float = 10.0  # FFmpeg scdet score (0-100) above which a frame starts a new shot
    # The captions fields embedded per sample: the first is required (text.npy, txt); others where a row has them
    # (text_<key>.npy, <key>.txt), for the loader's data.caption_mix.
    caption_keys: tuple[str, ...] = ("caption",)


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
        if h >= mh and w >= mw:  # big enough, but --max-pixels squeezes the short side below one patch
            raise ClipRejected(f"too small: aspect {max(h, w) / min(h, w):.1f}:1 is too extreme for --max-pixels "
                               f"{policy.max_pixels}: {h}x{w} scales to {int(h * scale)}x{int(w * scale)}, and each "
                               f"side needs a multiple of {mh}x{mw}")
        raise ClipRejected(f"too small: {h}x{w} cannot give a {mh}x{mw} multiple")
    return th, tw


def fit_frames(frames: np.ndarray, display: tuple[int, int], policy: EncodePolicy, codec: VideoCodec) -> torch.Tensor:
    """uint8 [T,H,W,3] (upright, stored pixels) -> float [1,3,T,H',W'] in [-1,1]: resized to the display aspect
    (`display` = (height, width) as shown: anamorphic pixels are made square here), scaled under max_pixels and
    centre-cropped to multiples of codec factor x patch."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)  # [T,3,H,W] uint8
    dh, dw = display
    th, tw = target_size(dh, dw, policy, codec)
    s = max(th / dh, tw / dw)
    rh, rw = max(th, round(dh * s)), max(tw, round(dw * s))
    if (rh, rw) != tuple(video.shape[2:]):
        video = TF.resize(video, [rh, rw], antialias=True)
    video = TF.center_crop(video, [th, tw])
    return (video.float() / 127.5 - 1.0).permute(1, 0, 2, 3).unsqueeze(0)


def prepare_frames(frames: np.ndarray, fps: float, policy: EncodePolicy, codec: VideoCodec) -> torch.Tensor:
    """All of a clip's frames in memory, uint8 [T,H,W,3] with square pixels -> float [1,3,T',H',W'] in [-1,1]
    under the policy (the encoder itself decodes only the frames it keeps: encode_clip)."""
    idx = frame_indices(len(frames), fps, policy, codec)
    return fit_frames(frames[idx], frames.shape[1:3], policy, codec)


@dataclass
class Clip:
    """One sample to encode: a time range of a source video (end None: to its end)."""

    start: float = 0.0
    end: float | None = None


def clips_of(row: dict, info: VideoInfo, path: str, policy: EncodePolicy) -> list[Clip]:
    """The clips a captions row gives: its own `start`/`end` (seconds) if it has them, else the whole video; cut
    at shot changes (--scenes) and then into windows of --clip-seconds. Without either: one clip from the start."""
    if not (policy.scenes or policy.clip_seconds or "start" in row or "end" in row):
        return [Clip()]
    start, end = float(row.get("start") or 0.0), row.get("end")
    end = float(end) if end is not None else info.duration
    pieces = [Clip(start, end)]
    if policy.scenes:
        cuts = [t for t in scene_cuts(path, policy.scene_threshold) if start < t < end]
        pieces = [Clip(a, b) for a, b in zip([start, *cuts], [*cuts, end])]
    if policy.clip_seconds:
        n = lambda c: max(1, math.ceil((c.end - c.start) / policy.clip_seconds - 1e-6))  # noqa: E731
        pieces = [Clip(c.start + k * policy.clip_seconds, min(c.end, c.start + (k + 1) * policy.clip_seconds))
                  for c in pieces for k in range(n(c))]
    return pieces


def encode_clip(path: str, info: VideoInfo, clip: Clip, policy: EncodePolicy, codec: VideoCodec) -> torch.Tensor:
    """One clip -> latent [C,T',H',W']. Decodes only the frames the policy keeps (read_frames)."""
    window = info.window(clip.start, clip.end)
    if not window:
        raise ClipRejected(f"too short: no frame in [{clip.start:g}, {clip.end:g}) s")
    keep = [window[i] for i in frame_indices(len(window), info.fps, policy, codec)]
    frames = read_frames(path, keep, info)
    if len(frames) < len(keep):  # a damaged tail: fewer frames decoded than the container lists
        keep = keep[: codec.info.snap_frames(len(frames), latent_multiple=policy.patch_size[0])]
        if len(keep) < max(policy.min_frames, 1):
            raise ClipRejected(f"too short: only {len(frames)} frames decode")
        frames = frames[: len(keep)]
    return codec.encode(fit_frames(frames, info.display_size, policy, codec))[0]


def npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


# ---- one worker process: models loaded once, then chunks ----------------------------------

_worker: dict = {}


def _init_worker(codec_kw: dict, text_path: str | None, text_max_length: int | None, policy: EncodePolicy,
                 threads: int) -> None:
    from sora_train.codecs.text import HFTextEncoder

    torch.set_num_threads(threads)
    _worker.update(codec=build_codec(**codec_kw), text=HFTextEncoder(text_path, text_max_length), policy=policy)


def encode_chunk(chunk: int, rows: list[dict], base: str, out_dir: str) -> dict:
    codec, text, policy = _worker["codec"], _worker["text"], _worker["policy"]
    out, final = Path(out_dir), Path(out_dir) / f"shard-{chunk:06d}.tar"
    tmp = final.with_suffix(".tar.tmp")
    # grids: each sample's [temporal patches, tokens per temporal patch], so a mixture's token clock can count a
    # source's samples as trained under its caps (max_frames, max_tokens), not as encoded.
    stats = {"shard": final.name, "samples": 0, "latent_positions": 0, "tokens": 0, "failures": [],
             "truncated_captions": 0, "max_text_tokens": 0, "grids": []}
    ph, pw, pt = policy.patch_size[1], policy.patch_size[2], policy.patch_size[0]
    good = [r for r in rows if "error" not in r]
    stats["failures"] += [{"path": r.get("path"), "line": r["where"], "reason": r["error"]} for r in rows if "error" in r]
    keys = policy.caption_keys
    # An optional caption that is not a string is left out of its sample, and listed like a bad required one.
    stats["failures"] += [{"path": r.get("path"), "line": r["where"], "reason": f"'{k}' must be a string, got "
                           f"{r[k]!r}: the clip is encoded without it"}
                          for r in good for k in keys[1:] if k in r and r[k] is not None and not isinstance(r[k], str)]
    encoded = {k: text.encode_with_counts([r[k] if isinstance(r.get(k), str) else "" for r in good]) for k in keys}
    try:
        # A fixed member mtime (webdataset stamps the time of writing): the same inputs and settings give
        # byte-identical shards, so the same sha256, and a checkpoint resumes on a re-encode of its data.
        with wds.TarWriter(str(tmp), mtime=0.0) as sink:
            for i, row in enumerate(good):
                src = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
                captions = [k for k in keys if isinstance(row.get(k), str)]  # the first is always there (row_error)
                states = {k: encoded[k][0][i] for k in captions}
                n_tokens = {k: encoded[k][1][i] for k in captions}
                truncated = {k: n_tokens[k] > text.max_length for k in captions}
                stats["truncated_captions"] += sum(truncated.values())
                try:
                    info = probe_video(src)
                    clips = clips_of(row, info, src, policy)
                except (VideoReadError, ClipRejected) as e:
                    stats["failures"].append({"path": src, "line": row["where"], "reason": str(e)})
                    continue
                for k, clip in enumerate(clips):
                    try:
                        latent = encode_clip(src, info, clip, policy, codec)
                    except (VideoReadError, ClipRejected) as e:
                        stats["failures"].append({"path": src, "line": row["where"], "start": clip.start,
                                                  "end": clip.end, "reason": str(e)})
                        continue
                    c, t, h, w = latent.shape
                    dh, dw = info.display_size
                    first = keys[0]
                    meta = {"source": src, "fps": info.fps, "frames": info.frames, "source_height": dh,
                            "source_width": dw, "latent_shape": [c, t, h, w], "codec": codec.info.name,
                            "text_encoder": text.name, "caption": row[first], "caption_tokens": n_tokens[first],
                            "caption_truncated": bool(truncated[first])}
                    if len(keys) > 1:
                        meta["captions"] = {k: {"text": row[k], "tokens": n_tokens[k], "truncated": truncated[k]}
                                            for k in captions}
                    if clip.end is not None:
                        meta.update(start=clip.start, end=clip.end)
                    # A row's clip keeps the row's key; clips cut from it (--scenes, --clip-seconds) are numbered.
                    key = f"c{chunk:06d}_{row['index']:04d}" + (f"_{k:04d}" if policy.scenes or policy.clip_seconds
                                                                else "")
                    sink.write({"__key__": key, "latent.npy": npy_bytes(latent.numpy().astype(np.float16)),
                                "text.npy": npy_bytes(states[first]), "txt": row[first], "json": json.dumps(meta),
                                **{f"text_{k}.npy": npy_bytes(states[k]) for k in captions[1:]},
                                **{f"{k}.txt": row[k] for k in captions[1:]}})
                    stats["samples"] += 1
                    stats["latent_positions"] += t * h * w
                    stats["tokens"] += (t // pt) * (h // ph) * (w // pw)
                    stats["grids"].append([t // pt, (h // ph) * (w // pw)])
                    stats["max_text_tokens"] = max(stats["max_text_tokens"], *(int(v.shape[0]) for v in states.values()))
    except BaseException:
        tmp.unlink(missing_ok=True)  # a crash leaves no half shard behind (the rerun redoes this chunk)
        raise
    if stats["truncated_captions"]:
        print(f"{final.name}: {stats['truncated_captions']} caption(s) longer than {text.max_length} tokens were cut "
              f"(--text-max-length)", file=sys.stderr, flush=True)
    stats["sha256"] = file_sha256(tmp)  # the dataset's identity for resume (sora_train.data.shards.fingerprint)
    os.replace(tmp, final)  # publish the shard, then its sidecar: a sidecar means "done"
    _write_json(out / f"shard-{chunk:06d}.json", stats)
    return stats


LEGACY_SETTINGS = {"text_max_length": 64}  # captions were cut at 64 tokens before --text-max-length


class OutputInUse(ValueError):
    """--out holds the output of other inputs or settings."""


def claim_output(out_dir: Path, settings: dict) -> None:
    """A rerun continues an encode only with the same inputs and settings: finished shards are skipped by name,
    so another caption file, codec or policy would mix two datasets under one manifest. The first run records
    its settings (encode_settings.json); later runs and array tasks must match them."""
    path = out_dir / "encode_settings.json"
    settings = json.loads(json.dumps(settings))  # tuples as lists, as they come back from the file
    if path.exists():
        # Settings added since an output was started are compared as the value its encode used then.
        old = {**LEGACY_SETTINGS, **json.loads(path.read_text())}
        old["policy"] = {**json.loads(json.dumps(asdict(EncodePolicy()))), **old["policy"]}
        changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in differing(old, settings)]
        if changed:
            raise OutputInUse(f"--out {out_dir} holds shards encoded from other inputs or settings ("
                              f"{'; '.join(changed)}); encode into a new --out, or delete this one to start over")
        return
    _write_json(path, settings)


def differing(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, old value, new value) for each leaf where two nested dicts differ."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differing(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append((f"{prefix}{k}", a, b))
    return out


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


def read_captions(path: str | Path, caption_key: str = "caption") -> list[dict]:
    """One dict per non-blank line, in order, each with `where` (file:line) and `index` (its place in its chunk is
    set later). A line that cannot be used carries `error` instead of failing the job: it becomes a row of
    failures.jsonl. A UTF-8 byte-order mark (editors on Windows write one) is skipped."""
    rows = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                rows.append({"where": where, "error": f"not JSON ({e.msg} at column {e.colno})"})
                continue
            error = row_error(row, caption_key)
            path_ = row.get("path") if isinstance(row, dict) and isinstance(row.get("path"), str) else None
            rows.append(dict(error, path=path_, where=where) if error else dict(row, where=where))
    return rows


def row_error(row, caption_key: str = "caption") -> dict:
    """{} for a usable row, else {"error": why}."""
    if not isinstance(row, dict):
        return {"error": f"a line must be a JSON object, not {type(row).__name__}"}
    if not isinstance(row.get("path"), str) or not row["path"]:
        return {"error": f"'path' must be a file name, got {row.get('path')!r}"}
    if not isinstance(row.get(caption_key), str):
        return {"error": f"'{caption_key}' must be a string (\"\" for none), got {row.get(caption_key)!r}"}
    times = [row.get(k) for k in ("start", "end") if row.get(k) is not None]
    if any(not isinstance(v, (int, float)) or v < 0 for v in times):
        return {"error": f"'start' and 'end' must be seconds >= 0, got {row.get('start')!r}, {row.get('end')!r}"}
    if len(times) == 2 and times[0] >= times[1]:
        return {"error": f"'start' ({times[0]}) must be before 'end' ({times[1]})"}
    return {}


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
                    shards=[{k: s[k] for k in ("shard", "samples", "latent_positions", "tokens", "sha256", "grids")
                             if k in s}
                            for s in shards],
                    samples=sum(s["samples"] for s in shards), failures=sum(len(s["failures"]) for s in shards),
                    truncated_captions=sum(s.get("truncated_captions", 0) for s in shards),
                    max_text_tokens=max((s.get("max_text_tokens", 0) for s in shards), default=0))
    _write_json(out_dir / "manifest.json", manifest)
    return out_dir / "manifest.json"


def run(captions: str, out: str, codec_kw: dict, text_path: str | None, policy: EncodePolicy,
        clips_per_shard: int = 64, workers: int = 1, num_tasks: int = 1, task_index: int = 0,
        progress: bool = True, text_max_length: int | None = None) -> Path | None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    claim_output(out_dir, {"captions_sha256": file_sha256(Path(captions)), "codec": codec_kw,
                           "text_encoder": text_path or "minilm", "text_max_length": text_max_length,
                           "policy": asdict(policy), "clips_per_shard": clips_per_shard})
    rows = read_captions(captions, policy.caption_keys[0])
    base = str(Path(captions).resolve().parent)
    chunks = [[dict(r, index=j) for j, r in enumerate(rows[i : i + clips_per_shard])]
              for i in range(0, len(rows), clips_per_shard)]
    todo = [i for i in range(len(chunks)) if i % num_tasks == task_index
            and not (out_dir / f"shard-{i:06d}.json").exists()]
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    init = (codec_kw, text_path, text_max_length, policy, threads)
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
    header = {"caption_keys": list(policy.caption_keys), "codec": asdict(codec.info),
              "text_encoder": {"name": text.name, "width": text.width, "max_length": text.max_length},
              "patch_size": list(policy.patch_size), "policy": asdict(policy)}
    return finalize(out_dir, len(chunks), header)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each option's default in its help, unless the help says it in its own words."""

    def _get_help_string(self, action):
        return action.help if "(default:" in (action.help or "") else super()._get_help_string(action)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Encode captioned videos to webdataset latent shards.",
                                formatter_class=DefaultsHelpFormatter)
    p.add_argument("--captions", required=True, help="JSONL with path and caption per line (paths relative to it)")
    p.add_argument("--out", required=True, help="shard directory; a rerun continues it (same inputs and settings)")
    p.add_argument("--codec", default="pixel", choices=["pixel", "image_vae", "video_vae"],
                   help="pixel: built in, lossless space-to-depth; *_vae: a diffusers VAE from --codec-path")
    p.add_argument("--codec-path", default=None, help="local diffusers VAE directory")
    p.add_argument("--codec-class", default=None, help="diffusers video VAE class, e.g. AutoencoderKLWan")
    p.add_argument("--codec-factors", default="1,4,4", help="pixel codec (t,h,w) space-to-depth factors")
    p.add_argument("--text-encoder", default=None, help="local HF text encoder dir (default: shipped MiniLM)")
    p.add_argument("--text-max-length", type=int, default=None,
                   help="tokens kept per caption; longer ones are cut, counted and reported (default: the "
                        "tokenizer's limit, at most 512)")
    p.add_argument("--patch-size", default="1,2,2",
                   help="the model's (t,h,w) patch: frames and sizes are snapped to it")
    p.add_argument("--max-pixels", type=int, default=64 * 64,
                   help="frames larger than this (h x w) are scaled down, aspect kept")
    p.add_argument("--max-frames", type=int, default=32, help="most frames kept per clip")
    p.add_argument("--min-frames", type=int, default=2, help="clips with fewer frames are skipped as too short")
    p.add_argument("--target-fps", type=float, default=None, help="take frames at this rate (default: every frame)")
    p.add_argument("--span", action="store_true", help="subsample frames to span the whole clip")
    p.add_argument("--caption-keys", default="caption",
                   help="captions fields to embed, comma-separated: the first is required, the others are stored "
                        "where a line has them (data.caption_mix picks among them in training)")
    p.add_argument("--clip-seconds", type=float, default=None,
                   help="cut each video (each scene with --scenes) into clips of this many seconds; a captions "
                        "line's own start/end (seconds) cuts it to that range")
    p.add_argument("--scenes", action="store_true", help="cut each video at its shot changes, one clip per shot")
    p.add_argument("--scene-threshold", type=float, default=10.0,
                   help="shot-change score (FFmpeg scdet, 0-100) that starts a new shot")
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
    for flag, value in (("--clip-seconds", a.clip_seconds), ("--target-fps", a.target_fps)):
        if value is not None and not value > 0:
            p.error(f"{flag} must be > 0, got {value:g} (leave it out for {'whole clips' if flag == '--clip-seconds' else 'every frame'})")
    for flag, value in (("--max-pixels", a.max_pixels), ("--max-frames", a.max_frames), ("--min-frames", a.min_frames),
                        ("--clips-per-shard", a.clips_per_shard), ("--workers", a.workers)):
        if value < 1:
            p.error(f"{flag} must be >= 1, got {value}")
    ints = lambda s: tuple(int(v) for v in s.split(","))  # noqa: E731
    codec_kw = {"kind": a.codec, "path": a.codec_path, "factors": ints(a.codec_factors), "class_name": a.codec_class}
    policy = EncodePolicy(ints(a.patch_size), a.max_pixels, a.max_frames, a.min_frames, a.target_fps, a.span,
                          a.clip_seconds, a.scenes, a.scene_threshold, tuple(a.caption_keys.split(",")))
    try:
        manifest = run(a.captions, a.out, codec_kw, a.text_encoder, policy, a.clips_per_shard, a.workers,
                       a.num_tasks, a.task_index, progress=not a.no_progress, text_max_length=a.text_max_length)
    except OutputInUse as e:
        p.exit(2, f"sora-encode: {e}\n")
    if manifest:
        m = json.loads(manifest.read_text())
        print(f"wrote {len(m['shards'])} shards, {m['samples']} samples, {m['failures']} failures "
              f"({m['truncated_captions']} captions cut at {m['text_encoder']['max_length']} tokens) -> {manifest}")
        if m["samples"] == 0:  # a dataset of nothing: training on it would wait forever for a first row
            p.exit(1, f"sora-encode: no clip was encoded: every one failed or was skipped; the reasons are in "
                      f"{manifest.parent / 'failures.jsonl'}\n")


if __name__ == "__main__":
    main()
