"""One way from weights to videos, for sora-sample, sora-eval, the probe and samples during training: the DiT (as
a full-rows forward), its diffusion objective, and the text encoder and codec the data was encoded with (named in
the dataset manifest; each built once, at first use)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np
import torch

from ..codecs import codec_from_manifest_name
from ..config import model_args, saved_model_config
from ..diffusion import DDPMConfig, DiffusionConfig, FlowConfig, build_objective, check_sampler
from ..diffusion.conditioning import KINDS
from ..models import DiT, DiTArgs
from .export import SavedWeights
from .generate import Edit, GivenFrames, generate_latents, latent_grid, to_frames


def resolve_device(name: str) -> torch.device:
    """auto: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() and name != "cpu" else "cpu")


def load_model(path: str | Path, use_ema: bool = True) -> tuple[DiT, dict]:
    """An export dir or a checkpoint (a step dir or a checkpoints dir: its latest) -> the DiT in eval mode, its meta.
    use_ema: the EMA weights where there are any."""
    saved = SavedWeights.find(path)
    state = saved.ema() if use_ema and saved.has_ema else saved.model()
    model = DiT(model_args(saved_model_config(saved.meta["config"]["model"])))
    model.load_state_dict(state, strict=True)
    return model.eval(), saved.meta


def diffusion_from_meta(meta: dict) -> DiffusionConfig:
    d = meta["config"]["diffusion"]
    return DiffusionConfig(kind=d["kind"], flow=FlowConfig(**d["flow"]), ddpm=DDPMConfig(**d["ddpm"]),
                           sampler=d["sampler"], steps=d["steps"], guidance=d["guidance"])


