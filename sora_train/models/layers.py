"""DiT building blocks, named as in the DiT paper (Peebles & Xie) where they come from there."""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import nn


class Linear(nn.Linear):
    """nn.Linear initialised as it is built: "xavier" (DiT's default), "zeros" (adaLN-Zero's modulation and the
    final projection: every residual branch and the output start closed) or "normal" (std 0.02, the timestep
    MLP). Each module initialises its own parameters because under ZeRO-3's `deepspeed.zero.Init` a module's
    parameters are partitioned as soon as its own __init__ returns: an init over the whole tree afterwards
    would write into empty placeholders. Biases start at zero."""

    def __init__(self, in_features: int, out_features: int, init: str = "xavier"):
        if init not in ("xavier", "zeros", "normal"):
            raise ValueError(f"Linear init {init!r}: use xavier, zeros or normal")
        object.__setattr__(self, "init", init)  # read by reset_parameters, which nn.Linear.__init__ calls
        super().__init__(in_features, out_features)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        if self.init == "xavier":
            nn.init.xavier_uniform_(self.weight)
        elif self.init == "normal":
            nn.init.normal_(self.weight, std=0.02)
        else:
            nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    """Scalar t in [0,1] -> sinusoidal features of 1000*t -> MLP -> [.., dim]."""

    def __init__(self, dim: int, freq_dim: int = 256):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(Linear(freq_dim, dim, init="normal"), nn.SiLU(), Linear(dim, dim, init="normal"))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        args = (t.float() * 1000.0)[..., None] * freqs
        emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class FractionalPositions(nn.Module):
    """NaViT's factorised fractional position embedding (Dehghani et al. 2023): each token's place
    as a fraction of its own sample's extent per axis (t, h, w), as Fourier features -> Linear.
    RoPE alone is relative; this tells a token where it is in *its* clip (left edge, last frame)
    whatever the clip's resolution or duration.

    joint=True adds waves across axes, cos(pi (a t + b h + c w)) for integer a, b, c in [-2, 2] with at
    least two non-zero (56 waves). A moving object is a band along a space-time diagonal; per-axis
    waves can only express it as products that the blocks must first learn, joint waves put it within
    reach of the first linear layer (tests/test_model.py). On the quickstart this turned 700 steps
    without prompted motion into motion (docs/evaluation.md)."""

    FREQS = 8  # per axis: k * pi, k = 1..8

    def __init__(self, dim: int, joint: bool = False):
        super().__init__()
        self.register_buffer("waves", self.wave_vectors(joint), persistent=False)  # [F,3]
        self.proj = Linear(2 * len(self.waves), dim)

    @classmethod
    def wave_vectors(cls, joint: bool) -> torch.Tensor:
        """[F,3] wave vectors over (t, h, w) fractions: 3 x FREQS along the axes, then 56 joint ones."""
        k = torch.arange(1, cls.FREQS + 1, dtype=torch.float32) * math.pi
        waves = [torch.eye(3).repeat_interleave(cls.FREQS, 0) * k.repeat(3)[:, None]]
        if joint:  # one of each +-v pair (v and -v give the same sin/cos up to sign)
            lattice = [v for v in itertools.product(range(-2, 3), repeat=3)
                       if sum(x != 0 for x in v) >= 2 and v > tuple(-x for x in v)]
            waves.append(torch.tensor(lattice, dtype=torch.float32) * math.pi)
        return torch.cat(waves)

    @classmethod
    @functools.cache
    def num_waves(cls, joint: bool) -> int:
        """len(wave_vectors(joint)), for the FLOP count of every micro-batch without rebuilding them."""
        return len(cls.wave_vectors(joint))

    def features(self, pos: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
        """pos, extent [B,S,3] (extent = the sample's grid) -> [B,S,2F] sin and cos of each wave."""
        frac = (pos.float() + 0.5) / extent.float().clamp(min=1.0)  # in (0, 1): half-periods never wrap
        a = frac @ self.waves.float().T  # [B,S,F]; float32 even in a model cast whole to bf16 (module.to(dtype))
        return torch.cat([a.sin(), a.cos()], -1)

    def forward(self, pos: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
        return self.proj(self.features(pos, extent).to(self.proj.weight.dtype))  # [B,S,dim]


class RoPE3D(nn.Module):
    """Rotary embedding over (t,h,w): head_dim is split into three even parts, one per axis."""

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        d_hw = 2 * (head_dim // 6)
        self.dims = (head_dim - 2 * d_hw, d_hw, d_hw)
        self.theta = theta

    def freqs(self, pos: torch.Tensor) -> torch.Tensor:
        """pos [B,S,3] -> the rotations' cosines and sines [B,S,1,head_dim/2,2] (float32)."""
        angles = []
        for axis, d in enumerate(self.dims):
            inv = 1.0 / (self.theta ** (torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d))
            angles.append(pos[..., axis : axis + 1].float() * inv)
        a = torch.cat(angles, -1)[:, :, None]
        return torch.stack([a.cos(), a.sin()], -1)

    @staticmethod
    def rotate(x: torch.Tensor, rot: torch.Tensor) -> torch.Tensor:
        """x [B,S,H,D]: rotate consecutive pairs (x0,x1), (x2,x3), ... by rot's angles. Eager: one complex
        multiply (2.3x faster forward+backward on CPU than the real form's separate kernels). Compiled: the real
        form, because inductor generates no code for complex numbers: the multiply stays an eager kernel between
        two fp32 buffers, where the real form fuses with the norm before it and the cast after it into one pass."""
        pairs = x.float().unflatten(-1, (-1, 2))
        if torch.compiler.is_compiling():
            (x0, x1), (cos, sin) = pairs.unbind(-1), rot.unbind(-1)
            return torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).flatten(-2).to(x.dtype)
        rotated = torch.view_as_complex(pairs.contiguous()) * torch.view_as_complex(rot)
        return torch.view_as_real(rotated).flatten(-2).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim)

    def forward(self, x, rope, attention, mask):
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, self.head_dim)).unbind(2)  # [B,S,H,D] each
        q, k = RoPE3D.rotate(self.q_norm(q), rope), RoPE3D.rotate(self.k_norm(k), rope)
        return self.proj(attention(q, k, v, mask).flatten(2))  # [B,S,dim]


class CrossAttention(nn.Module):
    """Video tokens (queries) attend to the text states of their own sample only."""

    def __init__(self, dim: int, heads: int, qk_norm: bool = True, eps: float = 1e-6):
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = Linear(dim, dim)
        self.kv = Linear(dim, 2 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=eps) if qk_norm else nn.Identity()
        self.proj = Linear(dim, dim)

    def forward(self, x, text, attention, mask):
        q = self.q_norm(self.q(x).unflatten(-1, (self.heads, self.head_dim)))  # [B,S,H,D]
        k, v = self.kv(text).unflatten(-1, (2, self.heads, self.head_dim)).unbind(2)  # [B,L,H,D]
        return self.proj(attention(q, self.k_norm(k), v, mask).flatten(2))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = Linear(dim, hidden), nn.GELU(approximate="tanh"), Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
