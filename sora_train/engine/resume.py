"""Which checkpoint a run continues from, and which config changes a resume refuses."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from omegaconf import OmegaConf

from ..config import saved_model_config, to_container
from ..preflight import ConfigError
from .checkpoint import find_latest, is_complete


def resume_point(cfg, ckpt_root: Path) -> Path | None:
    """checkpoint.resume: never | auto (the newest complete step directory, if any) | a path: a step directory, or
    a checkpoints directory for its newest (as init_from, sora-export and sora-sample take one)."""
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        return find_latest(ckpt_root)
    path = Path(cfg.checkpoint.resume)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume={path}: no such directory")
    if is_complete(path):
        return path
    latest = find_latest(path)
    if latest is None:
        raise ConfigError(f"checkpoint.resume={path}: neither a complete step directory nor a checkpoints directory "
                          f"holding one")
    return latest


def refuse_incompatible_resume(cfg, meta: dict, src: Path, world: int | None = None) -> None:
    """A run may change its world size, SP degree, schedule or data layout on resume, not its model, optimizer
    or ZeRO stage: say so before DeepSpeed fails deep inside load_checkpoint."""
    old, new = meta["config"], to_container(cfg)
    old_model = to_container(saved_model_config(old["model"]))
    changed = [f"model.{k}: {old_model[k]!r} -> {v!r}" for k, v in new["model"].items() if old_model[k] != v]
    old_optimizer = old["optim"].get("name", "adamw")  # checkpoints from before optim.name: AdamW
    if old_optimizer != new["optim"]["name"]:
        changed.append(f"optim.name: {old_optimizer} -> {new['optim']['name']}")
    if old["parallel"]["zero_stage"] != new["parallel"]["zero_stage"]:
        changed.append(f"parallel.zero_stage: {old['parallel']['zero_stage']} -> {new['parallel']['zero_stage']}")
    saved_world = meta.get("world_size", world)
    if old_optimizer == "muon" and world is not None and saved_world != world:
        # Measured with deepspeed 0.19.8: ds_to_universal stops with KeyError 'exp_avg' on Muon's state.
        raise ConfigError(f"cannot resume {src} on {world} ranks: it was saved on {saved_world} with optim.name=muon, "
                          f"and DeepSpeed's universal checkpoint (which carries optimizer state to another world "
                          f"size) does not hold Muon's momentum; resume on {saved_world} ranks")
    if changed:
        raise ConfigError(f"cannot resume {src} with this config ({'; '.join(changed)}); use the checkpoint's "
                          f"config or start a new out_dir (checkpoint.resume=never starts over in place)")


def prepare_resume(cfg, ckpt, dims) -> tuple[Path | None, bool]:
    """Before the model is built (collective): removes half-written checkpoints, finds the one to continue from,
    refuses an incompatible one, writes the run's config.yaml, and converts the checkpoint when the world size
    changed. Returns (the step directory to load or None, whether the engine loads DeepSpeed's universal form)."""
    if dims.is_main:  # under the run directory's lock: nothing else writes here
        for d in ckpt.remove_half_written():
            print(f"removed {d}: a half-written checkpoint (a crash or a full disk while saving)", flush=True)
    dist.barrier()
    src = resume_point(cfg, ckpt.root)
    saved = ckpt.read_meta(src) if src is not None else None
    if saved is not None:
        refuse_incompatible_resume(cfg, saved, src, dims.world_size)
    if dims.is_main:  # after the resume check: a refused resume leaves the run's config as it was
        (Path(cfg.out_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    resharding = saved is not None and saved["world_size"] != dims.world_size
    if resharding:
        ckpt.prepare_resharding(src)
    return src, resharding
