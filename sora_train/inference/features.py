"""Feature networks for FVD, FID and CLIPScore, each from a local file or folder (nothing is downloaded), each
with the frame sampling and resizing of a named protocol (PROTOCOLS; the report prints them).

- FVD: an I3D network saved as TorchScript (StyleGAN-V's `i3d_torchscript.pt`, the file most FVD code loads), or a
  transformers video model folder (VideoMAE, TimeSformer, ViViT).
- FID: a torchvision Inception-v3 state dict (.pth / .safetensors), or a transformers image model folder (CLIP's
  image tower, ViT, DINOv2, SigLIP, ...).
- CLIPScore: a transformers CLIP model folder with its tokenizer.

Every network takes uint8 videos [T,H,W,3] (a list, any sizes) and returns float32 features [N,D] on the CPU.
A network that is missing, of the wrong kind or does not take the protocol's input is refused in one line naming
the path (MetricNetworkError), before any sample is generated."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

I3D_FRAMES, I3D_SIZE = 16, 224
FID_FRAMES = 4  # frames per clip, evenly spaced, each one sample of the image distribution
CLIP_FRAMES = 4  # frames per clip whose CLIPScores are averaged
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
VIDEO_MODELS = ("videomae", "timesformer", "vivit")
BATCH = 8  # clips per feature-network call

PROTOCOLS = {
    "fvd_i3d": f"StyleGAN-V (Skorokhodov et al. 2022) via fvd-comparison: the first {I3D_FRAMES} frames of each clip "
               f"(a shorter clip's frames repeated evenly to {I3D_FRAMES}), shorter side resized to {I3D_SIZE} "
               f"(bilinear), centre {I3D_SIZE}x{I3D_SIZE} crop, values in [-1,1], I3D features before the logits "
               "(rescale=False, resize=False, return_features=True)",
    "fvd_transformers": "the model's own num_frames from each clip's start (repeated evenly when shorter), shorter "
                        "side resized to its image_size (bilinear), centre crop, its processor's mean/std (ImageNet's "
                        "without one), the mean of the last hidden states",
    "fid_inception": f"{FID_FRAMES} evenly spaced frames per clip, resized to 299x299 (bilinear), values in [-1,1], "
                     "torchvision Inception-v3's 2048-d pool features (pytorch-fid's FID Inception weights differ "
                     "from torchvision's: compare FIDs only across runs of the same network file)",
    "fid_transformers": f"{FID_FRAMES} evenly spaced frames per clip, shorter side resized to the model's image_size "
                        "(bicubic), centre crop, its processor's mean/std, the pooled output (CLIP: the image "
                        "embedding; else the mean of the last hidden states)",
    "clipscore": f"Hessel et al. 2021 without the 2.5 weight (as torchmetrics): 100 * max(cos(image, caption), 0) "
                 f"averaged over {CLIP_FRAMES} evenly spaced frames per clip, then over clips; shorter side resized "
                 "to the image size (bicubic), centre crop, CLIP's mean/std; captions cut at the text tower's length",
}


class MetricNetworkError(ValueError):
    """A feature network that cannot be used: the message names the key and the path."""


def first_frames(video: np.ndarray, n: int) -> np.ndarray:
    """The first n frames; a shorter clip's frames repeated evenly to n."""
    return video[:n] if len(video) >= n else video[np.linspace(0, len(video) - 1, n).round().astype(int)]


def spread_frames(video: np.ndarray, n: int) -> np.ndarray:
    """n frames evenly spaced over the clip (repeated where it has fewer)."""
    return video[np.linspace(0, len(video) - 1, n).round().astype(int)]


def resized(frames: np.ndarray, size: int | tuple[int, int], mode: str = "bilinear", crop: bool = True,
            antialias: bool = False) -> torch.Tensor:
    """uint8 [T,H,W,3] -> float [T,3,h,w] in [0,1]: shorter side to `size` and a centre crop (crop=True), or
    straight to (h, w) (crop=False)."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0
    if not crop:
        return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias).clamp(0, 1)
    h, w = x.shape[2:]
    s = size / min(h, w)
    x = F.interpolate(x, size=(max(size, round(h * s)), max(size, round(w * s))), mode=mode, align_corners=False,
                      antialias=antialias).clamp(0, 1)
    top, left = (x.shape[2] - size) // 2, (x.shape[3] - size) // 2
    return x[:, :, top : top + size, left : left + size]


def normalised(x: torch.Tensor, mean, std) -> torch.Tensor:
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def _exists(key: str, path: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise MetricNetworkError(f"{key}={path}: no such file or folder")
    return p


def _hf_config(key: str, path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise MetricNetworkError(f"{key}={path}: a folder without a config.json, not a transformers model")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise MetricNetworkError(f"{key}={path}: config.json is not JSON ({e})") from e


def _processor_stats(path: Path, mean, std) -> tuple[tuple, tuple]:
    """The image mean/std the model was trained with: its preprocessor_config.json's, else the given defaults."""
    f = path / "preprocessor_config.json"
    if f.is_file():
        p = json.loads(f.read_text())
        return tuple(p.get("image_mean", mean)), tuple(p.get("image_std", std))
    return mean, std


