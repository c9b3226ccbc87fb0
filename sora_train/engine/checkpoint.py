"""One checkpoint manager over the run's parts. A step directory is complete (COMPLETE marker, then `latest`
points at it) or it is ignored.

The parts (torchtitan's `CheckpointManager(states)`, on DeepSpeed's files rather than DCP) are of two kinds:
- sharded parts write their own files on every rank: `save(step_dir)` / `load(step_dir, saved_world)` (the
  DeepSpeed engine, the EMA shards, each rank's RNG);
- small parts are `Stateful` (`state_dict()` / `load_state_dict()`), the same dict on every rank, written by
  rank 0 as `<name>.json` (the global data position). The TrainState (step, skipped steps, W&B id) goes into
  meta.json beside the run's description (config, manifest, world size): one file says what a checkpoint is.

Layout:  <dir>/step_00000100/{<DeepSpeed files>, ema/, rng/, data_position.json, meta.json, COMPLETE}
         <dir>/latest   (text: the tag; replaced atomically after COMPLETE is written)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step_(\d{8})$")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def is_complete(step_dir: Path) -> bool:
    return (Path(step_dir) / "COMPLETE").exists()


def find_latest(root: str | Path) -> Path | None:
    """The newest complete step directory: `latest` if it names a complete one, else a scan."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.exists():
        d = root / pointer.read_text().strip()
        if is_complete(d):
            return d
    done = sorted(d for d in root.glob("step_*") if STEP_DIR.match(d.name) and is_complete(d))
    return done[-1] if done else None


