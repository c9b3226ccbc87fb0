"""Attention over packed rows, restricted by segment ids, behind one interface.

A backend is an AttentionBackend, a plain callable (it holds no parameters):
  prepare(seg_q [B,Sq], seg_k [B,Sk]) -> mask object   (once per forward, reused by every layer)
  forward(q [B,Sq,H,D], k [B,Sk,H,D], v [B,Sk,H,D], mask) -> [B,Sq,H,D]   (`mask` by that name:
  Ulysses passes it by keyword)
Query i may attend key j iff seg_q[i] == seg_k[j]. Outputs at padding queries (segment 0) are
never used and only guaranteed finite. On real tokens all backends compute the same function;
`naive` is the reference the tests compare against.
"""

from __future__ import annotations

import abc

import torch
import torch.nn.functional as F

from .packed_attention import packed_attention, sequences


def segment_mask(seg_q: torch.Tensor, seg_k: torch.Tensor) -> torch.Tensor:
    """Boolean [B,1,Sq,Sk]; rows with no allowed key are opened fully (padding only)."""
    m = seg_q[:, :, None] == seg_k[:, None, :]
    m = m | ~m.any(-1, keepdim=True)
    return m[:, None]


class AttentionBackend(abc.ABC):
    """What every backend (and the sequence-parallel wrappers, sora_train/parallel) derives from. Not an
    nn.Module on purpose: as a module of the DiT it was hooked by ZeRO-3 like every module, and those hooks,
    called from inside a compiled block, broke its graph at each attention and recompiled to dynamo's limit
    (measured; tests/test_distributed.py). A backend has no parameters or buffers for a module to carry."""

    def __call__(self, q, k, v, mask):
        return self.forward(q, k, v, mask)

    @abc.abstractmethod
    def prepare(self, seg_q: torch.Tensor, seg_k: torch.Tensor):
        """The mask object for query segments seg_q [B,Sq] and key segments seg_k [B,Sk]."""

    @abc.abstractmethod
    def forward(self, q, k, v, mask):
        """q [B,Sq,H,D], k and v [B,Sk,H,D], mask from prepare -> [B,Sq,H,D]."""


class NaiveAttention(AttentionBackend):
    def prepare(self, seg_q, seg_k):
        return segment_mask(seg_q, seg_k)

    def forward(self, q, k, v, mask):
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / q.shape[-1] ** 0.5
        scores = scores.float().masked_fill(~mask, float("-inf"))
        return torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1).to(v.dtype), v)


class SDPAAttention(AttentionBackend):
    """torch SDPA with a dense block-diagonal boolean mask: simple, O(S^2) mask memory."""

    def prepare(self, seg_q, seg_k):
        return segment_mask(seg_q, seg_k)

    def forward(self, q, k, v, mask):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
        return out.transpose(1, 2)


class FlexAttention(AttentionBackend):
    """flex_attention with a block mask: skips fully masked blocks. GPU path (backward is CUDA-only)."""

    # Inductor's CUDA flex kernel: "NYI: embedding dimension of the query, key, and value must be at least 16"
    # (torch 2.11 on an H200, at the tiny preset's 12)
    MIN_HEAD_DIM_CUDA = 16

    def __init__(self, compile: bool = True):
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
        if q.is_cuda and q.shape[-1] < self.MIN_HEAD_DIM_CUDA:
            raise ValueError(f"flex attention on CUDA needs a head dim of at least {self.MIN_HEAD_DIM_CUDA}, not "
                             f"{q.shape[-1]}: use varlen")
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


