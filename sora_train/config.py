"""Typed config schemas: the one source of defaults. conf/*.yaml holds presets; the CLI overrides.

Registered with Hydra's ConfigStore so that unknown keys and wrong types fail at composition,
before any process group or data work starts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

from .data.config import DataConfig
from .diffusion import DiffusionConfig
from .models import DiTArgs
from .parallel.deepspeed_config import ParallelConfig


@dataclass
class OptimConfig:
    # adamw | muon (DeepSpeed's Muon on hidden matrices, AdamW on the rest). Under ZeRO stages 1-3 Muon needs
    # grad_clip=0 (DeepSpeed clips the orthogonalised update), and the logged grad_norm is then DeepSpeed's,
    # the update's norm (measured at stage 3); at stage 0 it is the gradient's.
    name: str = "adamw"
    lr: float = 3e-4
    muon_lr: float = 0.02  # Muon's step on hidden matrices (its update is orthogonalised, so its scale differs)
    momentum: float = 0.95  # Muon
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    warmup_steps: int = 100
    decay: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1
    steps: int = 1000
    grad_clip: float = 1.0
    grad_accum: int = 1
    max_bad_steps: int = 5  # consecutive non-finite losses before the run stops


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # default: <out_dir>/checkpoints
    every: int = 500
    keep_last: int = 3
    resume: str = "auto"  # auto (latest in dir if any) | never | <path to a step directory>
    min_free_gb: float = 0.0  # refuse to start when the checkpoint disk has less room than this


@dataclass
class EMAConfig:
    decay: float = 0.999
    enabled: bool = True


@dataclass
class WandbConfig:
    mode: str = "offline"  # online | offline | disabled
    project: str = "sora_train"
    entity: Optional[str] = None
    name: Optional[str] = None


@dataclass
class MetricsConfig:
    """FVD, FID and CLIPScore against held-out real clips (inference/metrics.py): sora-eval task=metrics, and
    logging.metrics during training. Each network from a local path; a metric whose network is null is skipped."""

    fvd_network: Optional[str] = None  # StyleGAN-V's i3d_torchscript.pt, or a transformers video model folder
    fid_network: Optional[str] = None  # a torchvision Inception-v3 state dict, or a transformers image model folder
    clip_network: Optional[str] = None  # a transformers CLIP model folder (with its tokenizer)
    real: Optional[str] = None  # held-out shards or a captions.jsonl of videos; in training, default data.val
    clips: int = 256  # the first N usable clips of `real`, in order
    size: Optional[list[int]] = None  # [frames, height, width] for every sample; null: each clip's own
    batch: int = 8  # samples per generation call
    videos: int = 4  # in training: samples logged as videos beside the figures


@dataclass
class LoggingConfig:
    every: int = 10
    wandb: WandbConfig = field(default_factory=WandbConfig)
    sample_every: int = 0  # 0: only at the end
    sample_prompts: list[str] = field(default_factory=list)
    val_every: int = 0
    val_batches: int = 8
    # Validation loss also at these fixed noise levels (1 = pure noise), logged as val/loss_t<value>:
    # the averaged loss hides that the high-noise end, where layout and colour are decided, lags.
    val_timesteps: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    peak_tflops: Optional[float] = None  # device dense bf16 peak; default from a table of known devices
    sample_ids: bool = False  # write <out_dir>/sample_ids/dp<rank>.jsonl: which samples each step trained on
    # FVD/FID/CLIPScore of the EMA weights every N steps (0: never) on `metrics.clips` clips of metrics.real
    # (default data.val), generated over all ranks; logged as metrics/* with their cost (metrics/time_share).
    metrics_every: int = 0
    metrics: MetricsConfig = field(default_factory=MetricsConfig)


@dataclass
class InitConfig:
    """A new stage from another run (engine/init_from.py): its model and EMA weights, not its step or data."""

    path: Optional[str] = None  # a run's checkpoints dir (its latest), a step dir, or an export dir
    optimizer: bool = False  # also its optimizer state (a checkpoint saved on as many ranks, same optimizer)


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    seed: int = 0
    device: str = "auto"
    watchdog_s: float = 900.0  # no step finished in this long: dump stacks and abort (hang protection)
    deterministic: bool = False  # bit-identical steps on CUDA too (slower): engine/determinism.py
    model: DiTArgs = field(default_factory=DiTArgs)  # the model's own arguments are the schema
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init_from: InitConfig = field(default_factory=InitConfig)


@dataclass
class SampleConfig:
    checkpoint: str = MISSING  # a step directory, a run's checkpoints dir (-> latest), or an export dir
    prompts: list[str] = field(default_factory=lambda: ["a red heart beating on a black background"])
    out_dir: str = "samples"
    frames: int = 8  # latent frames
    height: int = 48  # pixels
    width: int = 48
    steps: int = 30
    guidance: float = 4.0
    sampler: Optional[str] = None  # default: the checkpoint's diffusion.sampler
    seed: int = 0
    fps: int = 8
    use_ema: bool = True
    device: str = "auto"
    text_encoder: Optional[str] = None  # default: the one named in the checkpoint's dataset manifest
    # Prompting with images and videos (the model must be trained with diffusion.condition): the given frames are
    # kept exactly and are part of the output, so the seam can be watched.
    image: Optional[str] = None  # a still to animate: the output's first frame
    video: Optional[str] = None  # a clip to continue (extend=forward) or to lead into (extend=backward), or to edit
    # Video-to-video editing (SDEdit): video= re-prompted, its first `frames` frames noised to where the last
    # `strength` of the sampling run starts (0 < strength <= 1; 1: from noise, text-to-video)
    strength: Optional[float] = None
    loop: bool = False  # the output's end leads back into its start (it can play forever)
    extend: str = "forward"  # forward | backward
    context_frames: int = 4  # frames of `video` given (its last ones forwards, its first ones backwards)
    first: Optional[str] = None  # connect two clips: `first` (image or video: its last frame) opens the output,
    last: Optional[str] = None  # `last` (its first frame) closes it
    upsample: Optional[str] = None  # a local language model that rewrites each prompt in the captions' detailed style
    upsample_max_new_tokens: int = 160


@dataclass
class EvalConfig:
    checkpoint: str = MISSING
    out_dir: str = "eval"
    frames: int = 8
    height: int = 32
    width: int = 32
    steps: int = 30
    guidance: list[float] = field(default_factory=lambda: [1.0, 4.0])
    sampler: Optional[str] = None  # default: the checkpoint's diffusion.sampler
    per_pair: int = 2  # motions per (colour, shape) pair
    seed: int = 0
    use_ema: bool = True
    untrained: bool = False
    device: str = "auto"  # auto: the GPU when there is one
    # t2v: from the prompt alone; i2v: from the prompt and the first frame of the synthetic world's own clip;
    # extend: from its first half (frames // 2). i2v/extend report the seam and the text-only scores beside.
    # edit: each prompt's own clip re-prompted with one attribute changed (colour, background or shape, in turn),
    # at each of `strength`; loop: loop=true samples' wrap seam next to plain samples'. metrics: FVD, FID and
    # CLIPScore on held-out real clips (metrics.real, metrics.*_network), with the real set's halves as the floor.
    task: str = "t2v"
    strength: list[float] = field(default_factory=lambda: [0.4, 0.6, 0.8, 1.0])  # task=edit
    # short: the prompts short captions make; detailed: with size, speed and place (what only detailed captions
    # say); upsampled: short, reworded by the synthetic world's template upsampler.
    prompts: str = "short"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)  # task=metrics: the networks and held-out clips


def register() -> None:
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="sample_schema", node=SampleConfig)
    cs.store(name="eval_schema", node=EvalConfig)


def to_container(cfg: Any) -> dict:
    return OmegaConf.to_container(cfg, resolve=True)


def saved_model_config(saved: dict):
    """A checkpoint's model config on today's schema: keys added since it was written take their defaults.
    Keys this schema does not know (a checkpoint from a newer sora_train) are refused by name."""
    unknown = sorted(set(saved) - set(DiTArgs.__dataclass_fields__))
    if unknown:
        raise ValueError(f"the checkpoint's model config has keys this sora_train does not know: "
                         f"{', '.join('model.' + k for k in unknown)} (written by a newer version?)")
    return OmegaConf.merge(OmegaConf.structured(DiTArgs), saved)


def model_args(node) -> DiTArgs:
    """The `model` node as the object it describes (Hydra hands a DictConfig of the DiTArgs schema)."""
    return node if isinstance(node, DiTArgs) else OmegaConf.to_object(node)


def unknown_keys(cfg) -> list[str]:
    """Keys of a composed config that its schema does not have (`+model.dimm=5`: Hydra's `+` adds any key), each
    with the nearest valid one. Only the loosely typed dict nodes (data.sources, data.caption_mix) take new keys."""
    import dataclasses
    import difflib

    found = []

    def walk(node, path: str) -> None:
        schema = node._metadata.object_type
        names = [f.name for f in dataclasses.fields(schema)] if dataclasses.is_dataclass(schema) else None
        for key in node.keys():
            where = f"{path}{key}"
            if names is not None and key not in names:
                near = difflib.get_close_matches(str(key), names, n=1)
                found.append(f"{where}" + (f" (did you mean {path}{near[0]}?)" if near else ""))
            elif names is not None and OmegaConf.is_dict(child := node._get_node(key)):
                walk(child, f"{where}.")

    walk(cfg, "")
    return found
