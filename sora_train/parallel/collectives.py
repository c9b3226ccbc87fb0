"""Small values the ranks must agree on (a stop signal, a finite flag, the step's loss, validation sums).

They are reduced on the training device, over the one process group the run already has. The other way,
a group created as "cpu:gloo,cuda:nccl", would also take CPU tensors, but it builds a second (TCP)
communicator for the world and for every SP/DP subgroup, which costs start-up time and sockets at
thousands of ranks for a handful of scalars per step; the values are on the device already (the loss)
or one element (the flags), and `.tolist()` is the one host sync the trainer needs anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


def all_reduce_values(values: Sequence[float] | torch.Tensor, device: torch.device, op: str = "sum",
                      group=None) -> list[float]:
    """Reduces a few numbers over `group` (default: the world) on `device`; returns them on the host.
    float64: step counts and token totals stay exact, losses lose nothing to the sum."""
    if isinstance(values, torch.Tensor):
        t = values.detach().to(device=device, dtype=torch.float64).reshape(-1)
    else:
        t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t, op=OPS[op], group=group)
    return t.tolist()


def gather_rows(rows: torch.Tensor, device: torch.device, group=None) -> torch.Tensor:
    """Every rank's rows [n_r, D] (n_r may differ, 0 included; D the same) concatenated in rank order, on every
    rank, on the host. all_gather needs equal shapes: each rank pads to the largest n_r, and the padding is cut."""
    counts = [int(n) for n in all_reduce_values(_one_hot(rows.shape[0], group), device, group=group)]
    padded = torch.zeros(max(counts), rows.shape[1], dtype=rows.dtype, device=device)
    padded[: rows.shape[0]] = rows.to(device)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([p[:n] for p, n in zip(parts, counts)]).cpu()


def _one_hot(value: int, group) -> list[float]:
    """[0, .., value, .., 0] at this rank's place in `group`: summed over it, every rank's value."""
    out = [0.0] * dist.get_world_size(group)
    out[dist.get_rank(group)] = float(value)
    return out
