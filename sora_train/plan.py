"""A cost model for choosing a parallel layout (`sora-bench plan`): for a preset, a packed-row token budget and a
cluster shape, each (dp, ulysses, ring) layout's memory per GPU and its step time split into compute,
Ulysses all-to-all, ring (key/value all-gather) and ZeRO-3 traffic, with the bandwidths as inputs.

Compute is models/flops.py's count at an assumed MFU (default: the best measured, 1B at 64k on one H200,
docs/performance.md). Activation memory is calibrated on the measured single-GPU steps of that table: ~35
bf16 [tokens, dim] tensors per block without activation checkpointing (B at 64k: 41.4 GiB), one per block plus
~30 for the block being recomputed with it (1B at 64k: 19.7 GiB); the other checkpointing policies keep what
KEPT_PER_BLOCK says (checked on the trainer's step: docs/performance.md, with the other measured rows); compiled
blocks what COMPILED_KEPT_PER_BLOCK says (measured by `sora-bench activations`). ZeRO-3 adds two blocks'
gathered bf16 weights (the one computing, the next one arriving). Sequence-parallel traffic is on the critical
path (attention waits for it); ZeRO-3's parameter gathers and gradient reduce-scatters are prefetched and
overlapped, so only their excess over compute counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .models.dit import DiTArgs, count_params
from .models.flops import forward_flops

GIB = 2**30
BF16 = 2
# Bytes per parameter, partitioned over the world by ZeRO-3: bf16 weights and gradients, fp32 master weights,
# Adam's two moments, the fp32 EMA.
STATE_BYTES = 2 + 2 + 4 + 8 + 4
ACT_TENSORS_PER_BLOCK = 35  # without activation checkpointing (calibrated: module docstring)
ACT_TENSORS_RECOMPUTE = 30  # the block being recomputed under activation checkpointing
# Kept per block by each parallel.activation_checkpointing policy: full keeps the block's input; attention also
# the self- and cross-attention outputs (the trainer's 1B step at 64k on an H200: 45.2 GiB against full's 36.5,
# 1.9 tensors more per block); selective drops only the MLP's two hidden tensors, each 4 dims wide (an estimate:
# the H200 ran out of 141 GiB, as predicted).
# elementwise keeps the GEMMs' outputs (qkv 3, projection 1, cross-attention query and projection 2, MLP 4 + 1) and
# the attention outputs (2): 13, an estimate from the shapes.
KEPT_PER_BLOCK = {"none": ACT_TENSORS_PER_BLOCK, "selective": ACT_TENSORS_PER_BLOCK - 8, "elementwise": 13,
                  "attention": 3, "full": 1}


def recomputed_per_policy(kept: dict[str, int], block: int) -> dict[str, int]:
    """[tokens, dim] tensors alive while a block is recomputed: `block` for the whole-block policies, the MLP's
    (what selective keeps fewer of than none) for selective."""
    return {"none": 0, "selective": kept["none"] - kept["selective"],
            **dict.fromkeys(("elementwise", "attention", "full"), block)}


RECOMPUTED = recomputed_per_policy(KEPT_PER_BLOCK, ACT_TENSORS_RECOMPUTE)
# Compiled blocks (parallel.compile: one graph per block, the compiler choosing what to keep within each policy),
# measured: `sora-bench activations --model 1B --ac none selective elementwise attention full --compile` (CPU,
# Inductor, 2048 tokens: 25.1, 16.1, 14.7, 3.0, 1; docs/performance.md). The block being recomputed is taken to
# hold what a block without checkpointing keeps (an upper bound: not measured).
COMPILED_KEPT_PER_BLOCK = {"none": 25, "selective": 16, "elementwise": 15, "attention": 3, "full": 1}
COMPILED_RECOMPUTED = recomputed_per_policy(COMPILED_KEPT_PER_BLOCK, COMPILED_KEPT_PER_BLOCK["none"])


def activation_tensors(depth: int, policy: str = "full", checkpoint_blocks: int = -1, compiled: bool = False) -> int:
    """[tokens, dim] bf16 tensors of activations at the peak of backward, for a checkpointing policy applied to
    the first `checkpoint_blocks` blocks (-1: all; parallel.checkpoint_blocks), the rest keeping everything;
    compiled: parallel.compile."""
    kept, recomputed = (COMPILED_KEPT_PER_BLOCK, COMPILED_RECOMPUTED) if compiled else (KEPT_PER_BLOCK, RECOMPUTED)
    checkpointed = depth if checkpoint_blocks == -1 else min(checkpoint_blocks, depth)
    return (checkpointed * kept[policy] + (depth - checkpointed) * kept["none"]
            + (recomputed[policy] if checkpointed else 0))


@dataclass
class Cluster:
    gpus: int
    gpus_per_node: int = 8
    intra_gbps: float = 350.0  # GB/s per GPU inside a node (NVLink all-to-all / all-gather, achieved)
    inter_gbps: float = 45.0  # GB/s per GPU between nodes (400 Gb/s InfiniBand per GPU, achieved)
    peak_tflops: float = 989.0
    mfu: float = 0.308  # the best measured 1B step at 64k with activation checkpointing (docs/performance.md)
    gpu_mem_gib: float = 141.0


def layouts(gpus: int, heads: int):
    """Every (dp, ulysses, ring) with dp x ulysses x ring = gpus and ulysses dividing the heads."""
    for ulysses in range(1, heads + 1):
        if heads % ulysses or gpus % ulysses:
            continue
        for ring in range(1, gpus // ulysses + 1):
            if (gpus // ulysses) % ring == 0:
                yield gpus // (ulysses * ring), ulysses, ring


def row_segments(seq_len: int, sample_tokens: int, text_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One packed row of samples of `sample_tokens` (the last one shorter), each with `text_len` text tokens."""
    n = -(-seq_len // sample_tokens)
    seg = torch.arange(seq_len) // sample_tokens + 1
    return seg[None], torch.arange(1, n + 1).repeat_interleave(text_len)[None]


def plan_layout(a: DiTArgs, seq_len: int, fwd: float, params: int, c: Cluster, dp: int, ulysses: int, ring: int,
                ac: str = "full", checkpoint_blocks: int = -1, compiled: bool = False) -> dict:
    """One layout; fwd: the forward FLOPs of one row, params: the preset's parameter count; ac, checkpoint_blocks
    and compiled: parallel.activation_checkpointing, parallel.checkpoint_blocks and parallel.compile."""
    sp = ulysses * ring
    local = seq_len / sp  # tokens per GPU
    recomputing = ac != "none" and checkpoint_blocks != 0
    passes = 3 if recomputing else 2  # forward, backward (+ the forward again under activation checkpointing)
    compute_s = 3 * fwd / sp / (c.peak_tflops * 1e12 * c.mfu)  # MFU credits forward + backward, not the recompute
    bandwidth = lambda ranks_span: (c.intra_gbps if ranks_span <= c.gpus_per_node else c.inter_gbps) * 1e9  # noqa: E731
    # Ulysses: q, k, v in and the output back, per block and pass; each GPU sends (u-1)/u of its local tensor.
    ulysses_bytes = a.depth * passes * 4 * local * a.dim * BF16 * (ulysses - 1) / ulysses
    # Ring: each GPU receives the other ring ranks' key/value blocks (its heads) per block, forward (and the
    # recompute); backward reduce-scatters their gradients: the same volume.
    ring_bytes = a.depth * passes * 2 * (seq_len / ring) * (a.dim / ulysses) * BF16 * (ring - 1)
    # A parameter gather per pass, and the gradients' reduce-scatter; at sp > 1 an all-reduce instead (twice the
    # volume: parallel/deepspeed_config.py turns reduce_scatter off there).
    zero_bytes = (passes + (2 if sp > 1 else 1)) * params * BF16 * (c.gpus - 1) / c.gpus
    ulysses_s = ulysses_bytes / bandwidth(ulysses)
    ring_s = ring_bytes / bandwidth(sp)
    zero_s = zero_bytes / bandwidth(c.gpus)
    step_s = compute_s + ulysses_s + ring_s + max(0.0, zero_s - compute_s)
    row = local * a.dim * BF16
    activations = activation_tensors(a.depth, ac, checkpoint_blocks, compiled) * row
    gathered_kv = 2 * seq_len * (a.dim / ulysses) * BF16 if ring > 1 else 0  # one block's, while it attends
    # ZeRO-3 gathers a block at a time and prefetches the next (parallel.gather_per_block): two blocks' bf16 weights
    gathered_params = 2 * params / a.depth * BF16
    memory = params * STATE_BYTES / c.gpus + activations + gathered_kv + gathered_params
    return {"dp": dp, "ulysses": ulysses, "ring": ring, "tokens_per_gpu": int(local),
            "memory_gib": memory / GIB, "fits": memory / GIB <= c.gpu_mem_gib, "compute_s": compute_s,
            "ulysses_s": ulysses_s, "ring_s": ring_s, "zero_s": zero_s, "step_s": step_s,
            "comm_share": (ulysses_s + ring_s + max(0.0, zero_s - compute_s)) / step_s,
            "tokens_per_s": dp * seq_len / step_s}


def plan(a: DiTArgs, seq_len: int, cluster: Cluster, sample_tokens: int | None = None, text_len: int = 256,
         ac: str = "full", checkpoint_blocks: int = -1, compiled: bool = False) -> list[dict]:
    """Every layout of the cluster, fastest (real tokens per second over the cluster) first; a layout that does
    not fit in memory last. `sample_tokens`: the clip length the rows hold (default: one clip per row)."""
    fwd, params = forward_flops(a, *row_segments(seq_len, sample_tokens or seq_len, text_len)), count_params(a)
    rows = [plan_layout(a, seq_len, fwd, params, cluster, dp, u, r, ac, checkpoint_blocks, compiled)
            for dp, u, r in layouts(cluster.gpus, a.heads) if seq_len % (u * r) == 0]
    return sorted(rows, key=lambda r: (not r["fits"], -r["tokens_per_s"]))
