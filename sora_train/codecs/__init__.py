"""Video codecs and text encoders, each behind one small interface, built by name."""

from __future__ import annotations

from .base import CodecInfo, VideoCodec
from .pixel import PixelCodec


def build_codec(kind: str = "pixel", path: str | None = None, factors=(1, 4, 4), class_name: str | None = None,
                device: str = "cpu") -> VideoCodec:
    """kind: pixel | image_vae | video_vae."""
    if kind == "pixel":
        return PixelCodec(tuple(factors))
    if path is None:
        raise ValueError(f"codec kind {kind!r} needs codec.path: a local diffusers VAE directory")
    from .diffusers_vae import ImageVAECodec, VideoVAECodec

    if kind == "image_vae":
        return ImageVAECodec(path, device=device)
    if kind == "video_vae":
        return VideoVAECodec(path, class_name or "AutoencoderKLWan", device=device)
    raise ValueError(f"unknown codec kind {kind!r}; use pixel, image_vae or video_vae")


def codec_from_manifest_name(name: str, device: str = "cpu") -> VideoCodec:
    """Rebuild the codec a manifest (or checkpoint config) names, for decoding samples."""
    if name.startswith("pixel-"):
        return PixelCodec(tuple(int(f) for f in name.removeprefix("pixel-").split("x")))
    if name.startswith("diffusers-image:"):
        return build_codec("image_vae", name.removeprefix("diffusers-image:"), device=device)
    if name.startswith("diffusers-video:"):
        class_name, path = name.removeprefix("diffusers-video:").split(":", 1)
        return build_codec("video_vae", path, class_name=class_name, device=device)
    raise ValueError(f"cannot rebuild codec {name!r}")


__all__ = ["CodecInfo", "VideoCodec", "PixelCodec", "build_codec", "codec_from_manifest_name"]