def _in_batches(videos: list[np.ndarray], fn) -> torch.Tensor:
    return torch.cat([fn(videos[i : i + BATCH]) for i in range(0, len(videos), BATCH)]).float().cpu()


class I3DTorchScript:
    """StyleGAN-V's I3D (or any TorchScript network with its call) -> 400-d features."""

    protocol, takes = "fvd_i3d", f"[N,3,{I3D_FRAMES},{I3D_SIZE},{I3D_SIZE}] in [-1,1], rescale/resize/return_features"

    def __init__(self, key: str, path: Path, device: torch.device):
        self.device, self.path = device, path
        try:
            self.net = torch.jit.load(str(path), map_location=device).eval()
        except (RuntimeError, ValueError) as e:
            raise MetricNetworkError(f"{key}={path}: not a TorchScript file ({str(e).splitlines()[0]}); pass StyleGAN-"
                                     "V's i3d_torchscript.pt or a transformers video model folder") from e
        self.name = f"I3D TorchScript {path.name}"

    @torch.no_grad()
    def __call__(self, videos: list[np.ndarray]) -> torch.Tensor:
        def batch(vs):
            x = torch.stack([resized(first_frames(v, I3D_FRAMES), I3D_SIZE).permute(1, 0, 2, 3) for v in vs])
            return self.net((x * 2 - 1).to(self.device), rescale=False, resize=False, return_features=True)

        return _in_batches(videos, batch)


class TransformersVideo:
    """A transformers video model folder (VideoMAE, TimeSformer, ViViT) -> the mean of its last hidden states."""

    protocol, takes = "fvd_transformers", "pixel_values [N,num_frames,3,image_size,image_size]"

    def __init__(self, key: str, path: Path, device: torch.device):
        from transformers import AutoModel

        kind = _hf_config(key, path).get("model_type")
        if kind not in VIDEO_MODELS:
            raise MetricNetworkError(f"{key}={path}: a {kind!r} model, not a video model ({', '.join(VIDEO_MODELS)}); "
                                     "or pass an I3D TorchScript file")
        self.model = AutoModel.from_pretrained(str(path)).eval().to(device)
        c = self.model.config
        self.frames, self.size, self.device = c.num_frames, c.image_size, device
        self.mean, self.std = _processor_stats(path, IMAGENET_MEAN, IMAGENET_STD)
        self.name = f"{kind} {path.name}"

    @torch.no_grad()
    def __call__(self, videos: list[np.ndarray]) -> torch.Tensor:
        def batch(vs):
            x = torch.stack([normalised(resized(first_frames(v, self.frames), self.size), self.mean, self.std)
                             for v in vs])  # [B,T,3,s,s]
            return self.model(pixel_values=x.to(self.device)).last_hidden_state.mean(1)

        return _in_batches(videos, batch)


class InceptionStateDict:
    """A torchvision Inception-v3 state dict -> 2048-d pool features per frame."""

    protocol, takes = "fid_inception", "[N,3,299,299] in [-1,1]"

    def __init__(self, key: str, path: Path, device: torch.device):
        from torchvision.models import inception_v3

        state = _state_dict(key, path)
        net = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=False)
        if not any(k.startswith("AuxLogits.") for k in state):  # saved without the auxiliary head: not needed here
            net.AuxLogits = None
        try:
            net.load_state_dict(state, strict=True)
        except RuntimeError as e:
            lines = str(e).strip().splitlines()
            raise MetricNetworkError(f"{key}={path}: not a torchvision Inception-v3 state dict "
                                     f"({lines[min(1, len(lines) - 1)].strip()[:200]})") from e
        net.fc = torch.nn.Identity()
        self.net, self.device, self.name = net.eval().to(device), device, f"torchvision Inception-v3 {path.name}"

    @torch.no_grad()
    def __call__(self, videos: list[np.ndarray]) -> torch.Tensor:
        def batch(vs):
            x = torch.cat([resized(spread_frames(v, FID_FRAMES), (299, 299), crop=False) for v in vs])
            return self.net((x * 2 - 1).to(self.device)).reshape(len(vs), -1)  # [B, FID_FRAMES*2048]

        return _in_batches(videos, batch)


def _state_dict(key: str, path: Path) -> dict:
    if path.is_dir():
        raise MetricNetworkError(f"{key}={path}: a folder without a config.json; pass an Inception-v3 state dict file "
                                 "or a transformers image model folder")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickle, zip and safetensors each raise their own
        raise MetricNetworkError(f"{key}={path}: not a state dict ({str(e).strip().splitlines()[0][:200]})") from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetricNetworkError(f"{key}={path}: holds a {type(state).__name__}, not a state dict of tensors")
    return state


