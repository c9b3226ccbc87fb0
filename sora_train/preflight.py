"""Checks that refuse a bad configuration before any process group, data or model work starts.
Each message names the config key to change."""

from __future__ import annotations

import math
import os
import shutil
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from .data import check_manifest, list_shards, load_manifest
from .data.mixture import source_config, sources_of
from .diffusion.conditioning import ConditionConfig
from .data.stream import check_readers
from .engine.checkpoint import dir_bytes, half_written
from .diffusion import OBJECTIVES, check_sampler
from .config import model_args
from .models import VARLEN_KERNELS, build_attention, count_params
from .models.attention import FlexAttention, VarlenAttention
from .parallel import AC_POLICIES, FLOAT8_RECIPES, check_degrees, float8_available


class ConfigError(ValueError):
    pass


# Values a run cannot use, refused by key before any work (a negative step count used to exit 0 having done
# nothing; a misspelt choice such as data.oversize=skp behaved as another one).
CHOICES = {"device": ("auto", "cpu", "cuda"), "data.oversize": ("crop_time", "skip"), "data.balance": ("cost", "tokens"),
           "optim.decay": ("cosine", "constant"), "parallel.precision": ("auto", "bf16", "fp32"),
           "parallel.activation_checkpointing": AC_POLICIES, "parallel.float8": FLOAT8_RECIPES,
           "parallel.zero3_gather": ("block", "module"),
           "logging.wandb.mode": ("online", "offline", "disabled")}
RANGES = {"optim.steps": (1, None), "optim.grad_accum": (1, None), "optim.warmup_steps": (0, None),
          "optim.lr": (1e-12, None), "optim.min_lr_ratio": (0.0, 1.0), "optim.grad_clip": (0.0, None),
          "optim.max_bad_steps": (1, None), "data.seq_len": (1, None), "data.text_len": (1, None),
          "data.rows": (1, None), "data.max_per_row": (1, None), "data.num_workers": (0, None),
          "data.caption_dropout": (0.0, 1.0), "data.max_bad_fraction": (0.0, 1.0), "checkpoint.every": (0, None),
          "checkpoint.keep_last": (1, None), "ema.decay": (0.0, 1.0), "logging.every": (0, None),
          "logging.val_every": (0, None), "logging.sample_every": (0, None), "logging.val_batches": (1, None),
          "logging.metrics_every": (0, None), "logging.metrics.clips": (2, None), "logging.metrics.batch": (1, None),
          "logging.metrics.videos": (0, None),
          "watchdog_s": (1.0, None), "parallel.timeout_s": (1.0, None), "parallel.checkpoint_blocks": (-1, None)}


def check_known_keys(cfg) -> None:
    """Hydra's `+key=value` adds any key: a misspelt one would be ignored silently. Refused, with the nearest."""
    from .config import unknown_keys

    if found := unknown_keys(cfg):
        raise ConfigError(f"unknown key(s): {'; '.join(found)}. Only data.sources and data.caption_mix take new "
                          f"keys with '+'")


def check_values(cfg) -> None:
    problems = []
    for key, allowed in CHOICES.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            problems.append(f"{key}={value!r}: use {', '.join(allowed)}")
    for key, (low, high) in RANGES.items():
        value = OmegaConf.select(cfg, key)
        if value < low or (high is not None and value > high):
            problems.append(f"{key}={value}: must be " + (f"between {low} and {high}" if high is not None
                                                          else f">= {low}"))
    if problems:
        raise ConfigError("; ".join(problems))
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible here (torch.cuda.is_available() is False); "
                          "use device=cpu or device=auto")
    check_float8(cfg)
    check_metrics(cfg)


