"""sora-bench: how fast a preset goes on this device, and how well the loader packs.

  sora-bench model --model 1B --seq-len 65536 --ac full      (the training step users get: Trainer.train_step)
  sora-bench model --model XL --seq-len 16384 65536 --attention sdpa flex varlen --ac none full --bare
  sora-bench packing --data data/bench/shards --seq-len 8192
  sora-bench packing --lengths 0.7:1024-4096,0.3:8192-32768 --seq-len 65536 --dp 8 --model 1B   (cost balance)
  sora-bench plan --model 1B 30B --seq-len 65536 262144 --gpus 8 64 256
  sora-bench activations --model 1B --ac none elementwise attention full --compile   (what a block keeps, measured)
  sora-bench model --model 30B --params-only
  sora-bench attention --seq-len 4096 16384 --attention sdpa flex varlen   (numerics vs a float32 reference, speed)

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


def train_config(name: str, overrides: list[str] = ()):
    from hydra import compose, initialize_config_dir

    from .config import register

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"model={name}", *overrides])


def load_preset(name: str, overrides: list[str] = ()) -> "DiTArgs":  # noqa: F821
    from .config import model_args

    return model_args(train_config(name, overrides).model)


class SyntheticPackedLoader:
    """Stands in for the shard loader: the same packed rows (random latents and captions, a realistic mix of
    sample lengths from synthetic_packed_batch) again and again, built once, so the bench times the step."""

    def __init__(self, args, seq_len: int, rows: int, text_len: int = 64, seed: int = 0):
        from .data import PackedBatch

        seg, tseg, _ = synthetic_packed_batch(args, seq_len, rows, (seq_len // 16, seq_len // 3), text_len, seed)
        g = torch.Generator().manual_seed(seed)
        pos = torch.zeros(rows, seq_len, 3, dtype=torch.long)
        grids = torch.zeros(rows, args.max_segments, 3, dtype=torch.long)
        for r in range(rows):  # each sample laid out as a 1 x 1 x n grid: positions and extents agree
            for j in range(1, int(seg[r].max()) + 1):
                idx = (seg[r] == j).nonzero().squeeze(1)
                pos[r, idx, 2] = torch.arange(len(idx))
                grids[r, j - 1] = torch.tensor([1, 1, len(idx)])
        self.batch = PackedBatch(
            tokens=torch.randn(rows, seq_len, args.patch_dim, generator=g), pos=pos, seg=seg,
            text=torch.randn(rows, tseg.shape[1], args.text_dim, generator=g), text_seg=tseg, grids=grids,
            keys=[[f"synthetic-{j}" for j in range(int(s.max()))] for s in seg])

    def __iter__(self):
        while True:
            yield self.batch


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


def timed(step, steps: int, warmup: int, device) -> float:
    """Median seconds of `step` over `steps` calls after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_trainer(name: str, overrides: list[str], seq_len: int, rows: int, attention: str, ac: str, steps: int,
                  warmup: int, peak: float | None, profile: str | None = None) -> dict:
    """The training step users get: `train.build()` (the DeepSpeed engine with the config's ZeRO stage,
    precision and optimizer, EMA on) fed by SyntheticPackedLoader, timed through `Trainer.train_step`."""
    import shutil
    import tempfile

    from torch._dynamo.utils import counters

    from .train import build

    out = tempfile.mkdtemp(prefix="sora_bench_")
    cfg = train_config(name, [*overrides, f"data.seq_len={seq_len}", f"data.rows={rows}",
                              f"model.attention={attention}", f"parallel.activation_checkpointing={ac}",
                              "ema.enabled=true", "data.train=synthetic", "logging.wandb.mode=disabled",
                              f"out_dir={out}"])
    from .config import model_args

    args = model_args(cfg.model)
    loader = SyntheticPackedLoader(args, seq_len, rows)
    torch._dynamo.reset()  # each configuration compiles afresh, so its graph counts are its own
    counters.clear()
    trainer = None
    try:
        trainer = build(cfg, loader=loader)
        return measure_trainer(trainer, loader, steps, warmup, peak, profile)
    finally:  # after a failure too (out of memory at AC none, say): the next configuration gets the memory back
        if trainer is not None:
            trainer.close(keep_process_group=True)  # the next configuration builds in the same process group
        trainer = None  # a failure's traceback keeps this frame, not the engine
        shutil.rmtree(out, ignore_errors=True)
        release(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def measure_trainer(trainer, loader, steps: int, warmup: int, peak: float | None, profile: str | None) -> dict:
    from torch._dynamo.utils import counters

    from .models.flops import achieved, train_flops
    from .step_breakdown import StepPhases

    cfg, args, device, batches = trainer.cfg, trainer.args, trainer.device, iter(loader)
    seq_len, rows, attention, ac = (cfg.data.seq_len, cfg.data.rows, cfg.model.attention,
                                    cfg.parallel.activation_checkpointing)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with StepPhases(trainer, device) as phases:
        dt = timed(lambda: phases.step(lambda: trainer.train_step(batches)), steps, warmup, device)
    # What compile made of the blocks: few graphs, breaks only at the attention kernels, frames compiled once
    # (a frame compiled again and again is a recompile per step)
    compiled = {"graphs": counters["stats"]["unique_graphs"], "graph_breaks": sum(counters["graph_break"].values()),
                "compiled_frames": counters["frames"]["ok"]} if cfg.parallel.compile else {}
    if profile:
        write_profile(lambda: trainer.train_step(batches), device, profile)
    b = loader.batch
    flops = train_flops(args, b.seg, b.text_seg) * cfg.optim.grad_accum / trainer.dims.sp
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters())
    kernel = kernel_name(trainer.engine.module.attention, attention, device, trainer.dtype, b.seg.to(device),
                         args.dim // args.heads)
    res = {"path": "trainer", "params": params, "seq_len": seq_len, "rows": rows, "attention": attention,
           "kernel": kernel, "heads": args.heads, "head_dim": args.dim // args.heads, "activation_checkpointing": ac,
           "checkpoint_blocks": cfg.parallel.checkpoint_blocks,
           "compile": cfg.parallel.compile, "float8": cfg.parallel.float8, "zero_stage": cfg.parallel.zero_stage,
           "zero3_gather": cfg.parallel.zero3_gather, "optimizer": cfg.optim.name,
           "dtype": str(trainer.dtype), **compiled,
           "step_s": dt, "tokens_per_s": b.real_tokens * cfg.optim.grad_accum / dt, **achieved(flops, dt, peak),
           "phases_s": phases.summary(steps), "device": device_name(device)}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if cfg.parallel.zero_stage == 3 and trainer.dims.world_size == 1:  # what sora-bench plan predicts for this row
        from .plan import Cluster, plan

        res["planned_gib"] = plan(args, seq_len * rows, Cluster(gpus=1), ac=ac,
                                  checkpoint_blocks=cfg.parallel.checkpoint_blocks,
                                  compiled=cfg.parallel.compile)[0]["memory_gib"]
    return res


def release(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def bench_bare(args, seq_len: int, rows: int, attention: str, ac: str, steps: int, warmup: int, device,
               peak: float | None, profile: str | None = None) -> dict:
    """The model alone (plain AdamW, no engine, loader or EMA): for attention and kernel work."""
    from .models import DiT
    from .models.flops import achieved, train_flops
    from .parallel import ParallelDims, parallelize_dit

    args = type(args)(**{**args.__dict__, "attention": attention})
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = parallelize_dit(DiT(args).to(device, dtype), ParallelDims(1, 0, 0, 1), ac)  # the trainer's AC policy
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

    def step():
        out = model(x, t, pos, seg, text, tseg, extent=extent)
        out.float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    dt = timed(step, steps, warmup, device)
    if profile:
        write_profile(step, device, profile)
    res = {"path": "bare", "params": sum(p.numel() for p in model.parameters()), "seq_len": seq_len, "rows": rows,
           "attention": attention,
           "kernel": kernel_name(model.attention, attention, device, dtype, seg, args.dim // args.heads),
           "heads": args.heads, "head_dim": args.dim // args.heads, "activation_checkpointing": ac, "step_s": dt,
           "tokens_per_s": int((seg > 0).sum()) / dt, **achieved(flops, dt, peak), "device": device_name(device)}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return res


def write_profile(step, device, path: str, rows: int = 40) -> None:
    """One step under torch.profiler to a text file: its time by kind of kernel, then the ops taking the most device
    (or CPU) time."""
    from torch.profiler import ProfilerActivity, profile

    from .step_breakdown import kernel_kinds

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        step()
        sync(device)
    kinds = kernel_kinds(prof, device)
    total = sum(kinds.values())
    clock = "device" if device.type == "cuda" else "CPU"
    lines = [f"{clock} time by kind of kernel: {total:.3f} s"] + [f"  {k:<34} {s:8.3f} s  {s / total:6.1%}"
                                                                 for k, s in kinds.items()]
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = "\n".join(lines) + "\n\n" + prof.key_averages().table(sort_by=key, row_limit=rows,
                                                                    max_name_column_width=70)
    Path(path).write_text(table)
    print(table, flush=True)


def attention_numerics(seq_len: int, heads: int, head_dim: int, text_len: int, backends: list[str], steps: int,
                       device, seed: int = 0, check: bool = True, segment_tokens: int | None = None) -> list[dict]:
    """Each backend against the naive float32 reference on the same packed row, in the dtype training
    uses on this device (bf16 on CUDA): relative error of the output and of dq, dk, dv on real tokens,
    for self-attention (segments vs segments) and cross-attention (segments vs packed text); plus the
    median forward+backward time of self-attention and its TFLOP/s counting real work only (sum n_i^2)."""
    from .models import DiTArgs, build_attention

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = DiTArgs(max_segments=64)
    sizes = (segment_tokens // 2, 3 * segment_tokens // 2) if segment_tokens else (seq_len // 16, seq_len // 3)
    seg, tseg, _ = synthetic_packed_batch(args, seq_len, 1, sizes, text_len, seed)
    seg, tseg = seg.to(device), tseg.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    real = seg > 0
    n = torch.bincount(seg[real])[1:].double()
    work = 4 * float((n**2).sum()) * heads * head_dim * 3.5  # fwd 4*n^2*d per head; backward 2.5x forward
    cot = torch.randn(1, seq_len, heads, head_dim, device=device, generator=g, dtype=dtype) * real[..., None, None]
    results = []
    for name in backends:
        res = {"attention": name, "seq_len": seq_len, "segments": int(n.numel()), "heads": heads,
               "head_dim": head_dim, "dtype": str(dtype)}
        try:
            be = build_attention(name, max_segments=args.max_segments)
            res["kernel"] = kernel_name(be, name, device, dtype, seg, head_dim)
            for kind, sk in (("self", seg), ("cross", tseg)) if check else ():
                q, k, v = (torch.randn(1, s, heads, head_dim, device=device, generator=g, dtype=dtype)
                           for s in (seq_len, sk.shape[1], sk.shape[1]))
                outs = []
                for impl, dt in ((be, dtype), (build_attention("naive"), torch.float32)):
                    qq, kk, vv = (x.detach().to(dt).requires_grad_() for x in (q, k, v))
                    out = impl(qq, kk, vv, mask=impl.prepare(seg, sk))
                    out.backward(cot.to(dt))
                    outs.append([o.detach().float() for o in (out[real], qq.grad, kk.grad, vv.grad)])
                    res.setdefault(f"{kind}_finite", bool(torch.isfinite(out).all()))  # padding rows too
                for label, a, b in zip(("out", "dq", "dk", "dv"), *outs):
                    res[f"{kind}_{label}_rel_err"] = float((a - b).norm() / b.norm())
            q, k, v = (torch.randn(1, seq_len, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            times = []
            for i in range(2 + steps):
                sync(device)
                t0 = time.perf_counter()
                be(q, k, v, mask=be.prepare(seg, seg)).backward(cot)
                sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            res["fwd_bwd_ms"] = statistics.median(times) * 1e3
            res["real_tflops"] = work / statistics.median(times) / 1e12
        except (RuntimeError, NotImplementedError, ValueError) as e:  # OOM, backend unavailable here
            res["error"] = str(e)[:200]
        print(json.dumps(res), flush=True)
        results.append(res)
    return results


def kernel_name(backend, name: str, device, dtype, seg, head_dim: int) -> str:
    """Which kernel a backend runs here on these rows: varlen picks one by what is installed, by the
    samples' lengths and by the head dim; the others are their name."""
    if not hasattr(backend, "kernel_for"):
        return name
    return backend.kernel_for(device, dtype, backend.prepare(seg, seg), head_dim)


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
    slots = sum(max(v[i : i + batch]) * len(v[i : i + batch]) for v in buckets.values() for i in range(0, len(v), batch))
    return {"samples": len(sizes), "seq_len": seq_len, "packing_efficiency": real / total,
            "pad_to_longest_efficiency": pad, "bucketing_efficiency": sum(sizes) / slots,
            "buckets": len(buckets), "loader_tokens_per_s_per_worker": real / dt / max(workers, 1),
            "mean_tokens_per_sample": statistics.mean(sizes), "max_tokens_per_sample": max(sizes)}


def parse_lengths(spec: str) -> list[tuple[float, int, int]]:
    """"0.7:1024-4096,0.3:8192-32768" -> [(share, low, high)]: sample lengths in tokens, uniform in each range."""
    try:
        parts = [(float(share), *map(int, span.split("-"))) for share, span in (p.split(":") for p in spec.split(","))]
    except ValueError:
        raise SystemExit(f"--lengths {spec!r}: use share:low-high[,share:low-high...], e.g. 0.7:1024-4096,0.3:8192-32768")
    return [(share / sum(p[0] for p in parts), lo, hi) for share, lo, hi in parts]


def length_stream(mix: list[tuple[float, int, int]], count: int, seed: int):
    """`count` packer items of token lengths drawn from `mix` (no data: the packer only reads sizes)."""
    from .data.packing import Item

    rng = np.random.default_rng(seed)
    shares = np.cumsum([m[0] for m in mix])
    for i in range(count):
        _, lo, hi = mix[min(int(np.searchsorted(shares, rng.random())), len(mix) - 1)]
        n = int(rng.integers(lo, hi + 1))
        yield Item(sid=(0, seed, i), key=f"{seed}/{i}", tokens=torch.zeros(n, 1), pos=torch.zeros(n, 3, dtype=torch.long),
                   grid=(1, 1, n), text=torch.zeros(1, 1), caption="")


def bench_balance(lengths: str, seq_len: int, dp: int, grad_accum: int, samples: int, lookahead: int,
                  model: str) -> list[dict]:
    """Today's token packer next to the cost-balanced one on the same streams (one per data-parallel rank):
    max/mean estimated cost over rows and, per step, over ranks (each rank's step: grad_accum rows), the share
    of real tokens, and every sample's count (none lost, none twice)."""
    from .data.packing import Packer
    from .models.flops import attention_weight, row_cost

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


def kept_per_block(name: str, seq_len: int, policy: str, compiled: bool, overrides: list[str] = ()) -> float:
    """[tokens, dim] tensors one block keeps for backward (bf16 units; counted through saved-tensor hooks, each
    storage once, weights not): depth 4 less depth 2, halved, on one packed row of seq_len tokens on this device.
    Eager op policies (elementwise, attention) keep theirs in torch's selective-checkpointing storage, which the
    hooks do not see: measure those compiled."""
    import dataclasses

    from .models import DiT
    from .parallel import OP_POLICIES, ParallelDims, parallelize_dit

    if policy in OP_POLICIES and not compiled:
        raise ValueError(f"--ac {policy} keeps its tensors where saved-tensor hooks cannot see them: add --compile")
    base = load_preset(name, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seg, tseg, pos = synthetic_packed_batch(base, seq_len, 1, (seq_len // 4, seq_len // 2), 32)
    kept = []
    for depth in (2, 4):
        torch.manual_seed(0)
        args = dataclasses.replace(base, depth=depth)
        model = parallelize_dit(DiT(args).to(device, torch.bfloat16).train(), ParallelDims(1, 0, 0, 1), policy,
                                compile_blocks=compiled)
        x = torch.randn(1, seq_len, args.patch_dim, device=device, dtype=torch.bfloat16)
        t = torch.rand(1, args.max_segments, device=device, dtype=torch.bfloat16)
        text = torch.randn(1, tseg.shape[1], args.text_dim, device=device, dtype=torch.bfloat16)
        inputs = (x, t, pos.to(device), seg.to(device), text, tseg.to(device))
        forward = lambda: model(*inputs, extent=pos.to(device) + 1)  # noqa: E731
        kept_for_backward(model, forward)  # compiled: the compile
        kept.append(kept_for_backward(model, forward))
    return (kept[1] - kept[0]) / 2 / (seq_len * base.dim * 2)


def kept_for_backward(model, forward) -> int:
    """Bytes that forward() keeps for backward (each storage once, the model's weights not), then the backward."""
    storages = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = forward()
    out.float().pow(2).mean().backward()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


def bench_activations(models: list[str], seq_len: int, policies: list[str], compiled: bool,
                      overrides: list[str] = ()) -> list[dict]:
    return [{"model": name, "seq_len": seq_len, "activation_checkpointing": policy, "compile": compiled,
             "kept_per_block": round(kept_per_block(name, seq_len, policy, compiled, overrides), 2)}
            for name in models for policy in policies]


def bench_plan(models: list[str], seq_lens: list[int], gpus: list[int], top: int, sample_tokens: int | None,
               max_comm: float, ac: str = "full", checkpoint_blocks: int = -1, compiled: bool = False,
               **cluster) -> list[dict]:
    """sora_train/plan.py for each preset, row budget and cluster size: the `top` fastest layouts (those that fit
    first), then the one needing the least memory among those that fit with communication at most `max_comm` of
    the step (marked "leanest"), when it is not among them."""
    from .plan import Cluster, plan

    out = []
    for name in models:
        args = load_preset(name)
        for s in seq_lens:
            for g in gpus:
                rows = [{**r, "activation_checkpointing": ac, "checkpoint_blocks": checkpoint_blocks,
                         "compile": compiled}
                        for r in plan(args, s, Cluster(gpus=g, **cluster), sample_tokens, ac=ac,
                                      checkpoint_blocks=checkpoint_blocks, compiled=compiled)]
                lean = [r for r in rows if r["fits"] and r["comm_share"] <= max_comm]
                leanest = min(lean, key=lambda r: r["memory_gib"]) if lean else None
                out += [{"model": name, "seq_len": s, "gpus": g, **r, "leanest": r is leanest} for r in rows[:top]]
                if leanest is not None and leanest not in rows[:top]:
                    out.append({"model": name, "seq_len": s, "gpus": g, **leanest, "leanest": True})
    return out


def main(argv=None) -> None:
    from .parallel import AC_POLICIES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    pm = sub.add_parser("model")
    pm.add_argument("--model", default="tiny")
    pm.add_argument("--seq-len", type=int, nargs="+", default=[4096])
    pm.add_argument("--rows", type=int, default=1)
    pm.add_argument("--attention", nargs="+", default=["varlen"])
    pm.add_argument("--ac", nargs="+", choices=AC_POLICIES, default=["none"],
                    help="activation checkpointing policies to time (parallel.activation_checkpointing)")
    pm.add_argument("--steps", type=int, default=5)
    pm.add_argument("--warmup", type=int, default=2)
    pm.add_argument("--peak-tflops", type=float, default=None)
    pm.add_argument("--params-only", action="store_true")
    pm.add_argument("--override", nargs="*", default=[], help="Hydra overrides, e.g. model.depth=4")
    pm.add_argument("--profile", default=None, help="write a torch.profiler table of one more step (last config)")
    pm.add_argument("--bare", action="store_true",
                    help="the model alone with plain AdamW (no DeepSpeed engine, loader or EMA): kernel work")
    pa = sub.add_parser("attention")
    pa.add_argument("--seq-len", type=int, nargs="+", default=[4096])
    pa.add_argument("--attention", nargs="+", default=["sdpa", "flex", "varlen"])
    pa.add_argument("--heads", type=int, default=16)
    pa.add_argument("--head-dim", type=int, default=64)
    pa.add_argument("--text-len", type=int, default=256, help="longest caption; packed text is 16x this")
    pa.add_argument("--steps", type=int, default=5)
    pa.add_argument("--segment-tokens", type=int, default=None,
                    help="samples of about this many tokens (0.5-1.5x); default seq_len/16 to seq_len/3")
    pa.add_argument("--no-check", action="store_true", help="time only (the float32 reference needs S^2 memory)")
    pk = sub.add_parser("packing")
    source = pk.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="shards: padding of Patch n' Pack vs pad-to-longest vs bucketing")
    source.add_argument("--lengths", help="a sample-length mix, share:low-high,...: the token packer vs the cost "
                                          "balanced one (data.balance) over --dp ranks")
    pk.add_argument("--dp", type=int, default=8)
    pk.add_argument("--grad-accum", type=int, default=1)
    pk.add_argument("--samples", type=int, default=2000, help="per rank, with --lengths")
    pk.add_argument("--model", default="1B", help="the preset whose attention weight prices a row")
    pk.add_argument("--seq-len", type=int, default=8192)
    pk.add_argument("--batch", type=int, default=8, help="samples per batch for pad-to-longest / bucketing")
    pk.add_argument("--workers", type=int, default=1)
    pk.add_argument("--lookahead", type=int, default=64)
    pp = sub.add_parser("plan", help="memory and step time of every (dp, ulysses, ring) layout (sora_train/plan.py)")
    pp.add_argument("--model", nargs="+", default=["1B"])
    pp.add_argument("--seq-len", type=int, nargs="+", default=[65536])
    pp.add_argument("--gpus", type=int, nargs="+", default=[8])
    pp.add_argument("--top", type=int, default=3, help="layouts per case, fastest first")
    pp.add_argument("--sample-tokens", type=int, default=None, help="clip length in the rows (default: one per row)")
    pp.add_argument("--max-comm", type=float, default=0.05,
                    help="the leanest layout shown: least memory with at most this share of the step communicating")
    pp.add_argument("--gpus-per-node", type=int, default=8)
    pp.add_argument("--ac", default="full", choices=AC_POLICIES,
                    help="parallel.activation_checkpointing")
    pp.add_argument("--checkpoint-blocks", type=int, default=-1, help="parallel.checkpoint_blocks (-1: every block)")
    pp.add_argument("--compile", action="store_true", help="parallel.compile (what compiled blocks keep)")
    pp.add_argument("--intra-gbps", type=float, default=350.0, help="GB/s per GPU inside a node")
    pp.add_argument("--inter-gbps", type=float, default=45.0, help="GB/s per GPU between nodes")
    pp.add_argument("--mfu", type=float, default=0.308, help="compute efficiency assumed (measured: 1B, 64k, H200)")
    pp.add_argument("--peak-tflops", type=float, default=989.0)
    pp.add_argument("--gpu-mem-gib", type=float, default=141.0)
    pv = sub.add_parser("activations", help="[tokens, dim] tensors a block keeps for backward, per policy (measured)")
    pv.add_argument("--model", nargs="+", default=["1B"])
    pv.add_argument("--seq-len", type=int, default=2048)
    pv.add_argument("--ac", nargs="+", choices=AC_POLICIES, default=["none", "full"])
    pv.add_argument("--compile", action="store_true", help="compiled blocks (parallel.compile)")
    pv.add_argument("--override", nargs="*", default=[], help="Hydra overrides, e.g. model.heads=24")
    for sp in (pm, pk, pa, pp, pv):
        sp.add_argument("--json", default=None)
    for sp in (pm, pa):
        sp.add_argument("--sdpa-backend", default=None, choices=["cudnn", "flash", "efficient", "math"],
                        help="pin torch SDPA to one kernel (for sdpa and varlen:sdpa)")
    a = p.parse_args(argv)
    with pinned_sdpa(getattr(a, "sdpa_backend", None)):
        results = run(a)
    for r in results:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


def pinned_sdpa(backend: str | None):
    from contextlib import nullcontext

    from torch.nn.attention import SDPBackend, sdpa_kernel

    names = {"cudnn": "CUDNN_ATTENTION", "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "math": "MATH"}
    return sdpa_kernel([getattr(SDPBackend, names[backend])]) if backend else nullcontext()


def run(a) -> list[dict]:
    if a.what == "plan":
        results = bench_plan(a.model, a.seq_len, a.gpus, a.top, a.sample_tokens, a.max_comm, a.ac, a.checkpoint_blocks,
                             a.compile, gpus_per_node=a.gpus_per_node, intra_gbps=a.intra_gbps,
                             inter_gbps=a.inter_gbps, mfu=a.mfu, peak_tflops=a.peak_tflops, gpu_mem_gib=a.gpu_mem_gib)
    elif a.what == "activations":
        results = bench_activations(a.model, a.seq_len, a.ac, a.compile, a.override)
    elif a.what == "packing" and a.lengths:
        results = bench_balance(a.lengths, a.seq_len, a.dp, a.grad_accum, a.samples, a.lookahead, a.model)
    elif a.what == "packing":
        results = [bench_packing(a.data, a.seq_len, a.batch, a.workers, a.lookahead)]
    elif a.what == "attention":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        results = [{**r, "sdpa_backend": a.sdpa_backend or "auto"} for s in a.seq_len for r in attention_numerics(
            s, a.heads, a.head_dim, a.text_len, a.attention, a.steps, device, check=not a.no_check,
            segment_tokens=a.segment_tokens)]
    else:
        from .models import count_params
        from .models.flops import device_peak_tflops

        args = load_preset(a.model, a.override)
        if a.params_only:
            results = [{"model": a.model, "params": count_params(args), "dim": args.dim, "depth": args.depth,
                        "heads": args.heads}]
        else:
            device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            peak = device_peak_tflops(a.peak_tflops)
            results = []
            for s in a.seq_len:
                for attn in a.attention:
                    for ac in a.ac:
                        try:
                            r = (bench_bare(args, s, a.rows, attn, ac, a.steps, a.warmup, device, peak, a.profile)
                                 if a.bare else bench_trainer(a.model, a.override, s, a.rows, attn, ac, a.steps,
                                                              a.warmup, peak, a.profile))
                        except (RuntimeError, NotImplementedError, ValueError) as e:  # OOM, backend not here
                            r = {"seq_len": s, "attention": attn, "activation_checkpointing": ac, "error": str(e)[:200]}
                        release(device)  # a failure's traceback held its frames' memory until here
                        results.append({"model": a.model, **r, "sdpa_backend": a.sdpa_backend or "auto"})
                        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    main()