def segment_order(seg: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Where a row's tokens are not one run per segment in ascending order with padding last (a routed span's
    rows under sequence parallelism: models/routing.py), the permutation of the flattened [B*S] tokens that makes
    them so (stable: a segment's tokens keep their order) and its inverse; None where every row already is."""
    key = torch.where(seg > 0, seg, torch.iinfo(seg.dtype).max)
    if bool((key[:, 1:] >= key[:, :-1]).all()):
        return None
    B, S = seg.shape
    order = (torch.argsort(key, dim=1, stable=True) + torch.arange(B, device=seg.device)[:, None] * S).flatten()
    return order, torch.argsort(order)


class VarlenAttention(AttentionBackend):
    """Attention over the packed rows as one batch of variable-length sequences (cu_seqlens): no
    masked work at all. Kernel, best first: flash-attn's `flash_attn_varlen_func` (the optional CUDA
    extra); torch's own `varlen_attn` (the same flash kernel, shipped with torch >= 2.10, CUDA only,
    so the extra is no longer needed for this path); else SDPA one sequence at a time, which on CPU
    still beats a dense S x S mask. `kernel` says which one a CUDA bf16/fp16 call takes; naming it
    (`varlen:sdpa`, say) forces one, to compare them.

    Unless a kernel is named, rows whose samples average LONG_SAMPLE_TOKENS or more go one sequence
    at a time through SDPA even on CUDA: torch dispatches those to cuDNN's Hopper attention, which on
    an H200 beat the varlen kernel by 36-47% on the 1B preset's 64k-token rows (6 samples of 5-19k
    tokens) but lost by 11-14% at samples of ~4k and by 2.5-3.3x at ~1k and ~256 (per-call overhead);
    docs/performance.md has the table and commands."""

    KERNELS = {"flash_attn": "flash_attn", "torch_varlen": "torch_varlen", "sdpa": "sdpa_per_sequence"}  # config: label
    LONG_SAMPLE_TOKENS = 8192  # between the two measured points above (4k: varlen wins; ~11k: SDPA wins)

    def __init__(self, max_segments: int = 64, kernel: str | None = None):
        self.max_segments = max_segments
        try:
            from flash_attn import flash_attn_varlen_func
        except ImportError:
            flash_attn_varlen_func = None
        try:
            from torch.nn.attention.varlen import varlen_attn
        except ImportError:
            varlen_attn = None
        self._flash, self._torch_varlen = flash_attn_varlen_func, varlen_attn
        if self._flash is not None:
            # flash-attn's package is left out of compiled graphs (not measured traced): a compiled block with it
            # breaks its graph here, and a checkpointed one runs eager. Applied here, not as a decorator: that
            # imports torch._dynamo (1.4 s of every process's start on 2 cores) where nothing compiles.
            self._flash_attn_varlen = torch.compiler.disable(self._flash_attn_varlen)
        self.kernel = "flash_attn" if self._flash else "torch_varlen" if self._torch_varlen else "sdpa_per_sequence"
        if kernel is not None:
            if kernel not in self.KERNELS:
                raise ValueError(f"unknown varlen kernel {kernel!r}; use one of {tuple(self.KERNELS)}")
            if {"flash_attn": self._flash, "torch_varlen": self._torch_varlen}.get(kernel, True) is None:
                raise ValueError(f"varlen kernel {kernel!r} is not installed here")
            self.kernel = self.KERNELS[kernel]
        self.named = kernel is not None

    @staticmethod
    def flash_takes(head_dim: int) -> bool:
        """Both fused kernels are flash-attention's, which takes head dims that are multiples of 8 up to 256
        (torch's refuses others: "head_size must be a multiple of 8", seen on an H200 at the tiny preset's 12)."""
        return head_dim % 8 == 0 and head_dim <= 256

    def kernel_for(self, device: torch.device, dtype: torch.dtype, mask: dict | None = None,
                   head_dim: int | None = None) -> str:
        """The kernel a call on this device and dtype takes (given its prepared mask and head dim, if known).
        A fused kernel named in the config but unable to take the head dim is an error, not a fallback."""
        fused = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
        if fused and head_dim is not None and not self.flash_takes(head_dim):
            if self.named and self.kernel != "sdpa_per_sequence":
                raise ValueError(f"varlen kernel {self.kernel!r} (flash attention) needs a head dim that is a "
                                 f"multiple of 8 and at most 256, not {head_dim}: use varlen or varlen:sdpa")
            fused = False
        return self.kernel if fused and not (mask and mask["one_at_a_time"]) else "sdpa_per_sequence"

    def prepare(self, seg_q, seg_k):
        lq, lk = varlen_lengths(seg_q, seg_k, self.max_segments)
        cu = lambda n: F.pad(n.cumsum(0), (1, 0)).to(torch.int32)  # noqa: E731
        # lengths: on the CPU (one transfer here), read by the per-sequence paths without waiting for the GPU
        lengths = torch.stack([lq, lk]).cpu()
        samples = lengths[0].view(seg_q.shape[0], -1)[:, :-1]  # the last run of each row is its padding
        mean_tokens = float(samples.sum() / (samples > 0).sum().clamp(min=1))
        max_q, max_k = lengths.max(1).values.tolist()
        return {"lengths": lengths, "cu_q": cu(lq), "cu_k": cu(lk), "max_q": max_q, "max_k": max_k,
                "one_at_a_time": not self.named and mean_tokens >= self.LONG_SAMPLE_TOKENS,
                "order_q": segment_order(seg_q), "order_k": segment_order(seg_k)}

    def forward(self, q, k, v, mask):
        B, Sq, H, D = q.shape
        qf, kf, vf = q.reshape(-1, H, D), k.reshape(-1, H, D), v.reshape(-1, H, D)
        if mask.get("order_q") is not None or mask.get("order_k") is not None:  # rows in runs: sorted, attended, back
            order_q, order_k = mask["order_q"], mask["order_k"]
            if order_q is not None:
                qf = qf[order_q[0]]
            if order_k is not None:
                kf, vf = kf[order_k[0]], vf[order_k[0]]
            out = self._attend(qf, kf, vf, mask, q.device, q.dtype, D)
            return (out if order_q is None else out[order_q[1]]).reshape(B, Sq, H, D)
        return self._attend(qf, kf, vf, mask, q.device, q.dtype, D).reshape(B, Sq, H, D)

    def _attend(self, qf, kf, vf, mask, device, dtype, D):
        kernel = self.kernel_for(device, dtype, mask, D)
        if kernel == "flash_attn":
            return self._flash_attn_varlen(qf, kf, vf, mask)
        if kernel == "torch_varlen":  # a custom op of torch's: one node in a compiled graph
            return self._torch_varlen(qf, kf, vf, mask["cu_q"], mask["cu_k"], mask["max_q"], mask["max_k"])
        if torch.compiler.is_compiling():
            # Traced, the loop below would specialise the graph on the row's lengths (a recompile per packed
            # layout); the op is one node whatever the layout (models/packed_attention.py).
            return packed_attention(qf, kf, vf, mask["lengths"])[0]
        return self._sdpa_per_sequence(qf, kf, vf, mask)  # eager: SDPA's own autograd, every measured eager row's

    def _flash_attn_varlen(self, qf, kf, vf, mask):
        return self._flash(qf, kf, vf, mask["cu_q"], mask["cu_k"], mask["max_q"], mask["max_k"])

    @staticmethod
    def _sdpa_per_sequence(qf, kf, vf, mask):
        outs = []
        for sq, sk in sequences(mask["lengths"]):
            if sk.stop > sk.start:
                o = F.scaled_dot_product_attention(*(t.transpose(0, 1)[None] for t in (qf[sq], kf[sk], vf[sk])))
                outs.append(o[0].transpose(0, 1))
            else:  # padding queries with no padding keys: output unused, keep it finite
                outs.append(torch.zeros_like(qf[sq]))
        return torch.cat(outs)


def build_attention(name: str, max_segments: int = 64) -> AttentionBackend:
    if name == "naive":
        return NaiveAttention()
    if name == "sdpa":
        return SDPAAttention()
    if name == "flex":
        return FlexAttention()
    if name in ("varlen", "flash"):
        return VarlenAttention(max_segments)
    if name.startswith("varlen:"):  # varlen with a named kernel: varlen:flash_attn, varlen:torch_varlen, varlen:sdpa
        return VarlenAttention(max_segments, name.split(":", 1)[1])
    raise ValueError(f"unknown attention backend {name!r}; use sdpa, flex, varlen (flash-attn) or naive, "
                     f"or one of {VARLEN_KERNELS}")


VARLEN_KERNELS = tuple(f"varlen:{k}" for k in VarlenAttention.KERNELS)