def check_metrics(cfg) -> None:
    """logging.metrics_every: the held-out clips and the feature networks named exist (the networks are loaded, and
    refused by kind, when the run is built; a wrong path should not wait for that)."""
    if not cfg.logging.metrics_every:
        return
    m = cfg.logging.metrics
    if not (m.real or cfg.data.val):
        raise ConfigError("logging.metrics_every: no held-out clips: set data.val or logging.metrics.real")
    if not (m.fvd_network or m.fid_network or m.clip_network):
        raise ConfigError("logging.metrics_every: no feature network: set logging.metrics.fvd_network, "
                          "logging.metrics.fid_network and/or logging.metrics.clip_network")
    for key in ("fvd_network", "fid_network", "clip_network"):
        path = m[key]
        if path and not Path(path).expanduser().exists():
            raise ConfigError(f"logging.metrics.{key}={path}: no such file or folder")
    if m.size is not None and len(m.size) != 3:
        raise ConfigError(f"logging.metrics.size={list(m.size)}: use [frames, height, width] or null")


def check_float8(cfg) -> None:
    """float8 needs torchao and, on CUDA, float8 tensor cores (compute capability 8.9: Ada, Hopper and later).
    On CPU torch emulates the float8 GEMMs (slowly): the arithmetic is the same, which is what the tests use."""
    if cfg.parallel.float8 == "none":
        return
    why = float8_available()
    if why:
        raise ConfigError(f"parallel.float8={cfg.parallel.float8}: {why}")
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if cuda and torch.cuda.get_device_capability() < (8, 9):
        raise ConfigError(f"parallel.float8={cfg.parallel.float8}: {torch.cuda.get_device_name()} (compute capability "
                          f"{'.'.join(map(str, torch.cuda.get_device_capability()))}) has no float8 tensor cores; "
                          f"they start at 8.9 (Ada, Hopper); use parallel.float8=none")


def check_cuda_head_dim(cfg) -> None:
    """The CUDA attention kernels' head-dim limits, refused before the first step rather than at it: flex needs
    16 or more, a named flash kernel (varlen:flash_attn, varlen:torch_varlen) a multiple of 8 up to 256."""
    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not cuda or cfg.model.dim % cfg.model.heads:
        return
    head_dim, name = cfg.model.dim // cfg.model.heads, cfg.model.attention
    if name == "flex" and head_dim < FlexAttention.MIN_HEAD_DIM_CUDA:
        raise ConfigError(f"model.attention=flex with head dim {head_dim} (model.dim={cfg.model.dim} / "
                          f"model.heads={cfg.model.heads}): flex attention on CUDA needs at least "
                          f"{FlexAttention.MIN_HEAD_DIM_CUDA}; use model.attention=varlen")
    if name in ("varlen:flash_attn", "varlen:torch_varlen") and not VarlenAttention.flash_takes(head_dim):
        raise ConfigError(f"model.attention={name} with head dim {head_dim} (model.dim={cfg.model.dim} / "
                          f"model.heads={cfg.model.heads}): flash attention needs a multiple of 8 up to 256; "
                          f"use model.attention=varlen, which takes such rows one sequence at a time")


def checkpoint_bytes(params: int, zero_stage: int) -> int:
    """bf16/fp32 weights + fp32 master + Adam moments + fp32 EMA: ~18 bytes per parameter."""
    return params * 18


