"""DiT over packed spacetime patches (Peebles & Xie 2023; NaViT packing; PixArt-style text cross-attention).

Pure PyTorch: no process groups, no DeepSpeed. Parallelism is applied from outside
(sora_train/parallel): Ulysses replaces `DiT.attention`, checkpointing wraps `DiT.blocks[i]`.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import build_attention
from .routing import RouteArgs, RouteLayout, gather_tokens, scatter_tokens
from .layers import CrossAttention, FractionalPositions, Linear, Mlp, RoPE3D, SelfAttention, TimestepEmbedder, modulate


@dataclass
class DiTArgs:
    """The model's arguments, and the config schema of `model.*` (conf/model/*.yaml are presets of it): one class,
    one set of defaults. The defaults' codec and text widths are the cluster presets' (a video VAE's 16 latent
    channels, a T5-XXL-class encoder's 4096); the CPU preset `tiny` sets the pixel codec's and MiniLM's."""

    name: str = "custom"  # the preset's name (logs, checkpoints)
    in_channels: int = 16  # latent channels of the codec (a video VAE's, e.g. Wan 2.1)
    patch_size: tuple[int, int, int] = (1, 2, 2)  # (t,h,w) in latent units
    dim: int = 192
    depth: int = 5
    heads: int = 6
    mlp_ratio: float = 4.0
    text_dim: int = 4096  # text-encoder width (a T5-XXL-class encoder)
    cross_attention: bool = True  # False: unconditional pretraining, no text
    pooled_text: bool = True  # add the mean text state to the adaLN conditioning (global signal, SD3-style)
    qk_norm: bool = True
    frac_pos: bool = False  # add NaViT fractional position embeddings (absolute place within the clip)
    frac_pos_joint: bool = False  # also waves across axes (t+w, h-t, ...)
    rope_theta: float = 10000.0
    attention: str = "varlen"  # varlen | sdpa | flex | naive (varlen: fastest in every GPU measurement)
    max_segments: int = 64  # samples per packed row (varlen backend)
    freq_dim: int = 256
    eps: float = 1e-6
    route: RouteArgs = field(default_factory=RouteArgs)  # training only: tokens that skip blocks (routing.py)

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)  # the config hands a list

    @property
    def patch_dim(self) -> int:
        return self.in_channels * math.prod(self.patch_size)

    def validate(self) -> None:
        if len(self.patch_size) != 3:
            raise ValueError(f"model.patch_size={list(self.patch_size)}: give (t, h, w), three sizes")
        if self.dim % self.heads:
            raise ValueError(f"model.dim={self.dim} is not divisible by model.heads={self.heads}")
        if (self.dim // self.heads) % 2 or self.dim // self.heads < 6:
            raise ValueError(f"head dim {self.dim // self.heads} must be even and >= 6 for 3D RoPE")
        self.route.validate(self.depth)


def to_tokens(per_sample: torch.Tensor, sample_of_token: torch.Tensor, onehot: bool | None = None) -> torch.Tensor:
    """[B,M,K] values per sample slot -> [B,S,K] per token: a row-wise gather, exact.

    Its backward sums each sample's tokens. CPU: index_select's own backward (index_add), 2.5x faster there
    than gather's scatter_add over an expanded [B,S,K] index. CUDA (onehot): a one-hot [B,M,S] GEMM instead,
    because index_add there is atomics of thousands of tokens into the same few rows (4.6 ms per block for the
    1B preset at 64k tokens on an H200, 5% of the step; docs/performance.md); the GEMM is one pass, exact (a
    single 1.0 per row) and deterministic. Only the backward is a GEMM: a one-hot forward's [B,S,K] output is a
    GEMM's, which a compiled block keeps for backward (six [tokens, dim] tensors per block, measured: sora-bench
    activations) where a gather's it recomputes, fused into its consumers."""
    if onehot is None:
        onehot = per_sample.is_cuda
    if onehot:
        return _GatherSummedByGemm.apply(per_sample, sample_of_token)
    return _gather(per_sample, sample_of_token)


def _gather(per_sample: torch.Tensor, sample_of_token: torch.Tensor) -> torch.Tensor:
    B, M = per_sample.shape[:2]
    rows = sample_of_token + torch.arange(B, device=sample_of_token.device)[:, None] * M
    return per_sample.flatten(0, 1).index_select(0, rows.flatten()).unflatten(0, sample_of_token.shape)


class _GatherSummedByGemm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, per_sample, sample_of_token):
        ctx.save_for_backward(sample_of_token)
        ctx.slots = per_sample.shape[1]
        return _gather(per_sample, sample_of_token)

    @staticmethod
    def backward(ctx, grad):
        (sample_of_token,) = ctx.saved_tensors
        onehot = F.one_hot(sample_of_token, ctx.slots).to(grad.dtype)  # [B,S,M]
        return torch.bmm(onehot.transpose(1, 2), grad), None


