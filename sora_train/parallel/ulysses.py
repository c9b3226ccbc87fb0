"""Ulysses sequence parallelism around an attention backend, via DeepSpeed's DistributedAttention.

Each SP rank holds S/sp tokens of every packed row. Around self-attention, all-to-all turns
[B,S/sp,H,D] into [B,S,H/sp,D] (all tokens, some heads), the inner backend attends with the
full row's segment mask, and a second all-to-all turns it back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from ..models.attention import AttentionBackend


def gather_sequence(x: torch.Tensor, group, dim: int = 1) -> torch.Tensor:
    """All-gather a (non-differentiable) per-token tensor along the sequence dim."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim)


def shard_sequence(x: torch.Tensor, sp_rank: int, sp: int, dim: int = 1) -> torch.Tensor:
    return x.chunk(sp, dim)[sp_rank] if sp > 1 else x


class UlyssesAttention(AttentionBackend):
    def __init__(self, inner: AttentionBackend, sp_group):
        from deepspeed.sequence.layer import DistributedAttention

        self.inner, self.group = inner, sp_group
        self.dist_attn = DistributedAttention(inner, sp_group, scatter_idx=2, gather_idx=1)

    def prepare(self, seg_q: torch.Tensor, seg_k: torch.Tensor):
        full = gather_sequence(seg_q, self.group)
        return self.inner.prepare(full, full if seg_k is seg_q else gather_sequence(seg_k, self.group))

    def forward(self, q, k, v, mask):
        # batch_dim_idx=0: [B,S,H,D]; RoPE is applied before (rotary_pos_emb stays None), mask by keyword
        return self.dist_attn(q, k, v, 0, mask=mask)
