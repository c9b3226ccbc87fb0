"""One checkpoint manager: a step directory is complete (COMPLETE marker, then `latest` points at it)
or it is ignored. Holds DeepSpeed's sharded engine state plus what DeepSpeed does not know of:
EMA shards, the global data position, every rank's RNG, step, W&B run id and resolved config.

Layout:  <dir>/step_00000100/{<DeepSpeed files>, ema/, data_position.json, rng/, meta.json, COMPLETE}
         <dir>/latest   (text: the tag; replaced atomically after COMPLETE is written)
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

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


def rng_state() -> dict[str, torch.Tensor]:
    np_state = np.random.get_state()
    py = random.getstate()
    return {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "numpy_pos": torch.tensor([np_state[2]]), "python": torch.tensor(py[1], dtype=torch.int64)}


def set_rng_state(s: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(s["torch"])
    np.random.set_state(("MT19937", s["numpy_keys"].numpy().astype(np.uint32), int(s["numpy_pos"][0]), 0, 0.0))
    random.setstate((3, tuple(int(v) for v in s["python"].tolist()), None))


class CheckpointManager:
    def __init__(self, root: str | Path, keep_last: int, rank: int, world: int):
        self.root, self.keep_last, self.rank, self.world = Path(root), keep_last, rank, world
        if rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)

    def save(self, engine, step: int, ema, data_position: dict, meta: dict) -> Path:
        """Collective: every rank calls it. `data_position` is the merged (global) position."""
        tag = tag_for(step)
        d = self.root / tag
        if self.rank == 0 and d.exists():  # a leftover of a crash at this very step
            shutil.rmtree(d)
        dist.barrier()
        engine.save_checkpoint(str(self.root), tag=tag, save_latest=False)
        if ema is not None:
            ema.save(d, self.rank)
        (d / "rng").mkdir(exist_ok=True)
        save_file(rng_state(), str(d / "rng" / f"rank{self.rank:05d}.safetensors"))
        dist.barrier()  # every shard on disk before the directory is declared complete
        if self.rank == 0:
            _atomic_write(d / "data_position.json", json.dumps(data_position))
            _atomic_write(d / "meta.json", json.dumps(dict(meta, step=step, world_size=self.world), indent=1))
            _atomic_write(d / "COMPLETE", "")
            _atomic_write(self.root / "latest", tag)
            self._prune(keep=d)
        dist.barrier()
        return d

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
        universal = Path(step_dir).with_name(Path(step_dir).name + "_universal")
        if self.rank == 0 and not is_complete(universal):
            convert_to_universal(Path(step_dir), universal)
        dist.barrier()
        return universal

    def load(self, engine, step_dir: Path, ema) -> dict:
        """Restores engine, EMA and (same world size) this rank's RNG; returns meta + data position.
        On another world size the engine must have been built with load_universal (see prepare_resharding)."""
        step_dir = Path(step_dir)
        meta = self.read_meta(step_dir)
        same_world = meta["world_size"] == self.world
        src = step_dir if same_world else step_dir.with_name(step_dir.name + "_universal")
        path, _ = engine.load_checkpoint(str(src.parent), tag=src.name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load {src}")
        if ema is not None:
            ema.load(step_dir)
        rng = step_dir / "rng" / f"rank{self.rank:05d}.safetensors"
        if same_world and rng.exists():
            set_rng_state(load_file(str(rng)))
        meta["data_position"] = json.loads((step_dir / "data_position.json").read_text())
        return meta


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
