"""Analytic FLOPs of a DiT forward on a packed batch (a multiply-add = 2 FLOPs), and MFU: the one place
either is computed (the trainer's metrics and sora-bench both take them from here).

Attention is counted over the real segments (sum of n_i^2, not S^2) and cross-attention over
each sample's real text length, because that is the work a varlen/flex kernel does and what MFU
should credit; padding tokens are not counted, so padding shows up as lost MFU.
"""

from __future__ import annotations

import torch

from .dit import DiTArgs
from .layers import FractionalPositions


def block_token_flops(dim: int, mlp_ratio: float, cross_attention: bool) -> int:
    """One block's forward FLOPs per token in its linear layers: qkv, proj, mlp (+ cross-attention q, proj)."""
    D, hidden = dim, int(dim * mlp_ratio)
    return 2 * D * 3 * D + 2 * D * D + 2 * 2 * D * hidden + (4 * D * D if cross_attention else 0)


def attention_weight(dim: int, mlp_ratio: float, cross_attention: bool) -> float:
    """Self-attention FLOPs of one (query, key) pair relative to a block's linear FLOPs per token: a packed row
    of samples n_i costs ~ sum n_i + w * sum n_i^2 (w ~ 1/(6 dim); the 1B preset: a 60k-token clip's attention is
    ~6x its linear work). The packer balances rows on this (data.balance=cost)."""
    return 4 * dim / block_token_flops(dim, mlp_ratio, cross_attention)


def row_cost(sizes, seq_len: int, weight: float) -> float:
    """A packed row's estimated step cost in token-equivalents: every one of its seq_len tokens (padding too)
    through the linear layers, plus attention over each sample, weight * sum n_i^2 (weight: attention_weight)."""
    return seq_len + weight * sum(n * n for n in sizes)


def slot_counts(seg: torch.Tensor, slots: int) -> torch.Tensor:
    """seg [B,S] segment ids (0: padding) -> [B * (slots - 1)] float64 counts of ids 1..slots-1, row by row: one
    bincount over the rows (a one-hot comparison costs S x slots: ~45 ms a step for a 64k row of 256 images)."""
    rows = seg.shape[0]
    offset = torch.arange(rows, device=seg.device)[:, None] * slots
    counts = torch.bincount((seg.long() + offset).flatten(), minlength=rows * slots).view(rows, slots)
    return counts[:, 1:].flatten().double()


def block_flops(a: DiTArgs, seg: torch.Tensor, text_seg: torch.Tensor | None) -> float:
    """One block's forward FLOPs on rows of segment ids seg [B,S] (text_seg [B,L]: their captions)."""
    D = a.dim
    slots = int(max(seg.max(), 0 if text_seg is None else text_seg.max())) + 1
    n = slot_counts(seg, slots)  # tokens per sample slot
    per_token = block_token_flops(D, a.mlp_ratio, a.cross_attention and text_seg is not None)
    flops = per_token * float(n.sum()) + 2 * D * 6 * D * int((n > 0).sum()) + 4 * D * float((n * n).sum())  # adaLN
    if a.cross_attention and text_seg is not None:
        ltxt = slot_counts(text_seg, slots)
        flops += 4 * D * float((n * ltxt).sum()) + 2 * D * 2 * D * float(ltxt.sum())  # attention; cross k, v
    return flops


def forward_flops(a: DiTArgs, seg: torch.Tensor, text_seg: torch.Tensor | None,
                  routed_seg: torch.Tensor | None = None) -> int:
    """seg [B,S], text_seg [B,L] packed segment ids -> forward FLOPs. routed_seg: the segment ids of the tokens
    that ran model.route's span of blocks (models/routing.py: RouteLayout.seg), whose blocks count those only."""
    D, P = a.dim, a.patch_dim
    slots = int(max(seg.max(), 0 if text_seg is None else text_seg.max())) + 1
    n = slot_counts(seg, slots)  # tokens per sample slot
    samples = int((n > 0).sum())
    N = float(n.sum())
    span = len(a.route.span(a.depth)) if routed_seg is not None else 0
    blocks = (a.depth - span) * block_flops(a, seg, text_seg)
    if span:
        blocks += span * block_flops(a, routed_seg, text_seg)
    total_text = 0.0 if text_seg is None else float((text_seg > 0).sum())
    embed = 2 * P * D * N + 2 * D * P * N + samples * (2 * a.freq_dim * D + 2 * D * D + 2 * D * 2 * D)
    if a.frac_pos:  # FractionalPositions: fractions x wave vectors -> sin, cos -> D per token
        waves = FractionalPositions.num_waves(a.frac_pos_joint)
        embed += (2 * 3 * waves + 2 * 2 * waves * D) * N
    if a.cross_attention:
        embed += total_text * (2 * a.text_dim * D + 2 * D * D)
        if a.pooled_text:  # mean over each sample's text, then a 2-layer MLP per sample
            embed += 2 * a.text_dim * total_text + samples * (2 * a.text_dim * D + 2 * D * D)
    return int(blocks + embed)


def train_flops(a: DiTArgs, seg, text_seg, routed_seg=None) -> int:
    """Forward + backward (2x forward); recomputation under activation checkpointing is not credited."""
    return 3 * forward_flops(a, seg, text_seg, routed_seg)


# Dense bf16 peak TFLOP/s per device (vendor datasheets, no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0,
               "B200": 2250.0, "GH200": 989.0}


def device_peak_tflops(override: float | None = None) -> float | None:
    """The current CUDA device's dense bf16 peak (or `override`); None where unknown (CPU)."""
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            return PEAK_TFLOPS[key]
    return None


def achieved(flops: float, seconds: float, peak_tflops: float | None) -> dict[str, float]:
    """{"tflops": achieved TFLOP/s, "mfu": its fraction of the peak (when the peak is known)}."""
    tflops = flops / max(seconds, 1e-12) / 1e12
    return {"tflops": tflops, **({"mfu": tflops / peak_tflops} if peak_tflops else {})}
