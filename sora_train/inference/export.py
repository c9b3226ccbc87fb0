"""Checkpoint step directory -> consolidated safetensors (model + EMA) for sampling on one device.

Offline and single-process: model weights come from DeepSpeed's own ZeRO reconstruction
(exact fp32 master weights), EMA from our per-rank shards and their layout.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..engine.checkpoint import find_latest, is_complete


@dataclass
class SavedWeights:
    """A run's weights on disk: an export dir (model.safetensors, ema.safetensors, meta.json) or a complete
    checkpoint step dir (given, or the latest in a checkpoints dir), with its meta.json."""

    path: Path
    meta: dict
    is_export: bool

    @classmethod
    def find(cls, path: str | Path) -> "SavedWeights":
        path = Path(path)
        if (path / "model.safetensors").exists():
            return cls(path, json.loads((path / "meta.json").read_text()), True)
        step_dir = path if is_complete(path) else find_latest(path)
        if step_dir is None:
            raise FileNotFoundError(f"{path}: no export (model.safetensors) and no complete checkpoint found")
        return cls(step_dir, json.loads((step_dir / "meta.json").read_text()), False)

    @property
    def has_ema(self) -> bool:
        return (self.path / ("ema.safetensors" if self.is_export else "ema/layout.json")).exists()

    def model(self) -> dict[str, torch.Tensor]:
        """The fp32 model weights."""
        return load_file(str(self.path / "model.safetensors")) if self.is_export else fp32_weights(self.path)

    def ema(self) -> dict[str, torch.Tensor]:
        """The consolidated EMA weights (has_ema first)."""
        return load_file(str(self.path / "ema.safetensors")) if self.is_export else consolidated_ema(self.path)


def consolidated_ema(step_dir: Path) -> dict[str, torch.Tensor]:
    d = step_dir / "ema"
    layout = json.loads((d / "layout.json").read_text())
    files = [safe_open(str(d / f"rank{r:05d}.safetensors"), "pt") for r in range(layout["world"])]
    return {n: torch.cat([f.get_tensor(n).flatten() for f in files])[: p["numel"]].view(p["shape"]).clone()
            for n, p in layout["params"].items()}


def fp32_weights(step_dir: Path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights. ZeRO 1-3 keep the fp32 masters partitioned in the optimizer files, which
    DeepSpeed's own reconstruction merges. Stage 0 (the CPU quickstart) writes no optimizer partitions, and
    that reconstruction fails on it (param_shapes is None): there the module state is the fp32 model."""
    if any(step_dir.glob("*zero_pp_rank_*")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    files = sorted(step_dir.glob("mp_rank_*_model_states.pt"))
    if len(files) != 1:
        raise FileNotFoundError(f"{step_dir}: expected one mp_rank_*_model_states.pt without ZeRO partitions, "
                                f"found {[f.name for f in files]}")
    try:
        state = torch.load(files[0], map_location="cpu", weights_only=True)["module"]
    except Exception as e:  # a damaged file raises anything from the unpickler: name the file instead
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise ValueError(f"{files[0]} cannot be read ({type(e).__name__}: {first}): the checkpoint is damaged; "
                         f"export an earlier step") from e
    bad = {n: t.dtype for n, t in state.items() if t.dtype != torch.float32}
    if bad:  # stage 0 with bf16 would hold rounded weights here; export must not pass them off as masters
        raise ValueError(f"{files[0]}: module weights are not fp32 ({dict(list(bad.items())[:3])}), so they are "
                         f"not the master weights; export a ZeRO 1-3 checkpoint or one trained in fp32")
    return dict(state)


def umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def export(step_dir: str | Path, out_dir: str | Path) -> Path:
    step_dir, out = Path(step_dir), Path(out_dir)
    if not is_complete(step_dir):
        latest = find_latest(step_dir)
        if latest is None:
            raise FileNotFoundError(f"{step_dir} is neither a complete checkpoint nor a directory holding one")
        step_dir = latest
    # Written beside, published by rename: a failure (broken checkpoint, full disk) leaves no partial export, and
    # an earlier export at `out` stays until the new one is whole.
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        state = fp32_weights(step_dir)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        if (step_dir / "ema" / "layout.json").exists():
            save_file(consolidated_ema(step_dir), str(tmp / "ema.safetensors"))
        meta = json.loads((step_dir / "meta.json").read_text())
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        # safetensors creates its files 0600; an export is shared like the meta.json beside it (the umask's mode).
        mode = 0o666 & ~umask()
        for f in tmp.glob("*.safetensors"):
            f.chmod(mode)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a step directory, or a checkpoints directory (its latest)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    try:
        print(f"exported to {export(a.checkpoint, a.out)}")
    except (FileNotFoundError, ValueError) as e:
        p.exit(1, f"sora-export: {a.checkpoint}: {type(e).__name__}: {e}\n")


if __name__ == "__main__":
    main()
