"""Checkpoint step directory -> consolidated safetensors (model + EMA) for sampling on one device.

Offline and single-process: model weights come from DeepSpeed's own ZeRO reconstruction
(exact fp32 master weights), EMA from our per-rank shards and their layout.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .engine.checkpoint import find_latest, is_complete


def consolidated_ema(step_dir: Path) -> dict[str, torch.Tensor]:
    d = step_dir / "ema"
    layout = json.loads((d / "layout.json").read_text())
    files = [safe_open(str(d / f"rank{r:05d}.safetensors"), "pt") for r in range(layout["world"])]
    return {n: torch.cat([f.get_tensor(n).flatten() for f in files])[: p["numel"]].view(p["shape"]).clone()
            for n, p in layout["params"].items()}


def export(step_dir: str | Path, out_dir: str | Path) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    step_dir, out = Path(step_dir), Path(out_dir)
    if not is_complete(step_dir):
        latest = find_latest(step_dir)
        if latest is None:
            raise FileNotFoundError(f"{step_dir} is neither a complete checkpoint nor a directory holding one")
        step_dir = latest
    out.mkdir(parents=True, exist_ok=True)
    state = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"))
    if (step_dir / "ema" / "layout.json").exists():
        save_file(consolidated_ema(step_dir), str(out / "ema.safetensors"))
    meta = json.loads((step_dir / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="a step directory, or a checkpoints directory (its latest)")
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    print(f"exported to {export(a.checkpoint, a.out)}")


if __name__ == "__main__":
    main()
