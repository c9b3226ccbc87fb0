"""EMA of the parameters, kept on each rank's own ZeRO-3 partition (no full gather per step).

Under ZeRO-3 a parameter's local shard is `param.ds_tensor`: rank r holds elements
[r*P, (r+1)*P) of the flattened parameter (P = ceil(numel / world), zero-padded). We keep an fp32
shadow of exactly that shard. Saved per rank with its layout, so a checkpoint can be reloaded on
a different world size (each new shard is cut from the old ones) and exported consolidated.
Without ZeRO-3 every rank holds whole parameters and rank 0's copy is the one saved.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.ds_tensor if hasattr(p, "ds_tensor") else p.data


def _numel(p) -> int:
    return int(p.ds_numel) if hasattr(p, "ds_numel") else p.numel()


def _shape(p) -> list[int]:
    return list(p.ds_shape) if hasattr(p, "ds_shape") else list(p.shape)


class EMA:
    def __init__(self, module: torch.nn.Module, decay: float, rank: int = 0, world: int = 1):
        self.decay, self.global_rank = decay, rank
        self.params = dict(module.named_parameters())
        self.partitioned = any(hasattr(p, "ds_tensor") for p in self.params.values())
        self.rank, self.world = (rank, world) if self.partitioned else (0, 1)
        self.shadow = {n: _local(p).detach().float().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))  # short warm-up: early weights are noise
        for n, p in self.params.items():
            self.shadow[n].lerp_(_local(p).float(), 1 - d)

    @contextmanager
    def applied(self):
        """The EMA weights in the model inside the block, the trained ones back after it, bit for bit (sampling and
        metrics with the EMA weights during training). Each rank writes its own shard; a ZeRO-3 parameter held whole
        as well (a persistent one, below stage3_param_persistence_threshold, which forwards never re-gather from the
        shards) also gets its whole EMA, gathered (a collective: every rank calls this)."""
        saved = {}
        with torch.no_grad():
            for n, p in self.params.items():
                local = _local(p)
                whole = self.partitioned and p.data.numel() == _numel(p)
                saved[n] = (local.clone(), p.data.clone() if whole else None)
                local.copy_(self.shadow[n].view_as(local))
                if whole:
                    p.data.copy_(self.gathered(n).view_as(p.data))
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    _local(p).copy_(saved[n][0])
                    if saved[n][1] is not None:
                        p.data.copy_(saved[n][1])

    def gathered(self, name: str) -> torch.Tensor:
        """One parameter's whole EMA (a collective under ZeRO-3: every rank must call it)."""
        shard, p = self.shadow[name], self.params[name]
        if not self.partitioned:
            return shard.clone()
        parts = [torch.empty_like(shard) for _ in range(self.world)]
        dist.all_gather(parts, shard)
        return torch.cat(parts)[: _numel(p)].view(_shape(p)).clone()

    # -- a checkpoint part: ema/rank00000.safetensors (+ layout.json written by rank 0) -----------
    def save(self, step_dir: Path) -> None:
        d = Path(step_dir) / "ema"
        d.mkdir(parents=True, exist_ok=True)
        if self.partitioned or self.global_rank == 0:
            save_file({n: t.contiguous() for n, t in self.shadow.items()}, str(d / f"rank{self.rank:05d}.safetensors"))
        if self.global_rank == 0:
            layout = {"world": self.world, "partitioned": self.partitioned,
                      "params": {n: {"numel": _numel(p), "shape": _shape(p)} for n, p in self.params.items()}}
            (d / "layout.json").write_text(json.dumps(layout))

    def load(self, step_dir: Path, saved_world: int | None = None) -> None:
        """From any world size: the saved layout says how the old shards cut the parameters."""
        d = Path(step_dir) / "ema"
        old = json.loads((d / "layout.json").read_text())
        if set(old["params"]) != set(self.shadow):
            raise ValueError(f"EMA in {d} has other parameters than the model")
        files = [safe_open(str(d / f"rank{r:05d}.safetensors"), "pt") for r in range(old["world"])]
        self.load_full(lambda n: torch.cat([f.get_tensor(n).flatten() for f in files])[: old["params"][n]["numel"]])

    def load_full(self, get: Callable[[str], torch.Tensor]) -> None:
        """From whole tensors, `get(name)` one at a time (flattened or shaped): each rank keeps its own shard."""
        for n, shard in self.shadow.items():
            flat = get(n).flatten().float()
            if self.partitioned:
                P = shard.numel()
                piece = flat[self.rank * P : (self.rank + 1) * P]
                shard.zero_()[: piece.numel()].copy_(piece)
            else:
                shard.copy_(flat.view_as(shard))

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Consolidated EMA weights (a collective under ZeRO-3: every rank must call it)."""
        return {n: self.gathered(n) for n in self.shadow}
