"""Attention over packed rows, restricted by segment ids, behind one interface.

A backend is an nn.Module with no parameters:
  prepare(seg_q [B,Sq], seg_k [B,Sk]) -> mask object   (once per forward, reused by every layer)
  forward(q [B,Sq,H,D], k [B,Sk,H,D], v [B,Sk,H,D], mask) -> [B,Sq,H,D]   (`mask` by that name:
  Ulysses passes it by keyword)
Query i may attend key j iff seg_q[i] == seg_k[j]. Outputs at padding queries (segment 0) are
never used and only guaranteed finite. On real tokens all backends compute the same function;
`naive` is the reference the tests compare against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def segment_mask(seg_q: torch.Tensor, seg_k: torch.Tensor) -> torch.Tensor:
    """Boolean [B,1,Sq,Sk]; rows with no allowed key are opened fully (padding only)."""
    m = seg_q[:, :, None] == seg_k[:, None, :]
    m = m | ~m.any(-1, keepdim=True)
    return m[:, None]


class NaiveAttention(nn.Module):
    def prepare(self, seg_q, seg_k):
        return segment_mask(seg_q, seg_k)

    def forward(self, q, k, v, mask):
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        scores = scores.float().masked_fill(~mask, float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1).to(v.dtype), v)


class SDPAAttention(nn.Module):
    """torch SDPA with a dense block-diagonal boolean mask: simple, O(S^2) mask memory."""

    def prepare(self, seg_q, seg_k):
        return segment_mask(seg_q, seg_k)

    def forward(self, q, k, v, mask):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)


class FlexAttention(nn.Module):
    """flex_attention with a block mask: skips fully masked blocks. GPU path (backward is CUDA-only)."""

    def __init__(self, compile: bool = True):
        super().__init__()
        from torch.nn.attention.flex_attention import flex_attention

        self._fn = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    def prepare(self, seg_q, seg_k):
        from torch.nn.attention.flex_attention import create_block_mask

        open_rows = ~(seg_q[:, :, None] == seg_k[:, None, :]).any(-1)  # [B,Sq] padding rows with no key

        def mask_mod(b, h, qi, ki):
            return (seg_q[b, qi] == seg_k[b, ki]) | open_rows[b, qi]

        B, Sq, Sk = seg_q.shape[0], seg_q.shape[1], seg_k.shape[1]
        return create_block_mask(mask_mod, B, None, Sq, Sk, device=seg_q.device)

    def forward(self, q, k, v, mask):
        out = self._fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask)
        return out.transpose(1, 2)


def varlen_lengths(seg_q: torch.Tensor, seg_k: torch.Tensor, max_segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: lengths of segments 1..max_segments then of padding, for queries and keys: [B*(M+1)].

    Packed rows keep each segment contiguous and padding last, so segment j of row b is one run.
    Zero-length pairs are kept so query and key sequences correspond one to one.
    """
    ids = torch.arange(1, max_segments + 1, device=seg_q.device)
    lq = (seg_q[:, :, None] == ids).sum(1)  # [B,M]
    lk = (seg_k[:, :, None] == ids).sum(1)
    pq, pk = (seg_q == 0).sum(1, keepdim=True), (seg_k == 0).sum(1, keepdim=True)
    return torch.cat([lq, pq], 1).flatten(), torch.cat([lk, pk], 1).flatten()


class VarlenAttention(nn.Module):
    """flash-attn's varlen kernel (cu_seqlens over the packed rows) when installed on CUDA; else the
    same sequences with SDPA one at a time, which on CPU beats a dense S x S mask (no masked work)."""

    def __init__(self, max_segments: int = 64):
        super().__init__()
        self.max_segments = max_segments
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            flash_attn_varlen_func = None
        self._flash = flash_attn_varlen_func

    def prepare(self, seg_q, seg_k):
        lq, lk = varlen_lengths(seg_q, seg_k, self.max_segments)
        cu = lambda n: F.pad(n.cumsum(0), (1, 0)).to(torch.int32)  # noqa: E731
        return {"lq": lq.tolist(), "lk": lk.tolist(), "cu_q": cu(lq), "cu_k": cu(lk),
                "max_q": int(lq.max()), "max_k": int(lk.max())}

    def forward(self, q, k, v, mask):
        B, Sq, H, D = q.shape
        qf, kf, vf = q.reshape(-1, H, D), k.reshape(-1, H, D), v.reshape(-1, H, D)
        if self._flash is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            out = self._flash(qf, kf, vf, mask["cu_q"], mask["cu_k"], mask["max_q"], mask["max_k"])
            return out.reshape(B, Sq, H, D)
        outs, kq, kk = [], 0, 0
        for nq, nk in zip(mask["lq"], mask["lk"]):
            if nq:
                if nk:
                    o = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in
                                                         (qf[kq:kq + nq], kf[kk:kk + nk], vf[kk:kk + nk])))
                    outs.append(o[0].transpose(0, 1))
                else:  # padding queries with no padding keys: output unused, keep it finite
                    outs.append(torch.zeros_like(qf[kq:kq + nq]))
            kq, kk = kq + nq, kk + nk
        return torch.cat(outs).reshape(B, Sq, H, D)


def build_attention(name: str, max_segments: int = 64) -> nn.Module:
    if name == "naive":
        return NaiveAttention()
    if name == "sdpa":
        return SDPAAttention()
    if name == "flex":
        return FlexAttention()
    if name in ("varlen", "flash"):
        return VarlenAttention(max_segments)
    raise ValueError(f"unknown attention backend {name!r}; use sdpa, flex, varlen (flash-attn) or naive")
