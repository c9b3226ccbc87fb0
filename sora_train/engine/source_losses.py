"""loss/<source> for a mixture (data.sources): each source's token-weighted mean loss over the log window, over
every rank's samples, so a user sees what each part of the mixture is learning (the token shares are the
loader's: data/token_share/<source>)."""

from __future__ import annotations

import torch

from ..parallel.collectives import all_reduce_values


class SourceLosses:
    def __init__(self, names: list[str] | None, device: torch.device):
        self.names, self.device = names or [], device
        self.reset()

    @property
    def enabled(self) -> bool:
        return bool(self.names)

    def reset(self) -> None:
        self.sums = torch.zeros(2, len(self.names), device=self.device)  # errors, tokens

    def add(self, errors: torch.Tensor, seg: torch.Tensor, batch) -> None:
        """errors, seg [B,S] of this rank's (SP shard of the) rows; the batch's sample ids carry each packed
        sample's source first, row by row."""
        if not self.enabled:
            return
        source_of_slot = torch.full(batch.seg.shape[:1] + (batch.grids.shape[1] + 1,), -1, dtype=torch.long)
        ids = iter(batch.consumed)
        for r, row in enumerate(batch.keys):
            for j in range(len(row)):
                source_of_slot[r, j + 1] = next(ids)[0]
        source = torch.gather(source_of_slot.to(seg.device), 1, seg)  # [B,S], -1 on padding
        real = source >= 0
        self.sums[0].index_add_(0, source[real], errors.detach()[real].float())
        self.sums[1].index_add_(0, source[real], torch.ones_like(errors[real], dtype=torch.float32))

    def summary(self) -> dict[str, float]:
        """Collective (every rank, at the same step); then starts a new window."""
        if not self.enabled:
            return {}
        values = all_reduce_values(self.sums.flatten(), self.device)
        n = len(self.names)
        self.reset()
        return {f"loss/{name}": values[i] / values[n + i] for i, name in enumerate(self.names) if values[n + i] > 0}
