"""Pretrained VAEs from diffusers, loaded from a local directory (no hub access).

- `ImageVAECodec`: an image `AutoencoderKL` (SD-style) applied frame by frame.
- `VideoVAECodec`: a video VAE class (AutoencoderKLWan, AutoencoderKLCogVideoX,
  AutoencoderKLHunyuanVideo, ...) applied to the whole clip.

Compression factors are measured by encoding a small probe once instead of read from each
class's own config keys, which differ between classes (and between diffusers releases).
"""

from __future__ import annotations

import torch

from .base import CodecInfo, VideoCodec


def _latent_scale(vae) -> tuple[torch.Tensor | float, torch.Tensor | float]:
    """(shift, scale) so that scaled = (z - shift) * scale, from whichever keys the config has."""
    cfg = vae.config
    if getattr(cfg, "latents_mean", None) is not None and getattr(cfg, "latents_std", None) is not None:
        mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
        std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
        return mean, 1.0 / std
    return float(getattr(cfg, "shift_factor", None) or 0.0), float(getattr(cfg, "scaling_factor", 1.0) or 1.0)


class _DiffusersCodec(VideoCodec):
    def __init__(self, vae, name: str, device: str | torch.device = "cpu", dtype=torch.float32):
        self.vae = vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), dtype
        self.shift, self.scale = _latent_scale(vae)
        self.info = self._probe(name)

    def _probe(self, name: str) -> CodecInfo:
        def shape(t):
            return self._encode_raw(torch.zeros(1, 3, t, 64, 64, device=self.device, dtype=self.dtype)).shape

        s9, s17 = shape(9), shape(17)
        ft = max(1, 8 // max(1, s17[2] - s9[2]))
        causal = ft > 1 and s9[2] == 1 + 8 // ft  # with ft = 1 both formulas agree: call it non-causal
        scale = self.scale if isinstance(self.scale, float) else float("nan")  # per-channel: recorded as nan
        return CodecInfo(name, s9[1], (ft, 64 // s9[3], 64 // s9[4]), causal, scale)

    @torch.no_grad()
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        z = self._encode_raw(video.to(self.device, self.dtype))
        return (z - _to(self.shift, z)) * _to(self.scale, z)

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        z = latent.to(self.device, self.dtype)
        return self._decode_raw(z / _to(self.scale, z) + _to(self.shift, z)).clamp(-1, 1)


def _to(v, like: torch.Tensor):
    return v.to(like) if isinstance(v, torch.Tensor) else v


class ImageVAECodec(_DiffusersCodec):
    """Per-frame image VAE: frames are folded into the batch dimension."""

    def __init__(self, path: str, device="cpu", dtype=torch.float32, subfolder: str | None = None):
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(path, subfolder=subfolder, local_files_only=True)
        super().__init__(vae, f"diffusers-image:{path}", device, dtype)

    def _encode_raw(self, video):
        b, c, t, h, w = video.shape
        z = self.vae.encode(video.transpose(1, 2).reshape(b * t, c, h, w)).latent_dist.mode()
        return z.reshape(b, t, *z.shape[1:]).transpose(1, 2)

    def _decode_raw(self, z):
        b, c, t, h, w = z.shape
        x = self.vae.decode(z.transpose(1, 2).reshape(b * t, c, h, w)).sample
        return x.reshape(b, t, *x.shape[1:]).transpose(1, 2)


class VideoVAECodec(_DiffusersCodec):
    def __init__(self, path: str, class_name: str = "AutoencoderKLWan", device="cpu", dtype=torch.float32,
                 subfolder: str | None = None):
        import diffusers

        cls = getattr(diffusers, class_name, None)
        if cls is None:
            raise ValueError(f"diffusers has no VAE class {class_name!r} (diffusers {diffusers.__version__})")
        vae = cls.from_pretrained(path, subfolder=subfolder, local_files_only=True)
        super().__init__(vae, f"diffusers-video:{class_name}:{path}", device, dtype)

    def _encode_raw(self, video):
        return self.vae.encode(video).latent_dist.mode()

    def _decode_raw(self, z):
        return self.vae.decode(z).sample
