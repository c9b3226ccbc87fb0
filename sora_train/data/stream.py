"""The per-rank, per-worker packed stream: read shards in the global order, decode, patchify, pack."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .decode import BadSample, decode_clip
from .packing import Item, PackedBatch, Packer
from .patchify import patchify
from .position import StreamPosition

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    """Everything that fixes the stream: the loader's slice of the run config (`data.*` and the model's patch
    and widths), with no defaults of its own (DataConfig holds them; StreamSpec.of builds one from the config)."""

    seq_len: int
    text_len: int
    rows: int  # rows per micro-batch
    max_per_row: int
    lookahead: int
    seed: int
    epochs: int | None  # None: stream forever, epoch after epoch
    caption_dropout: float
    oversize: str  # crop_time | skip
    patch: tuple[int, int, int]
    channels: int
    text_dim: int

    @classmethod
    def of(cls, data, model, **override) -> "StreamSpec":
        """From the `data` and `model` config nodes; `override` replaces fields (validation: epochs=1, ...)."""
        kw = dict(seq_len=data.seq_len, text_len=data.text_len, rows=data.rows, max_per_row=data.max_per_row,
                  lookahead=data.lookahead, seed=data.seed, epochs=None, caption_dropout=data.caption_dropout,
                  oversize=data.oversize, patch=tuple(model.patch_size), channels=model.in_channels,
                  text_dim=model.text_dim)
        return cls(**{**kw, **override})


def permutation(n: int, *key: int) -> np.ndarray:
    return np.random.default_rng([abs(int(k)) for k in key]).permutation(n)


def read_shard(url: str, on_error) -> list[dict]:
    """All raw samples of one shard (bytes, undecoded). A broken tar ends the shard where it breaks."""
    def handler(exn: Exception) -> bool:
        on_error(url, "<tar>", f"{type(exn).__name__}: {exn}")
        return False  # stop reading this shard: a broken tar stream cannot be resynchronised

    return list(wds.tarfile_to_samples(handler=handler)([{"url": url}]))


class NoUsableSamples(RuntimeError):
    """A reader went through a whole epoch of its shards without one sample it could train on."""


def check_readers(n_shards: int, dp_size: int, workers: int) -> None:
    """An endless stream needs a shard for every reader (data-parallel rank x loader worker): a reader with none
    would wait forever for a first batch while the other ranks block in their first collective."""
    readers = dp_size * max(workers, 1)
    if n_shards < readers:
        raise ValueError(f"{n_shards} shard(s) for {readers} readers (data-parallel size {dp_size} x data.num_workers="
                         f"{max(workers, 1)}): every reader needs at least one shard. Lower data.num_workers, or "
                         f"re-encode with more, smaller shards (sora-encode --clips-per-shard)")


class PackedStream(IterableDataset):
    def __init__(self, urls: list[str], spec: StreamSpec, dp_rank: int, dp_size: int, position: StreamPosition):
        self.urls, self.spec, self.dp_rank, self.dp_size = urls, spec, dp_rank, dp_size
        self.position = StreamPosition.from_state_dict(position.state_dict())  # private copy: the consumer updates its own

    def __iter__(self):
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        rotation = self.position.rotation.get(self.dp_rank, 0) if self.position.layout == (self.dp_size, workers) else 0
        logical = (wid + rotation) % workers
        torch.set_num_threads(1) if info else None
        yield from self.batches(self.dp_rank * workers + logical, self.dp_size * workers, logical)

    def batches(self, slot: int, num_slots: int, worker: int):
        spec, pos, n_shards = self.spec, self.position, len(self.urls)
        packer = Packer(spec.seq_len, spec.text_len, spec.rows, spec.max_per_row, spec.lookahead,
                        spec.channels * int(np.prod(spec.patch)), spec.text_dim)
        pending = {"consumed": [], "ended": [], "skipped": [], "reads": 0}

        def skip(url, key, reason, sid=None):
            log.warning("skipping sample %s in %s: %s", key, url, reason)
            pending["skipped"].append((url, key, reason))
            if sid is not None:
                pending["consumed"].append(sid)

        def attach(b: PackedBatch) -> PackedBatch:
            b.consumed += pending["consumed"]
            b.ended, b.skipped, b.reads, b.worker = pending["ended"], pending["skipped"], pending["reads"], worker
            pending.update(consumed=[], ended=[], skipped=[], reads=0)
            return b

        epoch = 0
        while len(pos.done.get(epoch, ())) >= n_shards:
            epoch += 1
        while spec.epochs is None or epoch < spec.epochs:
            reads, usable, last_reason = 0, 0, None
            for j, shard in enumerate(permutation(n_shards, spec.seed, epoch)):
                shard = int(shard)
                if j % num_slots != slot or pos.shard_done(epoch, shard):
                    continue
                url, seen = self.urls[shard], pos.consumed_in(epoch, shard)
                raws = read_shard(url, skip)
                for idx, r in enumerate(permutation(len(raws), spec.seed, epoch, shard)):
                    if idx in seen:
                        continue
                    pending["reads"] += 1
                    reads += 1
                    sid, raw = (epoch, shard, idx), raws[int(r)]
                    try:
                        item = self.make_item(sid, raw)
                    except BadSample as e:
                        skip(url, raw.get("__key__", "?"), str(e), sid)
                        last_reason = f"{raw.get('__key__', '?')} in {url}: {e}"
                        continue
                    usable += 1
                    for b in packer.add(item):
                        yield attach(b)
                pending["ended"].append((epoch, shard, len(raws)))
            if reads and not usable:  # endless epochs of nothing: fail now, with the reason, instead of spinning
                raise NoUsableSamples(f"none of the {reads} samples of epoch {epoch} in this reader's shards could be "
                                      f"trained on (data-parallel rank {self.dp_rank}); the last: {last_reason}. "
                                      f"Check data.seq_len / data.oversize against the samples' sizes (sora-inspect)")
            epoch += 1
        for b in packer.flush():
            yield attach(b)
        if any(pending[k] for k in ("consumed", "ended", "skipped")):  # bookkeeping with no rows left to carry it
            yield attach(packer._empty())

    def make_item(self, sid, raw: dict) -> Item:
        spec = self.spec
        clip = decode_clip(raw, spec.channels, spec.text_dim, spec.patch)
        latent = torch.from_numpy(clip.latent)
        tokens, positions = patchify(latent, spec.patch)
        grid = tuple(s // p for s, p in zip(latent.shape[1:], spec.patch))
        if tokens.shape[0] > spec.seq_len:
            per_t = grid[1] * grid[2]
            keep = spec.seq_len // per_t
            if spec.oversize != "crop_time" or keep == 0:
                raise BadSample(f"{tokens.shape[0]} tokens exceed the budget of {spec.seq_len} (oversize={spec.oversize})")
            tokens, positions, grid = tokens[: keep * per_t], positions[: keep * per_t], (keep, grid[1], grid[2])
        text, caption = torch.from_numpy(clip.text[: spec.text_len]), clip.caption
        drop = np.random.default_rng([spec.seed, *sid, 1]).random() < spec.caption_dropout
        if drop:  # the unconditional "caption": one zero vector, also what the sampler feeds for CFG
            text, caption = torch.zeros(1, spec.text_dim), ""
        return Item(sid, clip.key, tokens, positions, grid, text, caption)
