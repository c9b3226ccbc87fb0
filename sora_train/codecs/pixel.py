"""The built-in lossless codec: space-to-depth over (time, height, width).

It needs no weights, so the quickstart and the tests run anywhere, and its exact inverse makes
round-trip tests exact. Latent channels = 3 * ft * fh * fw.
"""

from __future__ import annotations

import torch

from .base import CodecInfo, VideoCodec


class PixelCodec(VideoCodec):
    def __init__(self, factors: tuple[int, int, int] = (1, 4, 4)):
        ft, fh, fw = (int(f) for f in factors)
        self.info = CodecInfo(f"pixel-{ft}x{fh}x{fw}", 3 * ft * fh * fw, (ft, fh, fw), False, 1.0)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = video.shape
        ft, fh, fw = self.info.factors
        x = video.reshape(b, c, t // ft, ft, h // fh, fh, w // fw, fw)
        return x.permute(0, 1, 3, 5, 7, 2, 4, 6).reshape(b, c * ft * fh * fw, t // ft, h // fh, w // fw)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        b, _, t, h, w = latent.shape
        ft, fh, fw = self.info.factors
        x = latent.reshape(b, 3, ft, fh, fw, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, 3, t * ft, h * fh, w * fw)
