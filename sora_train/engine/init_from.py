"""Stages: a new run that starts from another run's weights (init_from.path = a checkpoint, a step directory in it,
or an export), with a new out_dir, data, schedule and step 0: the model's and EMA's weights come over; its
optimizer state, data position and step do not (init_from.optimizer=true keeps the optimizer state, from a
checkpoint saved on the same number of ranks). Pretraining curricula chain runs this way (images at low
resolution -> video -> larger, longer clips), each stage from the last.

A model config that changes a parameter's shape is refused, naming the keys; keys that change no shape (the
attention backend, positional encodings without weights, ...) may differ and are listed at start-up.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import model_args, saved_model_config, to_container
from ..inference.export import SavedWeights
from ..models import DiT
from ..preflight import ConfigError


def find_parent(path: str | Path) -> SavedWeights:
    try:
        return SavedWeights.find(path)
    except FileNotFoundError as e:
        raise ConfigError(f"init_from.path: {e}") from e


def lineage(parent: SavedWeights) -> list[dict]:
    """The parent, then its own ancestors: where a stage's weights came from."""
    cfg = parent.meta.get("config", {})
    path = Path(parent.path).resolve()
    # Both absolute: the parent's own out_dir is relative to wherever it was launched; its checkpoints' place is
    # <out_dir>/checkpoints/step_N unless checkpoint.dir put them elsewhere.
    out_dir = path.parent.parent if not parent.is_export and path.parent.name == "checkpoints" else \
        Path(cfg.get("out_dir") or ".").resolve()
    return [{"init_from": str(path), "step": parent.meta.get("step"), "out_dir": str(out_dir),
             "wandb_id": parent.meta.get("wandb_id")}, *parent.meta.get("lineage", [])]


def shapes(args) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):  # no memory: a 30B preset's shapes in milliseconds
        return {n: tuple(p.shape) for n, p in DiT(args).named_parameters()}


def check_architecture(cfg, parent: SavedWeights) -> list[str]:
    """Refuses a model whose parameters differ from the parent's; returns the model keys that differ anyway."""
    old = to_container(saved_model_config(parent.meta["config"]["model"]))
    new = to_container(cfg.model)
    differ = [k for k in new if old.get(k) != new[k]]
    a, b = shapes(model_args(saved_model_config(parent.meta["config"]["model"]))), shapes(model_args(cfg.model))
    if a != b:
        changed = sorted(set(a) ^ set(b)) or [n for n in a if a[n] != b.get(n)]
        raise ConfigError(f"init_from.path={str(parent.path)!r}: the model differs from the parent's in "
                          f"{', '.join(f'model.{k}: {old.get(k)!r} -> {new[k]!r}' for k in differ)}, which changes "
                          f"its parameters ({', '.join(changed[:3])}{', ...' if len(changed) > 3 else ''}); a stage "
                          f"keeps the architecture (shape-neutral keys may change)")
    return differ


def load_weights(module: torch.nn.Module, parent: SavedWeights, rank: int) -> None:
    """Copies the parent's weights into `module` before the optimizer is built (its fp32 masters are then these).
    Under ZeRO-3 each parameter is gathered, written by rank 0 (which alone reads the parent) and re-partitioned."""
    params = dict(module.named_parameters())
    if any(hasattr(p, "ds_tensor") for p in params.values()):
        import deepspeed

        state = parent.model() if rank == 0 else None
        for name, p in params.items():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                if rank == 0:
                    with torch.no_grad():
                        p.copy_(state[name].to(p.dtype))
        return
    state = parent.model()
    missing = sorted(set(params) - set(state.keys()))
    if missing:
        raise ConfigError(f"init_from.path={str(parent.path)!r} has no weights for {missing[:3]}")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name].to(p.dtype))


def check_optimizer_source(cfg, parent: SavedWeights, world: int) -> None:
    """init_from.optimizer=true needs a checkpoint of the same optimizer, ZeRO stage and world size: refused before
    the run takes its directory (a refusal there left a lock, a config and an empty checkpoints/ behind)."""
    if not cfg.init_from.optimizer:
        return
    old = parent.meta["config"]
    problem = ("it is an export (no optimizer state)" if parent.is_export else
               f"it was saved on {parent.meta['world_size']} ranks, this run has {world}"
               if parent.meta["world_size"] != world else
               f"its optimizer is {old['optim'].get('name', 'adamw')}" if old["optim"].get("name", "adamw") !=
               cfg.optim.name else f"its ZeRO stage is {old['parallel']['zero_stage']}"
               if old["parallel"]["zero_stage"] != cfg.parallel.zero_stage else None)
    if problem:
        raise ConfigError(f"init_from.optimizer=true: cannot take the optimizer state of {parent.path}: {problem}")


def start_stage(cfg, parent: SavedWeights, engine, ema, changed: list[str], dims) -> None:
    """After the engine is built with the parent's weights: the parent's EMA, its optimizer state when asked, and
    a line saying where the stage starts from."""
    from_ema = ema is not None and parent.has_ema
    if from_ema and parent.is_export:
        ema.load_full(parent.ema().__getitem__)
    elif from_ema:  # a checkpoint's per-rank shards, from any world size
        ema.load(parent.path)
    if cfg.init_from.optimizer:  # check_optimizer_source allowed it before any work
        path, _ = engine.load_checkpoint(str(parent.path.parent), tag=parent.path.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {parent.path}")
    if dims.is_main:
        print(f"stage from {parent.path} (step {parent.meta.get('step')}): model weights"
              f"{', EMA' if from_ema else ''}{', optimizer state' if cfg.init_from.optimizer else ''}; step 0, a "
              f"fresh data position{'; model keys changed: ' + ', '.join(changed) if changed else ''}", flush=True)
