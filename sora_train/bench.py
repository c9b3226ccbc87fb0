"""sora-bench: how fast a preset goes on this device, and how well the loader packs.

  sora-bench model --model XL --seq-len 16384 65536 --attention sdpa flex varlen --ac both
  sora-bench packing --data data/bench/shards --seq-len 8192
  sora-bench model --model 30B --params-only

Prints a table and writes JSON (--json). Timings are medians over --steps after --warmup steps.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from . import CONF_DIR


def load_preset(name: str, overrides: list[str] = ()) -> "DiTArgs":  # noqa: F821
    from hydra import compose, initialize_config_dir

    from .config import register
    from .preflight import dit_args

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"model={name}", *overrides])
    return dit_args(cfg.model)


def synthetic_packed_batch(args, seq_len: int, rows: int, sample_tokens: tuple[int, int], text_len: int, seed=0):
    """Rows filled with whole samples of random size (a realistic mix of segment lengths)."""
    g = np.random.default_rng(seed)
    seg = torch.zeros(rows, seq_len, dtype=torch.long)
    tseg = torch.zeros(rows, args.max_segments * text_len // 4, dtype=torch.long)
    for r in range(rows):
        at, tat, j = 0, 0, 0
        while j < args.max_segments - 1:
            n = int(g.integers(*sample_tokens))
            if at + n > seq_len:
                n = seq_len - at  # fill the row: the packer reaches ~99% on real mixes
            seg[r, at : at + n] = j + 1
            L = min(int(g.integers(8, text_len)), tseg.shape[1] - tat)
            tseg[r, tat : tat + L] = j + 1
            at, tat, j = at + n, tat + L, j + 1
            if at >= seq_len or tat >= tseg.shape[1]:
                break
    pos = torch.stack([torch.arange(seq_len) // 256, (torch.arange(seq_len) // 16) % 16, torch.arange(seq_len) % 16], -1)
    return seg, tseg, pos[None].expand(rows, -1, -1)


def bench_model(args, seq_len: int, rows: int, attention: str, ac: bool, steps: int, warmup: int, device,
                peak: float | None) -> dict:
    from .models import DiT
    from .models.flops import train_flops
    from .parallel import checkpoint_module

    args = type(args)(**{**args.__dict__, "attention": attention})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = DiT(args).to(device, dtype)
    if ac:
        for b in model.blocks:
            checkpoint_module(b)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    seg, tseg, pos = synthetic_packed_batch(args, seq_len, rows, (seq_len // 16, seq_len // 3), 64)
    x = torch.randn(rows, seq_len, args.patch_dim, device=device, dtype=dtype)
    t = torch.rand(rows, args.max_segments, device=device, dtype=dtype)
    text = torch.randn(rows, tseg.shape[1], args.text_dim, device=device, dtype=dtype)
    seg, tseg, pos = seg.to(device), tseg.to(device), pos.to(device)
    extent = pos.amax(1, keepdim=True).expand_as(pos) + 1  # a stand-in: costs the same as real extents
    flops = train_flops(args, seg.cpu(), tseg.cpu())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        out = model(x, t, pos, seg, text, tseg, extent=extent)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    dt = statistics.median(times)
    res = {"params": sum(p.numel() for p in model.parameters()), "seq_len": seq_len, "rows": rows,
           "attention": attention, "activation_checkpointing": ac, "step_s": dt,
           "tokens_per_s": int((seg > 0).sum()) / dt, "tflops": flops / dt / 1e12, "device": device_name(device)}
    if peak:
        res["mfu"] = res["tflops"] / peak
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"


def bench_packing(data: str, seq_len: int, batch: int, workers: int, lookahead: int) -> dict:
    """Padding efficiency (real / all tokens) of Patch n' Pack vs pad-to-longest vs bucketing, on one
    sample set, plus loader tokens/s per worker."""
    from .data import PackedLoader, StreamSpec, load_manifest

    m = load_manifest(data)
    # Endless stream, as in training (no end-of-data flush of partial rows); measured over 3 epochs.
    spec = StreamSpec(seq_len=seq_len, text_len=512, rows=1, max_per_row=64, lookahead=lookahead, epochs=None,
                      caption_dropout=0.0, patch=tuple(m["patch_size"]), channels=m["codec"]["latent_channels"],
                      text_dim=m["text_encoder"]["width"])
    loader = PackedLoader(data, spec, num_workers=workers)
    t0, real, total, sizes, grids = time.perf_counter(), 0, 0, [], []
    for b in loader:
        real, total = real + b.real_tokens, total + b.seg.numel()
        for r in range(b.grids.shape[0]):
            for j in range(len(b.keys[r])):
                grids.append(tuple(int(v) for v in b.grids[r, j]))
        if len(grids) >= 3 * m["samples"]:
            break
    dt = time.perf_counter() - t0
    sizes = [math.prod(g) for g in grids]
    # pad-to-longest: consecutive batches of `batch` samples, each padded to its longest
    pad = sum(sizes) / sum(max(sizes[i : i + batch]) * len(sizes[i : i + batch]) for i in range(0, len(sizes), batch))
    # bucketing: samples grouped by (frames, aspect bin); within a bucket, batches padded to the bucket's longest
    buckets: dict = {}
    for g, n in zip(grids, sizes):
        buckets.setdefault((g[0], round(math.log2(g[2] / g[1]) * 2)), []).append(n)
    slots = sum(max(v[i : i + batch]) * len(v[i : i + batch]) for v in buckets.values() for i in range(0, len(v), batch))
    return {"samples": len(sizes), "seq_len": seq_len, "packing_efficiency": real / total,
            "pad_to_longest_efficiency": pad, "bucketing_efficiency": sum(sizes) / slots,
            "buckets": len(buckets), "loader_tokens_per_s_per_worker": real / dt / max(workers, 1),
            "mean_tokens_per_sample": statistics.mean(sizes), "max_tokens_per_sample": max(sizes)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    pm = sub.add_parser("model")
    pm.add_argument("--model", default="tiny")
    pm.add_argument("--seq-len", type=int, nargs="+", default=[4096])
    pm.add_argument("--rows", type=int, default=1)
    pm.add_argument("--attention", nargs="+", default=["sdpa"])
    pm.add_argument("--ac", choices=["on", "off", "both"], default="off")
    pm.add_argument("--steps", type=int, default=5)
    pm.add_argument("--warmup", type=int, default=2)
    pm.add_argument("--peak-tflops", type=float, default=None)
    pm.add_argument("--params-only", action="store_true")
    pm.add_argument("--override", nargs="*", default=[], help="Hydra overrides, e.g. model.depth=4")
    pk = sub.add_parser("packing")
    pk.add_argument("--data", required=True)
    pk.add_argument("--seq-len", type=int, default=8192)
    pk.add_argument("--batch", type=int, default=8, help="samples per batch for pad-to-longest / bucketing")
    pk.add_argument("--workers", type=int, default=1)
    pk.add_argument("--lookahead", type=int, default=64)
    for sp in (pm, pk):
        sp.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if a.what == "packing":
        results = [bench_packing(a.data, a.seq_len, a.batch, a.workers, a.lookahead)]
    else:
        from .engine.metrics import device_peak_tflops
        from .models import count_params

        args = load_preset(a.model, a.override)
        if a.params_only:
            results = [{"model": a.model, "params": count_params(args), "dim": args.dim, "depth": args.depth,
                        "heads": args.heads}]
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            peak = device_peak_tflops(a.peak_tflops)
            acs = {"on": [True], "off": [False], "both": [False, True]}[a.ac]
            results = []
            for s in a.seq_len:
                for attn in a.attention:
                    for ac in acs:
                        try:
                            r = bench_model(args, s, a.rows, attn, ac, a.steps, a.warmup, device, peak)
                        except (RuntimeError, NotImplementedError) as e:  # OOM, backend unavailable here
                            r = {"seq_len": s, "attention": attn, "activation_checkpointing": ac, "error": str(e)[:200]}
                        results.append({"model": a.model, **r})
                        print(json.dumps(results[-1]), flush=True)
    for r in results:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
