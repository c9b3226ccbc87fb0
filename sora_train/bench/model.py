"""sora-bench model: the training step users get (`train.build()`, the DeepSpeed engine, `Trainer.train_step`)
and the bare model loop (the model alone with plain AdamW: kernel work)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import torch

from .common import (SyntheticPackedLoader, device_name, kernel_name, release, sync, synthetic_packed_batch, timed,
                     train_config)


def bench_trainer(name: str, overrides: list[str], seq_len: int, rows: int, attention: str, ac: str, steps: int,
                  warmup: int, peak: float | None, profile: str | None = None) -> dict:
    """The training step users get: `train.build()` (the DeepSpeed engine with the config's ZeRO stage,
    precision and optimizer, EMA on) fed by SyntheticPackedLoader, timed through `Trainer.train_step`."""
    import tempfile

    from torch._dynamo.utils import counters

    from ..train import build

    out = tempfile.mkdtemp(prefix="sora_bench_")
    cfg = train_config(name, [*overrides, f"data.seq_len={seq_len}", f"data.rows={rows}",
                              f"model.attention={attention}", f"parallel.activation_checkpointing={ac}",
                              "ema.enabled=true", "data.train=synthetic", "logging.wandb.mode=disabled",
                              f"out_dir={out}"])
    from ..config import model_args

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

    from ..models.flops import achieved, train_flops
    from ..models.routing import route_layout
    from .breakdown import StepPhases

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
    # model.route: the span's blocks counted on the tokens that ran them, as the trainer's MFU counts them
    route = route_layout(args.route, b.tokens, b.pos, b.seg, torch.Generator().manual_seed(0), trainer.dims.sp)
    flops = train_flops(args, b.seg, b.text_seg, None if route is None else route.seg) * cfg.optim.grad_accum \
        / trainer.dims.sp
    params = sum(getattr(p, "ds_numel", p.numel()) for p in trainer.engine.module.parameters())
    kernel = kernel_name(trainer.engine.module.attention, attention, device, trainer.dtype, b.seg.to(device),
                         args.dim // args.heads)
    res = {"path": "trainer", "params": params, "seq_len": seq_len, "rows": rows, "attention": attention,
           "kernel": kernel, "heads": args.heads, "head_dim": args.dim // args.heads, "activation_checkpointing": ac,
           "checkpoint_blocks": cfg.parallel.checkpoint_blocks,
           "compile": cfg.parallel.compile, "float8": cfg.parallel.float8, "zero_stage": cfg.parallel.zero_stage,
           "zero3_gather": cfg.parallel.zero3_gather, "optimizer": cfg.optim.name,
           "dtype": str(trainer.dtype), **compiled,
           **({"routed": 1 - int((route.seg > 0).sum()) / b.real_tokens, "routed_blocks": "{}-{}".format(
               args.route.span(args.depth).start, args.route.span(args.depth).stop - 1)} if route is not None else {}),
           "step_s": dt, "tokens_per_s": b.real_tokens * cfg.optim.grad_accum / dt, **achieved(flops, dt, peak),
           "phases_s": phases.summary(steps), "device": device_name(device)}
    if device.type == "cuda":
        res["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if cfg.parallel.zero_stage == 3 and trainer.dims.world_size == 1:  # what sora-bench plan predicts for this row
        from ..plan import Cluster, plan

        res["planned_gib"] = plan(args, seq_len * rows, Cluster(gpus=1), ac=ac,
                                  checkpoint_blocks=cfg.parallel.checkpoint_blocks,
                                  compiled=cfg.parallel.compile)[0]["memory_gib"]
    return res


def bench_bare(args, seq_len: int, rows: int, attention: str, ac: str, steps: int, warmup: int, device,
               peak: float | None, profile: str | None = None) -> dict:
    """The model alone (plain AdamW, no engine, loader or EMA): for attention and kernel work."""
    from ..models import DiT
    from ..models.flops import achieved, train_flops
    from ..parallel import ParallelDims, parallelize_dit

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
    (or CPU) time; and its timeline beside it, `path`.trace.json.gz (chrome://tracing, Perfetto): the gaps between
    kernels, which no table shows, are what a GPU session has no time left to look for."""
    from torch.profiler import ProfilerActivity, profile

    from .breakdown import kernel_kinds

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
    trace = Path(f"{path}.trace.json")
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as out:
        shutil.copyfileobj(f, out)
    trace.unlink()
    print(table, flush=True)