class TransformersImage:
    """A transformers image model folder -> pooled features per frame (CLIP: the image embedding)."""

    protocol, takes = "fid_transformers", "pixel_values [N,3,image_size,image_size]"

    def __init__(self, key: str, path: Path, device: torch.device):
        from transformers import AutoModel

        c = _hf_config(key, path)
        kind, vision = c.get("model_type"), c.get("vision_config") or c
        if "image_size" not in vision:
            raise MetricNetworkError(f"{key}={path}: a {kind!r} model, not an image model (no image_size); pass a "
                                     "transformers image model folder or an Inception-v3 state dict")
        self.model = AutoModel.from_pretrained(str(path)).eval().to(device)
        self.size, self.device, self.clip = vision["image_size"], device, hasattr(self.model, "get_image_features")
        self.mean, self.std = _processor_stats(path, CLIP_MEAN if self.clip else IMAGENET_MEAN,
                                               CLIP_STD if self.clip else IMAGENET_STD)
        self.name = f"{kind} {path.name}"

    @torch.no_grad()
    def __call__(self, videos: list[np.ndarray]) -> torch.Tensor:
        def batch(vs):
            x = torch.cat([normalised(resized(spread_frames(v, FID_FRAMES), self.size, "bicubic", antialias=True),
                                      self.mean, self.std) for v in vs]).to(self.device)
            if self.clip:
                f = _embedding(self.model.get_image_features(pixel_values=x))
            else:
                out = self.model(pixel_values=x)
                pooled = getattr(out, "pooler_output", None)
                f = pooled if pooled is not None else out.last_hidden_state.mean(1)
            return f.reshape(len(vs), -1)

        return _in_batches(videos, batch)


def _embedding(out) -> torch.Tensor:
    """get_*_features returns a tensor, or (transformers 5) an output whose pooler_output is the embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScorer:
    """CLIPScore of videos against their captions with a transformers CLIP model: [N] scores in [0, 100]."""

    protocol, takes = "clipscore", "pixel_values [N,3,image_size,image_size] and captions"

    def __init__(self, key: str, path: Path, device: torch.device):
        from transformers import AutoTokenizer, CLIPModel

        kind = _hf_config(key, path).get("model_type")
        if kind != "clip":
            raise MetricNetworkError(f"{key}={path}: a {kind!r} model, not a CLIP model (model_type 'clip')")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as e:
            raise MetricNetworkError(f"{key}={path}: no tokenizer there ({str(e).splitlines()[0][:200]})") from e
        self.model = CLIPModel.from_pretrained(str(path)).eval().to(device)
        self.size, self.device = self.model.config.vision_config.image_size, device
        self.max_length = self.model.config.text_config.max_position_embeddings
        self.mean, self.std = _processor_stats(path, CLIP_MEAN, CLIP_STD)
        self.name = f"CLIP {path.name}"

    @torch.no_grad()
    def image_embeddings(self, frames: torch.Tensor) -> torch.Tensor:
        """float [N,3,s,s] in [0,1] -> unit embeddings [N,E]."""
        x = normalised(frames, self.mean, self.std).to(self.device)
        return F.normalize(_embedding(self.model.get_image_features(pixel_values=x)).float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        tok = self.tokenizer(list(captions), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(self.device)
        return F.normalize(_embedding(self.model.get_text_features(**tok)).float(), dim=-1)

    def __call__(self, videos: list[np.ndarray], captions: list[str]) -> torch.Tensor:
        scores = []
        for i in range(0, len(videos), BATCH):
            vs, cs = videos[i : i + BATCH], captions[i : i + BATCH]
            frames = torch.cat([resized(spread_frames(v, CLIP_FRAMES), self.size, "bicubic", antialias=True)
                                for v in vs])
            image = self.image_embeddings(frames).view(len(vs), CLIP_FRAMES, -1)
            cos = (image * self.text_embeddings(cs)[:, None]).sum(-1)  # [B, CLIP_FRAMES]
            scores.append(100 * cos.clamp(min=0).mean(1))
        return torch.cat(scores).float().cpu()


def _quiet_loading() -> None:
    """No per-weight progress bars from transformers in a training log."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def video_network(key: str, path: str, device: torch.device):
    p = _exists(key, path)
    _quiet_loading()
    return TransformersVideo(key, p, device) if p.is_dir() else I3DTorchScript(key, p, device)


def image_network(key: str, path: str, device: torch.device):
    p = _exists(key, path)
    _quiet_loading()
    return TransformersImage(key, p, device) if (p / "config.json").is_file() else InceptionStateDict(key, p, device)


def clip_network(key: str, path: str, device: torch.device) -> ClipScorer:
    p = _exists(key, path)
    if not p.is_dir():
        raise MetricNetworkError(f"{key}={path}: a file; pass a transformers CLIP model folder")
    _quiet_loading()
    return ClipScorer(key, p, device)
