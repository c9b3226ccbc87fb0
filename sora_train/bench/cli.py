"""sora-bench: how fast a preset goes on this device, and how well the loader packs.

  sora-bench model --model 1B --seq-len 65536 --ac full      (the training step users get: Trainer.train_step)
  sora-bench model --model 1B --seq-len 65536 --ac attention --profile P   (P: time by kind of kernel, top ops;
                                                                            P.trace.json.gz: the step's timeline)
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
from pathlib import Path

import torch

from .attention import attention_numerics
from .common import load_preset, release
from .layouts import bench_plan
from .memory import bench_activations
from .model import bench_bare, bench_trainer
from .packing import bench_balance, bench_packing


def main(argv=None) -> None:
    from ..parallel import AC_POLICIES

    p = argparse.ArgumentParser(prog="sora-bench", description=__doc__.splitlines()[0])
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
        print("  ".join(f"{k}={shown(v)}" for k, v in r.items()))
    if a.json:
        Path(a.json).write_text(json.dumps(results, indent=1))


def shown(v) -> str:
    """A value for the console table: floats to 4 significant digits, also inside a dict (a row's phases)."""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}: {shown(x)}" for k, x in v.items()) + "}"
    return str(v)


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
        from ..models import count_params
        from ..models.flops import device_peak_tflops

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