@dataclass
class Pipeline:
    forward: Callable[..., torch.Tensor]  # full rows in, full rows out (fp32)
    args: DiTArgs
    diffusion: DiffusionConfig
    manifest: dict  # the dataset's: names the text encoder and the codec
    device: torch.device
    text_encoder_name: str | None = None  # instead of the manifest's (a local HF dir)
    sp: int = 1  # the sequence-parallel degree the forward shards over: rows are padded to a multiple of it
    meta: dict = field(default_factory=dict)  # the checkpoint's
    model: torch.nn.Module | None = None  # the DiT behind `forward`, when that is one module on one device
    _warned_given: bool = field(default=False, repr=False)

    def __post_init__(self):
        if not self.text_encoder_name and "text_encoder" not in self.manifest:
            raise ValueError("the checkpoint names no dataset manifest: set text_encoder=<local HF dir>")
        if "codec" not in self.manifest:
            raise ValueError("the checkpoint names no dataset manifest, so no codec to decode latents with")

    @cached_property
    def encoder(self):
        from ..codecs.text import text_encoder_named  # transformers: imported only when prompts are encoded

        if self.text_encoder_name:
            return text_encoder_named(self.text_encoder_name, device=self.device)
        # Prompts cut where the captions were (datasets from before the option: 64 tokens).
        spec = self.manifest["text_encoder"]
        return text_encoder_named(spec["name"], device=self.device, max_length=spec.get("max_length", 64))

    @cached_property
    def codec(self):
        return codec_from_manifest_name(self.manifest["codec"]["name"], device=str(self.device))

    @cached_property
    def objective(self):
        return build_objective(self.diffusion)

    def sampler(self, name: str | None) -> str:
        """The sampler to use (default: the checkpoint's), refused before any work if the objective lacks it."""
        name = name or self.diffusion.sampler
        check_sampler(self.diffusion.kind, name)
        return name

    def generate(self, prompts: list[str], frames: int, height: int, width: int, steps: int, guidance: float,
                 sampler: str | None = None, seed: int | list[int] = 0, given: GivenFrames | None = None,
                 edit: Edit | None = None, loop: bool = False) -> list[np.ndarray]:
        """prompts -> uint8 videos [T,H,W,3]; given: latent frames kept as given (see given_frames); edit: a clip
        re-prompted (see edit); loop: the end leads into the start; seed: one for the batch, or one per prompt."""
        sampler = self.sampler(sampler)
        a = self.args
        grid = latent_grid(self.codec, a.patch_size, frames, height, width)
        if loop and grid[0] < 2:
            raise ValueError(f"loop=true: {frames} frame(s) make {grid[0]} latent frame; a loop needs at least 2")
        latents = generate_latents(self.forward, self.objective, self.encoder.encode(list(prompts)), grid, a.patch_size,
                                   a.in_channels, a.text_dim, steps, guidance, sampler, seed, self.device, self.sp,
                                   given, edit, loop)
        return [to_frames(self.codec, z) for z in latents]

    def edit(self, clip: np.ndarray, frames: int, height: int, width: int, strength: float) -> Edit:
        """A clip (uint8 [T,H,W,3]) to re-prompt: its first `frames` frames at the output's size (resized to cover
        it, centre-cropped, as image= is), through the checkpoint's codec."""
        Edit(torch.empty(0), strength).start(1)  # strength checked before any frame is encoded
        grid = latent_grid(self.codec, self.args.patch_size, frames, height, width)
        if len(clip) < frames:
            fits = self.codec.info.snap_frames(len(clip), self.args.patch_size[0])
            raise ValueError(f"the clip to edit has {len(clip)} frame(s), fewer than frames={frames}"
                             + (f": ask for frames={fits}" if fits else ": it is shorter than one latent frame"))
        z = self.encode_frames(clip[:frames], height, width)
        if z.shape[1] != grid[0] * self.args.patch_size[0]:
            fits = self.codec.info.snap_frames(frames, self.args.patch_size[0])
            raise ValueError(f"frames={frames} encode to {z.shape[1]} latent frames, not {grid[0]} patches of "
                             f"{self.args.patch_size[0]}: ask for frames={fits}")
        return Edit(z, strength)

    def encode_frames(self, frames: np.ndarray, height: int, width: int) -> torch.Tensor:
        """uint8 [T,H,W,3] (an image is T=1) -> latent [C,T',H',W'] at the output's size (resized to cover it,
        centre-cropped), through the checkpoint's codec."""
        from .metrics import fit

        video = torch.tensor(fit(frames, height, width)).permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3,T,H,W]
        return self.codec.encode(video[None].to(self.device))[0].cpu()

    def warn_if_not_trained_for_given_frames(self) -> None:
        """Once per pipeline: frames can be given to any checkpoint (they are kept exactly), but one trained without
        frame conditioning (every diffusion.condition share 0) never learnt to continue them."""
        condition = self.meta.get("config", {}).get("diffusion", {}).get("condition", {})
        if self.meta and not any(condition.get(kind, 0) for kind in KINDS) and not self._warned_given:
            self._warned_given = True
            print("warning: this checkpoint was trained without frame conditioning (every diffusion.condition share "
                  "is 0): the given frames are kept, but the model was not trained to continue them; train with "
                  "e.g. diffusion.condition.first=0.2 for image-to-video", file=sys.stderr, flush=True)

    def given_frames(self, frames: int, height: int, width: int, first: np.ndarray | None = None,
                     last: np.ndarray | None = None) -> GivenFrames:
        """Frames kept as given: `first` (an image or clip, uint8 [T,H,W,3]) opens the output, `last` closes it
        (image-to-video: first=image; extension forwards: first=the video's end; backwards: last=its start;
        interpolation: both)."""
        self.warn_if_not_trained_for_given_frames()
        grid = latent_grid(self.codec, self.args.patch_size, frames, height, width)
        pt, parts, at = self.args.patch_size[0], [], []
        for clip, end in ((first, False), (last, True)):
            if clip is None:
                continue
            z = self.encode_frames(clip, height, width)
            z = z[:, : z.shape[1] // pt * pt]
            n = z.shape[1] // pt
            if n == 0 or n >= grid[0]:
                raise ValueError(f"{len(clip)} given frame(s) make {n} latent frame(s); the output has {grid[0]}: "
                                 f"give fewer frames or ask for more")
            at += [grid[0] - n + i if end else i for i in range(n)]
            parts.append(z)
        if len(set(at)) < len(at):
            raise ValueError("the first and last given frames overlap: ask for more frames")
        return GivenFrames(torch.cat(parts, 1), at)


def load_pipeline(checkpoint: str | Path, use_ema: bool = True, device: str | torch.device = "auto",
                  text_encoder: str | None = None) -> Pipeline:
    """A checkpoint or an export -> a Pipeline on one device (auto: the GPU when there is one)."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    model, meta = load_model(checkpoint, use_ema)
    model.to(device)
    return Pipeline(model, model.args, diffusion_from_meta(meta), meta.get("manifest") or {}, device, text_encoder,
                    meta=meta, model=model)