def half_written(root: str | Path) -> list[Path]:
    """Step directories without a COMPLETE marker (a crash or a full disk while saving) and unfinished universal
    conversions: never resumed from, only in the way (disk space)."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted([d for d in root.glob("step_*") if STEP_DIR.match(d.name) and not is_complete(d)]
                  + list(root.glob("step_*_universal.tmp")))


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    with open(tmp) as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


class Sharded(Protocol):
    def save(self, step_dir: Path) -> None: ...

    def load(self, step_dir: Path, saved_world: int) -> None: ...


@dataclass
class TrainState:
    """What the loop counts, kept across resumes (nonfinite_steps: train/nonfinite_steps keeps counting)."""

    step: int = 0
    nonfinite_steps: int = 0
    wandb_id: str | None = None

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.nonfinite_steps = state.get("nonfinite_steps", 0)  # absent in checkpoints from before the count
        self.wandb_id = state.get("wandb_id")


class EngineState:
    """The DeepSpeed engine's own checkpoint (module, optimizer partitions, LR schedule). Loaded from the universal
    conversion next to the step directory when the world size changed (prepare_resharding made it)."""

    def __init__(self, engine, world: int):
        self.engine, self.world = engine, world

    def save(self, step_dir: Path) -> None:
        self.engine.save_checkpoint(str(step_dir.parent), tag=step_dir.name, save_latest=False)

    def load(self, step_dir: Path, saved_world: int) -> None:
        src = step_dir if saved_world == self.world else universal_dir(step_dir)
        path, _ = self.engine.load_checkpoint(str(src.parent), tag=src.name, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {src}")


class RNGState:
    """Each rank's torch / numpy / python generators (the model's own noise is keyed by step, not drawn from
    them; they cover whatever else draws). Restored only on the same world size: on another, ranks differ."""

    def __init__(self, rank: int, world: int):
        self.rank, self.world = rank, world

    def file(self, step_dir: Path) -> Path:
        return step_dir / "rng" / f"rank{self.rank:05d}.safetensors"

    def save(self, step_dir: Path) -> None:
        np_state, py = np.random.get_state(), random.getstate()
        self.file(step_dir).parent.mkdir(exist_ok=True)
        save_file({"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
                   "numpy_pos": torch.tensor([np_state[2]]), "python": torch.tensor(py[1], dtype=torch.int64)},
                  str(self.file(step_dir)))

    def load(self, step_dir: Path, saved_world: int) -> None:
        if saved_world != self.world or not self.file(step_dir).exists():
            return
        s = load_file(str(self.file(step_dir)))
        torch.set_rng_state(s["torch"])
        np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), int(s["numpy_pos"][0]), 0, 0.0))
        random.setstate((3, tuple(int(v) for v in s["python"].tolist()), None))


class DataPosition:
    """The loader as a checkpoint part: the global stream position, every data-parallel rank's view merged (the
    members of a sequence-parallel group hold the same view; their first one speaks). Collective."""

    def __init__(self, loader, sp_rank: int, world: int, source: str = "data", data_config: dict | None = None):
        self.loader, self.sp_rank, self.world, self.source = loader, sp_rank, world, source
        self.data_config = data_config or {}  # this run's data.*: a refused resume says what differs from the saved one
        self.saved_data_config: dict = {}  # the checkpoint's data.*, set by the CheckpointManager before loading

    def state_dict(self) -> dict:
        from ..data.mixture import position_from_state_dict

        views = [None] * self.world
        dist.all_gather_object(views, self.loader.state_dict() if self.sp_rank == 0 else None)
        views = [position_from_state_dict(v) for v in views if v is not None]
        return type(views[0]).merge(views, base=self.loader.start).state_dict()

    def load_state_dict(self, state: dict) -> None:
        from ..preflight import ConfigError

        from ..data.shards import dataset_changes

        try:  # another dataset or data.seed than the checkpoint's: a config error, not a traceback
            self.loader.load_state_dict(state)
        except ValueError as e:
            changes = dataset_changes(self.saved_data_config, self.data_config) if "another dataset" in str(e) else ""
            raise ConfigError(prefixed(self.source, f"{e}" + (f". What differs: {changes}" if changes else ""))) from e


def prefixed(what: str, message: str) -> str:
    """`what: message`, unless the message already names `what` (data.sources.x: ... under data.sources)."""
    return message if message.startswith(what.split("=")[0]) else f"{what}: {message}"


def universal_dir(step_dir: Path) -> Path:
    return Path(step_dir).with_name(Path(step_dir).name + "_universal")


class CheckpointManager:
    """Saves and restores the run's parts and decides when: every `every` steps, at the last step, and when told
    (a stop signal, the non-finite policy). `description` (config, manifest) goes into meta.json."""

    def __init__(self, root: str | Path, keep_last: int, rank: int, world: int, every: int = 0,
                 train_state: TrainState | None = None, parts: dict[str, Sharded | Stateful] | None = None,
                 description: dict | None = None):
        self.root, self.keep_last, self.rank, self.world = Path(root), keep_last, rank, world
        self.every, self.train_state = every, train_state or TrainState()
        self.parts, self.description = dict(parts or {}), description or {}
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    def should_save(self, step: int, last_step: int) -> bool:
        return (self.every > 0 and step % self.every == 0) or step == last_step

    def save(self, step: int) -> Path:
        """Collective: every rank calls it."""
        tag = tag_for(step)
        d = self.root / tag
        if self.rank == 0 and d.exists():  # a leftover of a crash at this very step
            shutil.rmtree(d)
        dist.barrier()
        small = {}
        for name, part in self.parts.items():
            if hasattr(part, "state_dict"):
                small[name] = part.state_dict()  # on every rank: a part may gather its state (the data position)
            else:
                part.save(d)
        dist.barrier()  # every shard on disk before the directory is declared complete
        if self.rank == 0:
            for name, state in small.items():
                _atomic_write(d / f"{name}.json", json.dumps(state))
            meta = {**self.description, **self.train_state.state_dict(), "step": step, "world_size": self.world}
            _atomic_write(d / "meta.json", json.dumps(meta, indent=1))
            _atomic_write(d / "COMPLETE", "")
            _atomic_write(self.root / "latest", tag)
            self._prune(keep=d)
        dist.barrier()
        return d

    def load(self, step_dir: Path) -> dict:
        """Restores every part from a complete step directory; returns its meta. On another world size the engine
        must have been built with load_universal (see prepare_resharding)."""
        step_dir = Path(step_dir)
        meta = self.read_meta(step_dir)
        for name, part in self.parts.items():
            if hasattr(part, "saved_data_config"):
                part.saved_data_config = meta.get("config", {}).get("data", {})
            if hasattr(part, "load_state_dict"):
                part.load_state_dict(json.loads((step_dir / f"{name}.json").read_text()))
            else:
                part.load(step_dir, meta["world_size"])
        self.train_state.load_state_dict(meta)
        return meta

    def _prune(self, keep: Path) -> None:
        dirs = sorted(p for p in self.root.glob("step_*") if STEP_DIR.match(p.name))
        complete = [p for p in dirs if is_complete(p)]
        for p in complete[: max(0, len(complete) - self.keep_last)]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)
        for p in dirs:  # half-written directories older than the one just published
            if not is_complete(p) and p.name < keep.name:
                shutil.rmtree(p, ignore_errors=True)

    def remove_half_written(self) -> list[Path]:
        """Rank 0, holding the run directory's lock (so no other run is writing here)."""
        found = half_written(self.root)
        for d in found:
            shutil.rmtree(d, ignore_errors=True)
        return found

    def read_meta(self, step_dir: Path) -> dict:
        step_dir = Path(step_dir)
        if not is_complete(step_dir):
            raise FileNotFoundError(f"{step_dir} is not a complete checkpoint (no COMPLETE marker)")
        return json.loads((step_dir / "meta.json").read_text())

    def prepare_resharding(self, step_dir: Path) -> Path:
        """Resume on another world size goes through DeepSpeed's universal checkpoint: converted once
        (rank 0, DeepSpeed's own ds_to_universal) next to the step directory. Collective."""
        universal = universal_dir(step_dir)
        if self.rank == 0 and not is_complete(universal):
            convert_to_universal(Path(step_dir), universal)
        dist.barrier()
        return universal


def convert_to_universal(step_dir: Path, out: Path) -> None:
    import subprocess
    import sys

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(step_dir),
           "--output_folder", str(tmp), "--num_extract_workers", "1", "--num_merge_workers", "1"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"converting {step_dir} to a universal checkpoint failed:\n{r.stderr[-3000:]}\n"
                           f"Convert by hand with: {' '.join(cmd)}")
    for name in ("meta.json", "data_position.json"):
        shutil.copy(step_dir / name, tmp / name)
    (tmp / "COMPLETE").write_text("")
    os.replace(tmp, out)
