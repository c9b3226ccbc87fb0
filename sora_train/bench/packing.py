"""sora-bench packing: how much of a row Patch n' Pack fills against padding and bucketing, and how evenly the
cost-balanced packer spreads attention over data-parallel ranks."""

from __future__ import annotations

import math
import statistics
import time

import numpy as np
import torch

from .common import load_preset


def bench_packing(data: str, seq_len: int, batch: int, workers: int, lookahead: int) -> dict:
    """Padding efficiency (real / all tokens) of Patch n' Pack vs pad-to-longest vs bucketing, on one
    sample set, plus loader tokens/s per worker."""
    from ..data import PackedLoader, StreamSpec, load_manifest

    m = load_manifest(data)
    # Endless stream, as in training (no end-of-data flush of partial rows); measured over 3 epochs.
    spec = StreamSpec(seq_len=seq_len, text_len=512, rows=1, max_per_row=64, lookahead=lookahead, seed=0, epochs=None,
                      caption_dropout=0.0, oversize="crop_time", patch=tuple(m["patch_size"]),
                      channels=m["codec"]["latent_channels"], text_dim=m["text_encoder"]["width"])
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
    slots = sum(max(v[i : i + batch]) * len(v[i : i + batch])
                for v in buckets.values() for i in range(0, len(v), batch))
    return {"samples": len(sizes), "seq_len": seq_len, "packing_efficiency": real / total,
            "pad_to_longest_efficiency": pad, "bucketing_efficiency": sum(sizes) / slots,
            "buckets": len(buckets), "loader_tokens_per_s_per_worker": real / dt / max(workers, 1),
            "mean_tokens_per_sample": statistics.mean(sizes), "max_tokens_per_sample": max(sizes)}


def parse_lengths(spec: str) -> list[tuple[float, int, int]]:
    """"0.7:1024-4096,0.3:8192-32768" -> [(share, low, high)]: sample lengths in tokens, uniform in each range."""
    try:
        parts = [(float(share), *map(int, span.split("-"))) for share, span in (p.split(":") for p in spec.split(","))]
    except ValueError:
        raise SystemExit(f"--lengths {spec!r}: use share:low-high[,share:low-high...], "
                         "e.g. 0.7:1024-4096,0.3:8192-32768")
    return [(share / sum(p[0] for p in parts), lo, hi) for share, lo, hi in parts]


def length_stream(mix: list[tuple[float, int, int]], count: int, seed: int):
    """`count` packer items of token lengths drawn from `mix` (no data: the packer only reads sizes)."""
    from ..data.packing import Item

    rng = np.random.default_rng(seed)
    shares = np.cumsum([m[0] for m in mix])
    for i in range(count):
        _, lo, hi = mix[min(int(np.searchsorted(shares, rng.random())), len(mix) - 1)]
        n = int(rng.integers(lo, hi + 1))
        yield Item(sid=(0, seed, i), key=f"{seed}/{i}", tokens=torch.zeros(n, 1),
                   pos=torch.zeros(n, 3, dtype=torch.long), grid=(1, 1, n), text=torch.zeros(1, 1), caption="")


def bench_balance(lengths: str, seq_len: int, dp: int, grad_accum: int, samples: int, lookahead: int,
                  model: str) -> list[dict]:
    """Today's token packer next to the cost-balanced one on the same streams (one per data-parallel rank):
    max/mean estimated cost over rows and, per step, over ranks (each rank's step: grad_accum rows), the share
    of real tokens, and every sample's count (none lost, none twice)."""
    from ..data.packing import Packer
    from ..models.flops import attention_weight, row_cost

    args, mix, out = load_preset(model), parse_lengths(lengths), []
    w = attention_weight(args.dim, args.mlp_ratio, args.cross_attention)
    for balance in (False, True):
        costs, keys, real = [], [], 0
        for rank in range(dp):
            packer = Packer(seq_len, 64, 1, 64, lookahead, 1, 1, balance)
            batches = [b for it in length_stream(mix, samples, rank) for b in packer.add(it)]
            rows = [[int(g.prod()) for g in b.grids[0] if g[0]] for b in batches]
            costs.append([row_cost(r, seq_len, w) for r in rows])
            real += sum(map(sum, rows))
            keys += [k for b in batches + packer.flush() for k in b.keys[0]]
        steps = min(len(c) for c in costs) // grad_accum
        step = np.array([c[:steps * grad_accum] for c in costs]).reshape(dp, steps, grad_accum).sum(2)  # [dp, steps]
        rows_all = np.concatenate([np.asarray(c) for c in costs])
        fill = real / (seq_len * sum(len(c) for c in costs))
        out.append({"balance": "cost" if balance else "tokens", "lengths": lengths, "seq_len": seq_len, "dp": dp,
                    "grad_accum": grad_accum, "model": model, "attention_weight": w,
                    "row_cost_max_over_mean": float(rows_all.max() / rows_all.mean()),
                    "row_cost_cv": float(rows_all.std() / rows_all.mean()),
                    "step_rank_max_over_mean": float((step.max(0) / step.mean(0)).mean()),
                    "real_token_share": fill, "samples": len(keys), "samples_lost": dp * samples - len(set(keys)),
                    "samples_repeated": len(keys) - len(set(keys))})
    base = out[0]["real_token_share"] / out[0]["step_rank_max_over_mean"]
    for r in out:  # real tokens per unit of the slowest rank's time, relative to the token packer
        r["throughput_vs_tokens"] = r["real_token_share"] / r["step_rank_max_over_mean"] / base
    return out
