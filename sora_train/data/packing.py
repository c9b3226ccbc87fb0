"""Patch n' Pack: whole samples packed back to back into rows of a fixed token budget.

Per token: patch vector, (t,h,w) position, segment id (1..M; 0 = padding). Per sample slot:
latent grid (to unpatchify) and text states packed into the row's own text budget with the
same segment ids. A fixed budget keeps shapes static and makes sequence-parallel splits trivial.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from .position import SampleId


@dataclass
class Item:
    """One patchified sample waiting in a pack buffer."""

    sid: SampleId
    key: str
    tokens: torch.Tensor  # [n, patch_dim]
    pos: torch.Tensor  # [n, 3]
    grid: tuple[int, int, int]
    text: torch.Tensor  # [L, text_dim]
    caption: str

    @property
    def n(self) -> int:
        return self.tokens.shape[0]


@dataclass
class PackedBatch:
    tokens: torch.Tensor  # [R,S,patch_dim] float32
    pos: torch.Tensor  # [R,S,3] int64 (t,h,w) in patch units
    seg: torch.Tensor  # [R,S] int64, 1..M per sample, 0 = padding
    text: torch.Tensor  # [R,Lt,text_dim] float32
    text_seg: torch.Tensor  # [R,Lt] int64
    grids: torch.Tensor  # [R,M,3] int64 latent grid (patch units) per sample slot, 0 = empty
    keys: list[list[str]] = field(default_factory=list)
    captions: list[list[str]] = field(default_factory=list)
    # Bookkeeping for the stream position (consumed = packed here or skipped since the last batch).
    consumed: list[SampleId] = field(default_factory=list)
    ended: list[tuple[int, int, int]] = field(default_factory=list)  # (epoch, shard, total)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)  # (shard url, key, reason)
    reads: int = 0  # raw samples read since the last batch (for the bad fraction)
    worker: int = 0  # logical worker that produced it (to resume the DataLoader's rotation)

    def _tensors(self):
        return [f.name for f in fields(self) if isinstance(getattr(self, f.name), torch.Tensor)]

    def to(self, device, non_blocking: bool = False) -> "PackedBatch":
        for name in self._tensors():
            setattr(self, name, getattr(self, name).to(device, non_blocking=non_blocking))
        return self

    def pin_memory(self) -> "PackedBatch":  # called by DataLoader(pin_memory=True)
        for name in self._tensors():
            setattr(self, name, getattr(self, name).pin_memory())
        return self

    @property
    def extent(self) -> torch.Tensor:
        """[R,S,3]: the latent grid of each token's sample (padding gets slot 0's)."""
        idx = (self.seg - 1).clamp(min=0)[..., None].expand(-1, -1, 3)
        return torch.gather(self.grids, 1, idx)

    @property
    def real_tokens(self) -> int:
        return int((self.seg > 0).sum())


class Packer:
    """Deterministic packer over a lookahead buffer of `lookahead` samples (oldest first, then
    best-fit-decreasing).

    With `balance` (data.balance=cost) rows are balanced by estimated step cost, not only tokens: a row of
    one 60k-token clip costs several times a row of ten 6k-token clips with the same token count
    (models/flops.py: row_cost), and data-parallel ranks wait for the slowest. Every row runs all S tokens
    through the linear layers, padding included, so rows differ in cost by their attention, sum n_i^2, alone:
    each row aims at the attention a full row would carry if the buffer's samples were spread evenly
    (S * sum n^2 / sum n over the buffer). A first best-fit-decreasing pass takes only samples that keep the
    row at or under it, a second fills the tokens left smallest first (a real token in place of padding costs
    only its attention). Every rank's rows then cost about the same, so ranks balance without exchanging
    samples. A sample whose own attention exceeds the target makes its row heavy whatever the packer does
    (`sora-bench packing --lengths` shows both cases).

    A row is built only when the buffer is full (or at flush), and the buffer keeps insertion
    order, so its contents are a pure function of the unconsumed input sequence: this is what
    makes a resumed stream emit exactly the batches an uninterrupted one would.
    """

    def __init__(self, seq_len: int, text_len: int, rows: int, max_per_row: int, lookahead: int,
                 patch_dim: int, text_dim: int, balance: bool = False):
        self.S, self.Lt, self.R, self.M, self.K = seq_len, text_len, rows, max_per_row, lookahead
        self.patch_dim, self.text_dim, self.balance = patch_dim, text_dim, balance
        self.buffer: list[Item] = []
        self.rows: list[list[Item]] = []

    def add(self, item: Item) -> list[PackedBatch]:
        if item.n > self.S or item.text.shape[0] > self.Lt:
            raise ValueError(f"{item.key}: {item.n} tokens / {item.text.shape[0]} text tokens exceed the row budget")
        self.buffer.append(item)
        out = []
        while len(self.buffer) >= self.K:
            out += self._take_row()
        return out

    def flush(self) -> list[PackedBatch]:
        out = []
        while self.buffer:
            out += self._take_row()
        if self.rows:
            out.append(self._emit())
        return out

    def _take_row(self) -> list[PackedBatch]:
        """The oldest buffered sample opens the row (so no sample waits more than `lookahead` rows:
        plain best-fit-decreasing can starve a mid-size sample while larger ones keep arriving),
        then best-fit-decreasing fills the rest (under the attention target first, when balancing)."""
        chosen, room = [0], {"tokens": self.S - self.buffer[0].n, "text": self.Lt - self.buffer[0].text.shape[0]}
        by_size = sorted(range(1, len(self.buffer)), key=lambda i: -self.buffer[i].n)  # stable: ties keep order
        if self.balance:
            sizes = [it.n for it in self.buffer]
            room["attention"] = self.S * sum(n * n for n in sizes) / sum(sizes) - sizes[0] ** 2
            self._fill(chosen, by_size, room)
            del room["attention"]  # the second pass fills the tokens left, the least attention first
            by_size = by_size[::-1]
        self._fill(chosen, by_size, room)
        keep = set(chosen)
        self.rows.append([self.buffer[i] for i in sorted(chosen)])
        self.buffer = [it for i, it in enumerate(self.buffer) if i not in keep]
        return [self._emit()] if len(self.rows) == self.R else []

    def _fill(self, chosen: list[int], order: list[int], room: dict) -> None:
        """Adds, in `order`, each sample not yet chosen that fits every budget left in `room` (spent in place)."""
        for i in order:
            it = self.buffer[i]
            need = {"tokens": it.n, "text": it.text.shape[0], "attention": it.n * it.n}
            if i not in chosen and len(chosen) < self.M and all(need[k] <= left for k, left in room.items()):
                chosen.append(i)
                for k in room:
                    room[k] -= need[k]

    def _empty(self) -> PackedBatch:
        return self._emit()

    def _emit(self) -> PackedBatch:
        R = len(self.rows)
        b = PackedBatch(
            tokens=torch.zeros(R, self.S, self.patch_dim), pos=torch.zeros(R, self.S, 3, dtype=torch.long),
            seg=torch.zeros(R, self.S, dtype=torch.long), text=torch.zeros(R, self.Lt, self.text_dim),
            text_seg=torch.zeros(R, self.Lt, dtype=torch.long), grids=torch.zeros(R, self.M, 3, dtype=torch.long))
        for r, row in enumerate(self.rows):
            at, tat = 0, 0
            for j, it in enumerate(row):
                b.tokens[r, at : at + it.n] = it.tokens
                b.pos[r, at : at + it.n] = it.pos
                b.seg[r, at : at + it.n] = j + 1
                L = it.text.shape[0]
                b.text[r, tat : tat + L] = it.text
                b.text_seg[r, tat : tat + L] = j + 1
                b.grids[r, j] = torch.tensor(it.grid)
                at, tat = at + it.n, tat + L
            b.keys.append([it.key for it in row])
            b.captions.append([it.caption for it in row])
            b.consumed.extend(it.sid for it in row)
        self.rows = []
        return b


def unpack(batch: PackedBatch, values: torch.Tensor, patch, channels: int) -> list[list[torch.Tensor]]:
    """values [R,S,patch_dim] (e.g. model output) -> per row, per sample latent [C,T,H,W]."""
    from .patchify import unpatchify

    out = []
    for r in range(values.shape[0]):
        row = []
        for j in range(batch.grids.shape[1]):
            grid = tuple(int(g) for g in batch.grids[r, j])
            if grid[0] == 0:
                break
            row.append(unpatchify(values[r][batch.seg[r] == j + 1], grid, patch, channels))
        out.append(row)
    return out
