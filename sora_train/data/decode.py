"""Safe decoding and validation of one raw shard sample.

We decode the three members we know by hand instead of using webdataset's `decode()`: its
default handlers include pickle (".pyd", ".pickle"), and shards come from outside.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

import numpy as np


class BadSample(ValueError):
    """A sample that cannot be trained on; the message names the reason."""


@dataclass
class Clip:
    key: str
    latent: np.ndarray  # [C,T,H,W] float16
    text: np.ndarray  # [L,D] float16
    caption: str


def load_npy(data: bytes, name: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except ValueError as e:  # includes "Object arrays cannot be loaded when allow_pickle=False"
        raise BadSample(f"{name}: not a plain numeric npy ({e})") from e
    except Exception as e:  # a truncated/garbled member: numpy raises several types
        raise BadSample(f"{name}: unreadable npy ({type(e).__name__}: {e})") from e


def decode_clip(raw: dict, channels: int, text_width: int, patch: tuple[int, int, int], text_member: str = "text.npy",
                caption_member: str = "txt") -> Clip:
    """text_member / caption_member: which of the sample's captions (sora-encode --caption-keys) to read."""
    key = raw.get("__key__", "?")
    if "latent.npy" not in raw:
        raise BadSample("missing latent.npy")
    if text_member not in raw:
        raise BadSample(f"missing {text_member} (text-encoder states)")
    latent, text = load_npy(raw["latent.npy"], "latent.npy"), load_npy(raw[text_member], text_member)
    if latent.dtype.kind != "f" or text.dtype.kind != "f":
        raise BadSample(f"dtype latent={latent.dtype} text={text.dtype}, expected floating point")
    if latent.ndim != 4 or latent.shape[0] != channels:
        raise BadSample(f"latent shape {latent.shape}, expected (C={channels},T,H,W)")
    if any(s % p or s == 0 for s, p in zip(latent.shape[1:], patch)):
        raise BadSample(f"latent shape {latent.shape} not divisible by patch {patch}")
    if text.ndim != 2 or text.shape[1] != text_width or text.shape[0] == 0:
        raise BadSample(f"text shape {text.shape}, expected (L>0, {text_width})")
    if not (np.isfinite(latent).all() and np.isfinite(text).all()):
        raise BadSample("NaN/inf values")
    txt = raw.get(caption_member)
    caption = txt.decode("utf-8", "replace") if isinstance(txt, bytes) else str(txt or "")
    return Clip(key, latent.astype(np.float16, copy=False), text.astype(np.float16, copy=False), caption)


def decode_json(raw: dict) -> dict:
    return json.loads(raw["json"]) if "json" in raw else {}