class DiTBlock(nn.Module):
    def __init__(self, a: DiTArgs):
        super().__init__()
        self.norm1 = nn.LayerNorm(a.dim, elementwise_affine=False, eps=a.eps)
        self.attn = SelfAttention(a.dim, a.heads, a.qk_norm, a.eps)
        if a.cross_attention:
            self.norm2 = nn.LayerNorm(a.dim, eps=a.eps)
            self.cross_attn = CrossAttention(a.dim, a.heads, a.qk_norm, a.eps)
        self.norm3 = nn.LayerNorm(a.dim, elementwise_affine=False, eps=a.eps)
        self.mlp = Mlp(a.dim, int(a.dim * a.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(a.dim, 6 * a.dim, init="zeros"))  # adaLN-Zero

    def forward(self, x, c, sample_of_token, rope, attention, self_mask, text, cross_attention, cross_mask):
        # x [B,S,D]; c [B,M,D] per-sample conditioning; sample_of_token [B,S] index into M
        mod = to_tokens(self.adaLN_modulation(c), sample_of_token)  # computed per sample, then broadcast: [B,S,6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, -1)
        x = x + gate_msa * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope, attention, self_mask)
        if text is not None:
            x = x + self.cross_attn(self.norm2(x), text, cross_attention, cross_mask)
        return x + gate_mlp * self.mlp(modulate(self.norm3(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, a: DiTArgs):
        super().__init__()
        self.norm_final = nn.LayerNorm(a.dim, elementwise_affine=False, eps=a.eps)
        self.linear = Linear(a.dim, a.patch_dim, init="zeros")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(a.dim, 2 * a.dim, init="zeros"))

    def forward(self, x, c, sample_of_token):
        shift, scale = to_tokens(self.adaLN_modulation(c), sample_of_token).chunk(2, -1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    def __init__(self, args: DiTArgs):
        super().__init__()
        args.validate()
        self.args = args
        self.x_embedder = Linear(args.patch_dim, args.dim)
        self.t_embedder = TimestepEmbedder(args.dim, args.freq_dim)
        if args.cross_attention:
            self.y_embedder = nn.Sequential(Linear(args.text_dim, args.dim), nn.GELU(approximate="tanh"),
                                            Linear(args.dim, args.dim))
            if args.pooled_text:
                self.pooled_embedder = nn.Sequential(Linear(args.text_dim, args.dim), nn.SiLU(),
                                                     Linear(args.dim, args.dim))
        self.rope = RoPE3D(args.dim // args.heads, args.rope_theta)
        if args.frac_pos:
            self.pos_embedder = FractionalPositions(args.dim, args.frac_pos_joint)
        self.blocks = nn.ModuleList(DiTBlock(args) for _ in range(args.depth))
        self.final_layer = FinalLayer(args)
        # Swappable from outside: Ulysses wraps `attention`; cross-attention always stays local.
        self.attention = build_attention(args.attention, args.max_segments)
        self.cross_attention = build_attention("sdpa" if args.attention == "flex" else args.attention,
                                               args.max_segments)

    def forward(self, x, t, pos, seg, text=None, text_seg=None, extent=None, given=None,
                route: RouteLayout | None = None):
        """x [B,S,patch_dim] noisy patches; t [B,M] per-sample time in [0,1]; pos [B,S,3]; seg [B,S]
        (0 = padding); text [B,L,text_dim], text_seg [B,L]; extent [B,S,3]: the grid of each token's
        sample (needed with frac_pos); given [B,S] bool: tokens given clean (conditioning frames); route: the
        tokens that run args.route's span of blocks (training; None: every token runs every block).
        Returns [B,S,patch_dim]."""
        h = self.x_embedder(x)  # [B,S,D]
        if self.args.frac_pos:
            if extent is None:
                raise ValueError("model.frac_pos needs extent (each token's sample grid, PackedBatch.extent)")
            h = h + self.pos_embedder(pos, extent)
        M = t.shape[1]
        sample_of_token = (seg - 1).clamp(min=0)  # [B,S]
        if given is not None:
            # Frame conditioning: a sample's given tokens read a second conditioning slot, M + its own, whose time
            # is 0 (clean). adaLN stays per slot (2M slots, not one per token); attention is still per sample.
            t = torch.cat([t, torch.zeros_like(t)], 1)  # [B,2M]
            sample_of_token = sample_of_token + M * given.long()
        c = self.t_embedder(t)  # [B,M,D] (or [B,2M,D])
        rope = self.rope.freqs(pos)  # cos, sin [B,S,1,hd/2,2]
        self_mask = self.attention.prepare(seg, seg)
        txt, cross_mask = None, None
        if self.args.cross_attention:
            txt = self.y_embedder(text)  # [B,L,D]
            cross_mask = self.cross_attention.prepare(seg, text_seg)
            if self.args.pooled_text:
                pooled = self.pooled_embedder(pool_segments(text, text_seg, M))  # [B,M,D]
                c = c + (pooled if given is None else torch.cat([pooled, pooled], 1))
        span = self.args.route.span(len(self.blocks)) if route is not None else range(-1, -1)  # no block is -1
        outer = None
        for i, block in enumerate(self.blocks):
            if i == span.start:  # the kept tokens only, with their own segment table for every backend
                outer = (h, sample_of_token, rope, self_mask, cross_mask)
                h, sample_of_token = gather_tokens(h, route.index), gather_tokens(sample_of_token, route.index)
                rope = gather_tokens(rope, route.index)
                self_mask = self.attention.prepare(route.seg, route.seg)
                if txt is not None:
                    cross_mask = self.cross_attention.prepare(route.seg, text_seg)
            h = block(h, c, sample_of_token, rope, self.attention, self_mask, txt, self.cross_attention, cross_mask)
            if i == span.stop - 1 and outer is not None:  # the routed tokens re-join as they left
                h = scatter_tokens(outer[0], h, route)
                _, sample_of_token, rope, self_mask, cross_mask = outer
        return self.final_layer(h, c, sample_of_token)  # [B,S,patch_dim]


def pool_segments(text: torch.Tensor, text_seg: torch.Tensor, slots: int) -> torch.Tensor:
    """Mean text state per sample slot: text [B,L,Dt], text_seg [B,L] (1..M) -> [B,M,Dt]."""
    onehot = (text_seg[..., None] == torch.arange(1, slots + 1, device=text_seg.device)).to(text.dtype)  # [B,L,M]
    sums = torch.einsum("blm,bld->bmd", onehot, text)
    return sums / onehot.sum(1).clamp(min=1)[..., None]


def count_params(args: DiTArgs) -> int:
    with torch.device("meta"):
        return sum(p.numel() for p in DiT(args).parameters())


def args_dict(args: DiTArgs) -> dict:
    d = asdict(args)
    d["patch_size"] = list(d["patch_size"])
    return d
