"""Context parallelism across the ring group: the sequence split further than Ulysses can split heads.

Each ring rank holds one contiguous block of every packed row (all of its Ulysses heads). Around the inner
attention backend, the ranks all-gather keys and values (llama3-style context parallelism, Dubey et al. 2024,
section 3.3.2) and each attends its own queries to the keys their samples can see: the smallest window of the
row that holds every segment present in the block. Gradients of the gathered keys and values are reduce-
scattered back (GatherSequence's backward).

Why all-gather and not a P2P ring with online-softmax merging: packed rows restrict attention to each sample,
so most (query block, key block) pairs of a ring are empty or partial, and a ring then needs its own
per-step segment bookkeeping and LSE merging for every kernel. After the gather, the inner backend (varlen's
flash-attn / torch varlen / cuDNN SDPA on CUDA, SDPA on CPU) sees one ordinary packed problem with query and
key lengths per segment: one code path on CPU and CUDA, tested here. ring-flash-attn's
`llama3_flash_attn_varlen_func` is this algorithm for flash-attn alone (no CPU path to test, no cuDNN). The
price: the gather is not overlapped with compute, and each rank holds its Ulysses heads' keys and values for
the whole row; `sora-bench plan` puts both in figures.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from ..models.attention import AttentionBackend

from .ulysses import gather_sequence


class GatherSequence(torch.autograd.Function):
    """All-gather along `dim` in group-rank order; backward sums each rank's gradient slice over the group.
    Written here because torch.distributed.nn.functional.all_gather's non-NCCL backward (all-to-all emulated
    with scatter) passes group ranks where it needs global ones and fails in any gloo subgroup (torch 2.14)."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim)

    @staticmethod
    def backward(ctx, grad):
        n, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            parts = [p.contiguous() for p in grad.chunk(n, ctx.dim)]
            out = torch.empty_like(parts[rank])
            dist.reduce_scatter(out, parts, group=ctx.group)
            return out, None, None
        total = grad.contiguous().clone()  # gloo has no reduce-scatter: sum everything, keep this rank's slice
        dist.all_reduce(total, group=ctx.group)
        return total.chunk(n, ctx.dim)[rank].contiguous(), None, None


def key_window(seg_q: torch.Tensor, seg_k: torch.Tensor) -> tuple[int, int]:
    """[lo, hi) of the keys any query of the micro-batch may see: the first to the last key whose segment is
    present among the queries of its row (rows of one micro-batch share the window, their union)."""
    lo, hi = seg_k.shape[1], 0
    for q_row, k_row in zip(seg_q, seg_k):
        seen = torch.isin(k_row, q_row.unique()).nonzero()
        if len(seen):
            lo, hi = min(lo, int(seen[0])), max(hi, int(seen[-1]) + 1)
    return (0, seg_k.shape[1]) if hi == 0 else (lo, hi)


class ContextParallelAttention(AttentionBackend):
    """Wraps an attention backend (models/attention.py's interface). Queries stay local; keys and values are
    gathered over `group` in rank order (ring rank j holds block j of the row)."""

    def __init__(self, inner: AttentionBackend, group):
        self.inner, self.group = inner, group

    def prepare(self, seg_q: torch.Tensor, seg_k: torch.Tensor) -> dict:
        full_k = gather_sequence(seg_k, self.group)
        lo, hi = key_window(seg_q, full_k)
        return {"window": (lo, hi), "inner": self.inner.prepare(seg_q, full_k[:, lo:hi])}

    def forward(self, q, k, v, mask):
        lo, hi = mask["window"]
        kv = GatherSequence.apply(torch.stack((k, v)), self.group, 2)  # one collective: [2,B,S,H,D]
        return self.inner(q, kv[0, :, lo:hi], kv[1, :, lo:hi], mask["inner"])
