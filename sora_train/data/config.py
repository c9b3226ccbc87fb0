"""The data pipeline's config schema (`data.*`): the one source of its defaults (StreamSpec and PackedLoader
take theirs from here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from omegaconf import MISSING


@dataclass
class SourceConfig:
    """One source of a mixture (`data.sources.<name>`, data/mixture.py)."""

    train: str = MISSING  # its shards (a directory or brace pattern with a manifest.json beside them)
    weight: float = 1.0  # its share of the trained tokens, relative to the others' (0: kept, not read)
    max_tokens: Optional[int] = None  # per sample: longer ones are cropped in time (data.oversize)
    max_frames: Optional[int] = None  # per sample: latent frames kept from the start
    caption_dropout: Optional[float] = None  # default: data.caption_dropout


@dataclass
class DataConfig:
    train: Optional[str] = None  # shard source: directory, brace pattern, or pipe: command(s); or data.sources
    # A weighted mixture instead of data.train: name -> SourceConfig fields (checked by data.mixture.sources_of;
    # typed loosely so that `+data.sources.images={train: ..., weight: 0.3}` composes from the command line).
    sources: Dict[str, Any] = field(default_factory=dict)
    val: Optional[str] = None
    seq_len: int = 2048  # tokens per packed row
    text_len: int = 256  # text tokens per packed row (all of its samples' captions)
    rows: int = 1  # rows per micro-batch
    max_per_row: int = 64  # samples per row
    lookahead: int = 64  # samples the packer chooses from
    # cost: rows balanced by estimated step cost (attention ~ sum of squared sample lengths) as well as tokens, so
    # data-parallel ranks finish together on long-tailed clip lengths; tokens: by tokens alone (sora-bench packing)
    balance: str = "cost"
    num_workers: int = 1  # loader processes per data-parallel rank
    seed: int = 0
    caption_dropout: float = 0.1  # share of samples trained without their caption (classifier-free guidance)
    # Which of a sample's captions (sora-encode --caption-keys) it is trained on, by share, drawn per sample from
    # its identity (exact resume holds); {} = the first. A sample without the one drawn uses its first.
    caption_mix: Dict[str, float] = field(default_factory=dict)
    oversize: str = "crop_time"  # a sample over seq_len: crop_time (keep the first frames that fit) | skip
    max_bad_fraction: float = 0.05  # more bad samples than this share of reads stops the run
    min_reads_for_check: int = 200  # reads before the bad fraction is judged
