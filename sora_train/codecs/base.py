"""The one small interface every video codec (latent autoencoder) implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class CodecInfo:
    """What a shard manifest records about the codec, and what the trainer checks."""

    name: str
    latent_channels: int
    factors: tuple[int, int, int]  # (time, height, width) compression
    causal_time: bool  # latent frames = 1 + (T-1)/ft (video VAEs) instead of T/ft
    scaling_factor: float

    def latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.factors[0] if self.causal_time else frames // self.factors[0]

    def snap_frames(self, frames: int, latent_multiple: int = 1) -> int:
        """Largest frame count <= frames whose latent frame count is a multiple of latent_multiple."""
        lt = self.latent_frames(frames) // latent_multiple * latent_multiple
        if lt <= 0:
            return 0
        return 1 + (lt - 1) * self.factors[0] if self.causal_time else lt * self.factors[0]


class VideoCodec(ABC):
    """Pixels [B,3,T,H,W] in [-1,1] <-> scaled latents [B,C,T',H',W']."""

    info: CodecInfo

    @abstractmethod
    def encode(self, video: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def decode(self, latent: torch.Tensor) -> torch.Tensor: ...
