"""The trainer-facing loader of one data-parallel rank: batches in, stream position kept.

Members of one sequence-parallel group build it with the same dp_rank and so receive identical
batches. The position is updated only for batches handed to the trainer, so what sits in
prefetch queues or pack buffers is never lost or counted twice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch.utils.data import DataLoader

from .config import DataConfig
from .packing import PackedBatch
from .mixture import MixturePosition, Source
from .position import StreamPosition
from .shards import fingerprint, list_shards, load_manifest
from .stream import PackedStream, StreamSpec, check_readers


class DataQualityError(RuntimeError):
    """Too many bad samples: the data is broken, not unlucky."""


@dataclass
class DataStats:
    reads: int = 0
    skipped: int = 0
    by_shard: Counter = field(default_factory=Counter)
    recent: list = field(default_factory=list)  # last few (url, key, reason)
    tokens_by_source: Counter = field(default_factory=Counter)  # a mixture's: trained tokens per source

    def as_metrics(self) -> dict:
        total = sum(self.tokens_by_source.values())
        return {"data/skipped": self.skipped, "data/reads": self.reads,
                "data/bad_fraction": self.skipped / max(self.reads, 1),
                **{f"data/token_share/{n}": v / total for n, v in sorted(self.tokens_by_source.items())}}


class PackedLoader:
    def __init__(self, sources, spec: StreamSpec, dp_rank: int = 0, dp_size: int = 1, num_workers: int = 0,
                 position: dict | None = None, max_bad_fraction: float = DataConfig.max_bad_fraction,
                 min_reads_for_check: int = DataConfig.min_reads_for_check, prefetch_factor: int = 2,
                 pin_memory: bool = False):
        """sources: shard source(s) (a directory, brace pattern, pipe: commands), or a mixture's list of
        mixture.Source (data.sources)."""
        mixed = isinstance(sources, (list, tuple)) and bool(sources) and isinstance(sources[0], Source)
        self.mixture = list(sources) if mixed else None
        self.urls = [] if mixed else list_shards(sources)
        self.spec, self.dp_rank, self.dp_size = spec, dp_rank, dp_size
        self.workers = max(num_workers, 1)
        if spec.epochs is None:  # a finite pass (validation) may leave a reader without a shard: it yields nothing
            for name, n in ([(s.name, len(s.urls)) for s in self.mixture] if mixed else [(None, len(self.urls))]):
                try:
                    check_readers(n, dp_size, num_workers)
                except ValueError as e:
                    raise ValueError(f"source {name!r}: {e}" if name else str(e)) from None
        self.max_bad_fraction, self.min_reads = max_bad_fraction, min_reads_for_check
        self.dataset_id = None if mixed else fingerprint(self.urls, load_manifest(sources))
        self.pin_memory, self.prefetch_factor, self.num_workers = pin_memory, prefetch_factor, num_workers
        self.stats = DataStats()
        self.load_state_dict(position)

    def load_state_dict(self, position: dict | None) -> None:
        """Start (again) at a saved position: before iterating. The position must be this dataset's, under this seed."""
        spec = self.spec
        if self.mixture is not None:
            self.position = self._mixture_position(position)
        elif position is None:
            self.position = StreamPosition(spec.seed, self.dataset_id)
        else:
            if "mixture" in position:
                raise ValueError("the checkpoint's data position is a mixture's (data.sources); this run reads one "
                                 "source (data.train): resume with the checkpoint's data.sources")
            self.position = StreamPosition.from_state_dict(position)
            # Positions saved before datasets were identified by content carry the names-only fingerprint.
            if self.position.dataset not in (self.dataset_id, fingerprint(self.urls)):
                raise ValueError(f"the checkpoint's data position belongs to another dataset (fingerprint "
                                 f"{self.position.dataset}, now {self.dataset_id}: other shards, or the same names "
                                 f"with other contents); resume needs the same dataset, or start a new out_dir")
            if self.position.seed != spec.seed:
                raise ValueError(f"data.seed changed ({self.position.seed} -> {spec.seed}); the saved position "
                                 "is only meaningful under the seed it was saved with")
        self.start = type(self.position).from_state_dict(self.position.state_dict())  # common to all ranks
        stream = PackedStream(self.urls, spec, self.dp_rank, self.dp_size, self.position, self.mixture)
        self.dataloader = DataLoader(stream, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                                     prefetch_factor=self.prefetch_factor if self.num_workers else None,
                                     persistent_workers=False)
        self.position.layout = (self.dp_size, self.workers)

    def _mixture_position(self, position: dict | None) -> MixturePosition:
        if position is None:
            return MixturePosition.fresh(self.mixture, self.spec.seed)
        if "mixture" not in position:
            raise ValueError("the checkpoint's data position is one source's (data.train); this run reads a mixture "
                             "(data.sources): resume with the checkpoint's data.train, or start a new out_dir")
        return MixturePosition.from_state_dict(position).resumed_with(self.mixture, self.spec.seed)

    def __iter__(self):
        for batch in self.dataloader:
            self.record(batch)
            if batch.tokens.shape[0]:
                yield batch

    def record(self, b: PackedBatch) -> None:
        self.position.consume(b.consumed)
        for ended in b.ended:
            self.position.shard_ended(*ended)
        if self.mixture is not None:  # tokens per source: the packed samples come first in `consumed`, row by row
            sizes = [int(b.grids[r, j].prod()) for r, row in enumerate(b.keys) for j in range(len(row))]
            for sid, n in zip(b.consumed, sizes):
                self.stats.tokens_by_source[self.mixture[sid[0]].name] += n
        self.position.rotation[self.dp_rank] = (b.worker + 1) % self.workers
        self.stats.reads += b.reads
        self.stats.skipped += len(b.skipped)
        for url, key, reason in b.skipped:
            self.stats.by_shard[url] += 1
        self.stats.recent = (self.stats.recent + list(b.skipped))[-20:]
        if self.stats.reads >= self.min_reads and self.stats.skipped > self.max_bad_fraction * self.stats.reads:
            worst = ", ".join(f"{u} ({n})" for u, n in self.stats.by_shard.most_common(10))
            raise DataQualityError(
                f"{self.stats.skipped} of {self.stats.reads} samples were bad (> data.max_bad_fraction="
                f"{self.max_bad_fraction}); shards with bad samples: {worst}. Last: {self.stats.recent[-1]}")

    def state_dict(self) -> dict:
        """This rank's view of the position (StreamPosition.merge makes the global one from every rank's)."""
        return self.position.state_dict()
