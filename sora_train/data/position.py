"""The data stream's position as one global fact, readable by any number of ranks and workers.

The stream of epoch e is fixed by (seed, e) alone: a permutation of the shard list, and inside
shard s a permutation of its samples. A sample is therefore named by (epoch, shard, index) with
no reference to who reads it. The position records which of those names the trainer has
*consumed* (trained on, or skipped as bad): per epoch, the shards finished and, for shards in
progress, the indices consumed. Samples sitting in a worker's pack buffer or prefetch queue are
not consumed, so they are read again after a resume.

Any data-parallel size can continue from it: shard j of epoch e's order goes to reading slot
j mod (dp_size * workers); finished shards are skipped, consumed indices are skipped. With the
same slot count and the saved worker rotation, the resumed batches are exactly the uninterrupted
run's (readers and packers are deterministic functions of the unconsumed stream).

Compared with the per-worker cursors of torchdata's StatefulDataLoader or a webdataset
sample count (which need the same world size and re-read what they skip), this costs a few
integer sets per shard in flight and works across world-size changes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SampleId = tuple[int, int, int]  # (epoch, shard, index in that shard's permuted order)


@dataclass
class ShardProgress:
    consumed: set[int] = field(default_factory=set)
    total: int | None = None  # known once a reader reached the shard's end

    @property
    def complete(self) -> bool:
        return self.total is not None and len(self.consumed) >= self.total


@dataclass
class StreamPosition:
    seed: int
    dataset: str  # fingerprint of the shard list
    epochs: dict[int, dict[int, ShardProgress]] = field(default_factory=dict)
    done: dict[int, set[int]] = field(default_factory=dict)  # epoch -> finished shards
    # Reading-slot layout this position was saved under and, per data-parallel rank, which of its
    # workers delivers next: only meaningful when resumed with the same layout.
    layout: tuple[int, int] | None = None
    rotation: dict[int, int] = field(default_factory=dict)

    # -- what readers ask ----------------------------------------------------------------
    def shard_done(self, epoch: int, shard: int) -> bool:
        return shard in self.done.get(epoch, ())

    def consumed_in(self, epoch: int, shard: int) -> set[int]:
        p = self.epochs.get(epoch, {}).get(shard)
        return set(p.consumed) if p else set()

    # -- what the consumer records --------------------------------------------------------
    def consume(self, ids: list[SampleId]) -> None:
        for epoch, shard, index in ids:
            if self.shard_done(epoch, shard):
                raise RuntimeError(f"sample {(epoch, shard, index)} consumed twice (its shard was finished)")
            progress = self._progress(epoch, shard)
            if index in progress.consumed:
                raise RuntimeError(f"sample {(epoch, shard, index)} consumed twice")
            progress.consumed.add(index)
            self._retire(epoch, shard)

    def shard_ended(self, epoch: int, shard: int, total: int) -> None:
        if not self.shard_done(epoch, shard):
            self._progress(epoch, shard).total = total
            self._retire(epoch, shard)

    def _progress(self, epoch: int, shard: int) -> ShardProgress:
        return self.epochs.setdefault(epoch, {}).setdefault(shard, ShardProgress())

    def _retire(self, epoch: int, shard: int) -> None:
        if self.epochs[epoch][shard].complete:
            del self.epochs[epoch][shard]
            self.done.setdefault(epoch, set()).add(shard)

    def consumed_count(self, epoch: int) -> int:
        return sum(len(p.consumed) for p in self.epochs.get(epoch, {}).values())

    # -- merging the ranks' views and (de)serialising -------------------------------------
    @classmethod
    def merge(cls, parts: list["StreamPosition"], base: "StreamPosition | None" = None) -> "StreamPosition":
        """One global position from every data-parallel rank's view. All ranks started from `base` (the
        resumed position, or empty); a sample consumed since then by two ranks is an error."""
        first = parts[0]
        if any((p.seed, p.dataset) != (first.seed, first.dataset) for p in parts):
            raise ValueError("cannot merge stream positions of different seeds or datasets")
        out = cls.from_state_dict(base.state_dict()) if base else cls(first.seed, first.dataset)
        out.layout = first.layout
        for p in parts:
            for e, shards in p.done.items():
                out.done.setdefault(e, set()).update(shards)
            out.rotation.update(p.rotation)
        start = {(e, s): set(prog.consumed) for e, shards in (base.epochs if base else {}).items()
                 for s, prog in shards.items()}
        for p in parts:
            for e, shards in p.epochs.items():
                for s, prog in shards.items():
                    if out.shard_done(e, s):
                        continue
                    mine = out._progress(e, s)
                    new = prog.consumed - start.get((e, s), set())
                    twice = mine.consumed & new - start.get((e, s), set())
                    if twice:
                        raise RuntimeError(f"epoch {e} shard {s}: samples {sorted(twice)[:5]} consumed by two ranks")
                    mine.consumed |= prog.consumed
                    mine.total = prog.total if prog.total is not None else mine.total
                    out._retire(e, s)
        for e, shards in out.epochs.items():  # the base's partial view of shards finished since
            for s in [s for s in shards if out.shard_done(e, s)]:
                del shards[s]
        return out

    def state_dict(self) -> dict:
        """Plain JSON types only (it is saved as JSON, never pickled)."""
        return {
            "seed": self.seed, "dataset": self.dataset,
            "layout": list(self.layout) if self.layout else None,
            "rotation": {str(k): v for k, v in self.rotation.items()},
            "done": {str(e): sorted(s) for e, s in self.done.items()},
            "epochs": {str(e): {str(s): {"consumed": sorted(p.consumed), "total": p.total} for s, p in shards.items()}
                       for e, shards in self.epochs.items() if shards},
        }

    @classmethod
    def from_state_dict(cls, d: dict) -> "StreamPosition":
        pos = cls(int(d["seed"]), d["dataset"], layout=tuple(d["layout"]) if d.get("layout") else None,
                  rotation={int(k): int(v) for k, v in d.get("rotation", {}).items()})
        pos.done = {int(e): set(s) for e, s in d.get("done", {}).items()}
        pos.epochs = {int(e): {int(s): ShardProgress(set(p["consumed"]), p["total"]) for s, p in shards.items()}
                      for e, shards in d.get("epochs", {}).items()}
        return pos