def preflight(cfg, check_data: bool = True) -> dict | None:
    """Returns the dataset manifest (or None for pipe: sources without one, or with check_data=False: a caller
    that feeds its own batches, as sora-bench does)."""
    check_known_keys(cfg)
    check_values(cfg)
    args = model_args(cfg.model)
    try:
        args.validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", 1)))
    try:
        check_degrees(world, cfg.parallel.sp, cfg.model.heads, cfg.data.seq_len, cfg.parallel.ring)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.data.max_per_row > cfg.model.max_segments:
        raise ConfigError(f"data.max_per_row={cfg.data.max_per_row} exceeds model.max_segments={cfg.model.max_segments}")
    try:
        ConditionConfig(**OmegaConf.to_container(cfg.diffusion.condition)).validate()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    if cfg.diffusion.kind not in OBJECTIVES:
        raise ConfigError(f"diffusion.kind={cfg.diffusion.kind!r}: use {' or '.join(OBJECTIVES)}")
    try:  # used only when the run samples (logging.sample_*): a typo would surface hours in, or after the last step
        check_sampler(cfg.diffusion.kind, cfg.diffusion.sampler)
    except ValueError as e:
        raise ConfigError(f"diffusion.sampler: {e}") from e
    if cfg.model.attention not in ("sdpa", "flex", "varlen", "flash", "naive", *VARLEN_KERNELS):
        raise ConfigError(f"model.attention={cfg.model.attention!r}: use sdpa, flex, varlen or naive "
                          f"(or a varlen kernel by name: {', '.join(VARLEN_KERNELS)})")
    if cfg.model.attention.startswith("varlen:"):  # a pinned kernel must be installed here
        try:
            build_attention(cfg.model.attention)
        except ValueError as e:
            raise ConfigError(f"model.attention={cfg.model.attention!r}: {e}") from e
    check_cuda_head_dim(cfg)
    if cfg.optim.name not in ("adamw", "muon"):
        raise ConfigError(f"optim.name={cfg.optim.name!r}: use adamw or muon")
    if cfg.optim.name == "muon" and cfg.parallel.zero_stage > 0 and cfg.optim.grad_clip > 0:
        # Measured (tests/test_distributed.py): under ZeRO DeepSpeed orthogonalises first and then clips the
        # update (norm ~10-30) to optim.grad_clip, which shrinks every step; unclipped, ZeRO-3 matches stage 0.
        raise ConfigError(f"optim.name=muon with parallel.zero_stage={cfg.parallel.zero_stage} and "
                          f"optim.grad_clip={cfg.optim.grad_clip}: DeepSpeed would clip Muon's orthogonalised "
                          f"update, not the gradient; set optim.grad_clip=0 (Muon's update is already normalised) "
                          f"or parallel.zero_stage=0")
    if cfg.parallel.zero_stage not in (0, 1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={cfg.parallel.zero_stage}: use 0-3")
    if cfg.parallel.checkpoint_blocks > cfg.model.depth:
        raise ConfigError(f"parallel.checkpoint_blocks={cfg.parallel.checkpoint_blocks} exceeds model.depth="
                          f"{cfg.model.depth}: use -1 (every block) or at most the depth")
    if cfg.parallel.compile and cfg.parallel.zero_stage == 3 and cfg.parallel.zero3_gather == "module":
        raise ConfigError("parallel.compile with parallel.zero3_gather=module: ZeRO-3's per-layer hooks break the "
                          "compiled block's graph at every layer; use parallel.zero3_gather=block")
    if cfg.parallel.compile:
        backends = torch._dynamo.list_backends(exclude_tags=())
        if cfg.parallel.compile_backend not in backends:
            raise ConfigError(f"parallel.compile_backend={cfg.parallel.compile_backend!r}: use one of "
                              f"{', '.join(backends)}")
    manifest = check_data_sources(cfg, world // max(cfg.parallel.sp, 1)) if check_data else None
    out = Path(cfg.out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_probe_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"out_dir={cfg.out_dir!r} is not writable: {e}") from e
    ckpt_dir = Path(cfg.checkpoint.dir or out / "checkpoints")
    need = checkpoint_bytes(count_params(args), cfg.parallel.zero_stage)
    free = shutil.disk_usage(next(p for p in [ckpt_dir, *ckpt_dir.parents] if p.exists())).free
    leftovers = {d: dir_bytes(d) for d in half_written(ckpt_dir)}  # removed at start-up (train.build), so they count
    need_gb = max(need / 1e9, cfg.checkpoint.min_free_gb)
    if free + sum(leftovers.values()) < need_gb * 1e9:
        named = "".join(f"; {d} ({b / 1e9:.2f} GB) is a half-written checkpoint, safe to delete"
                        for d, b in leftovers.items())
        raise ConfigError(f"checkpoint.dir={str(ckpt_dir)!r} has {free / 1e9:.1f} GB free; one checkpoint needs "
                          f"~{need_gb:.1f} GB (model.{cfg.model.name}: ~{math.ceil(need / 18 / 1e6)}M params){named}")
    return manifest


def check_data_sources(cfg, dp: int) -> dict | None:
    """The training/validation shards exist, are enough for every reader of `dp` ranks, and were encoded for this
    model; returns the manifest."""
    shares = list(cfg.data.caption_mix.values())
    if shares and (min(shares) < 0 or sum(shares) <= 0):
        raise ConfigError(f"data.caption_mix={dict(cfg.data.caption_mix)}: shares are >= 0 with a positive sum")
    mixed = bool(cfg.data.sources)
    if mixed == bool(cfg.data.train):
        raise ConfigError("set data.train (the training shards: a directory, a brace pattern or pipe: commands, e.g. "
                          "data.train=/data/shards) or data.sources (a weighted mixture), not both: with data.sources, add "
                          "data.train=null (an experiment preset may have set it)"
                          if mixed else "data.train is not set: give the training shards (a directory, a brace "
                          "pattern or pipe: commands), e.g. data.train=/data/shards, or data.sources (a mixture)")
    try:
        nodes = {f"data.sources.{n}": source_config(n, s) for n, s in cfg.data.sources.items()} if mixed else {}
    except ValueError as e:
        raise ConfigError(str(e)) from e
    sources = {k: c.train for k, c in nodes.items()} if mixed else {"data.train": cfg.data.train}
    try:
        if cfg.data.val:
            list_shards(cfg.data.val)
    except FileNotFoundError as e:
        raise ConfigError(f"data.val: {e}") from e
    manifest, captions_of = None, {}
    for key, train in sources.items():
        try:
            check_readers(len(list_shards(train)), dp, cfg.data.num_workers)
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"{key}: {e}") from e
        found = load_manifest(train)
        weight = nodes[key].weight if mixed else 1.0
        if found is not None and weight and not sum(int(s.get("samples", 0)) for s in found.get("shards", [])):
            raise ConfigError(f"{key}: {train} holds no samples (its manifest.json lists 0): every clip failed or was "
                              f"skipped when it was encoded; its failures.jsonl says why")
        if found is not None:
            try:
                check_manifest(found, cfg.model.in_channels, cfg.model.text_dim, tuple(cfg.model.patch_size),
                               cfg.data.text_len)
            except ValueError as e:
                raise ConfigError(f"{key}: {e}" if mixed else str(e)) from e
        if found is not None:
            captions_of[key] = found.get("caption_keys", ["caption"])
        manifest = manifest or found  # the first names the text encoder and codec samples are made with
    # A drawn caption a sample lacks falls back to its first, inside a dataset and across a mixture's sources alike
    # (stills with short captions beside clips with long ones); a key no source has is a typo.
    if captions_of and (unknown := sorted(set(cfg.data.caption_mix) - {k for ks in captions_of.values() for k in ks})):
        raise ConfigError(f"data.caption_mix: {unknown} are not among the captions of "
                          f"{' or '.join(f'{k} {v}' for k, v in captions_of.items())} (sora-encode --caption-keys)")
    for key, keys in captions_of.items():
        if lacking := sorted(set(cfg.data.caption_mix) - set(keys)):
            print(f"note: {key} has no {', '.join(lacking)} caption(s) (its captions: {keys}); its samples drawn "
                  f"for one are trained on their first caption", file=sys.stderr, flush=True)
    if mixed:
        try:
            sources_of(cfg.data.sources)
        except ValueError as e:
            raise ConfigError(str(e)) from e
    return manifest
