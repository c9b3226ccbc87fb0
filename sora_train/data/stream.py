"""The per-rank, per-worker packed stream: read shards in the global order, decode, patchify, pack."""

from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import IterableDataset, get_worker_info

from .decode import BadSample, decode_clip
from .mixture import sample_tokens
from .packing import Item, PackedBatch, Packer
from .patchify import patchify

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
    caption_mix: tuple[tuple[str, float], ...] = ()  # data.caption_mix as (key, share) pairs
    balance: bool = False  # data.balance == "cost": rows balanced by attention cost (packing.Packer)

    @classmethod
    def of(cls, data, model, **override) -> "StreamSpec":
        """From the `data` and `model` config nodes; `override` replaces fields (validation: epochs=1, ...)."""
        kw = dict(seq_len=data.seq_len, text_len=data.text_len, rows=data.rows, max_per_row=data.max_per_row,
                  lookahead=data.lookahead, seed=data.seed, epochs=None, caption_dropout=data.caption_dropout,
                  oversize=data.oversize, patch=tuple(model.patch_size), channels=model.in_channels,
                  text_dim=model.text_dim, caption_mix=tuple((k, float(v)) for k, v in data.caption_mix.items()),
                  balance=data.balance == "cost")
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
    """One source (`urls`, a StreamPosition), or a mixture (`sources`, a MixturePosition: mixture.py) whose sample
    ids carry the source's index first."""

    def __init__(self, urls: list[str], spec: StreamSpec, dp_rank: int, dp_size: int, position,
                 sources: list | None = None):
        self.urls, self.spec, self.dp_rank, self.dp_size, self.sources = urls, spec, dp_rank, dp_size, sources
        self.position = type(position).from_state_dict(position.state_dict())  # private copy: the consumer updates its own

    def __iter__(self):
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info else (1, 0)
        rotation = self.position.rotation.get(self.dp_rank, 0) if self.position.layout == (self.dp_size, workers) else 0
        logical = (wid + rotation) % workers
        torch.set_num_threads(1) if info else None
        yield from self.batches(self.dp_rank * workers + logical, self.dp_size * workers, logical)

    def batches(self, slot: int, num_slots: int, worker: int):
        spec = self.spec
        packer = Packer(spec.seq_len, spec.text_len, spec.rows, spec.max_per_row, spec.lookahead,
                        spec.channels * int(np.prod(spec.patch)), spec.text_dim, spec.balance)
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

        if self.sources is None:
            items = (item for _, item in self.source_items(None, slot, num_slots, skip, pending))
        else:  # the smallest token clock first (mixture.py); ties: the source listed first
            items = (item for _, _, item in heapq.merge(
                *[((clock, i, item) for clock, item in self.source_items(i, slot, num_slots, skip, pending))
                  for i, src in enumerate(self.sources) if src.weight > 0], key=lambda e: e[:2]))
        for item in items:
            for b in packer.add(item):
                yield attach(b)
        for b in packer.flush():
            yield attach(b)
        if any(pending[k] for k in ("consumed", "ended", "skipped")):  # bookkeeping with no rows left to carry it
            yield attach(packer._empty())

    def source_items(self, src: int | None, slot: int, num_slots: int, skip, pending):
        """(clock, item) for the samples of one source in this reader's order, from its position on; src None:
        the one source of a plain stream (no clock)."""
        spec = self.spec
        source = None if src is None else self.sources[src]
        urls, pos = (self.urls, self.position) if source is None else (source.urls, self.position.of(src))
        key = () if source is None else (source.seed_key,)  # a mixture's sources: permutations of their own
        tag = (lambda *t: t) if source is None else (lambda *t: (src, *t))  # noqa: E731
        n_shards = len(urls)
        epoch = 0
        while len(pos.done.get(epoch, ())) >= n_shards:
            epoch += 1
        clock = 0.0 if source is None else self.clock_at(source, epoch, slot, num_slots, key)
        base = 0.0 if source is None else self.position.base.get(source.name, 0.0) / num_slots
        while spec.epochs is None or epoch < spec.epochs:
            reads, usable, last_reason, held, visited, resumed_past = 0, 0, None, 0, 0, False
            for j, shard in enumerate(permutation(n_shards, spec.seed, *key, epoch)):
                shard = int(shard)
                if j % num_slots != slot:
                    continue
                shard_start = clock
                clock += 0.0 if source is None else source.shard_tokens[shard]
                visited += 1
                if pos.shard_done(epoch, shard):
                    resumed_past = True
                    continue
                url, seen = urls[shard], pos.consumed_in(epoch, shard)
                raws = read_shard(url, skip)
                held += len(raws)
                order = [int(r) for r in permutation(len(raws), spec.seed, *key, epoch, shard)]
                within = self.clocks_within(source, shard, [raws[r] for r in order]) if source else None
                for idx, r in enumerate(order):
                    if idx in seen:
                        continue
                    pending["reads"] += 1
                    reads += 1
                    sid, raw = tag(epoch, shard, idx), raws[r]
                    try:
                        item = self.make_item(sid, raw, source)
                    except BadSample as e:
                        skip(url, raw.get("__key__", "?"), str(e), sid)
                        last_reason = f"{raw.get('__key__', '?')} in {url}: {e}"
                        continue
                    usable += 1
                    yield (0.0 if source is None else (shard_start + within[idx] - base) / source.weight), item
                pending["ended"].append(tag(epoch, shard, len(raws)))
            if visited and not held and not resumed_past:  # shards of no samples (an encode where every clip failed)
                where = "" if source is None else f" of source {source.name!r}"
                raise NoUsableSamples(f"this reader's shards{where} hold no samples (data-parallel rank "
                                      f"{self.dp_rank}: {', '.join(urls[int(s)] for s in permutation(n_shards, spec.seed, *key, epoch)[slot::num_slots][:3])}"
                                      f"); an encode where every clip failed writes such shards (its failures.jsonl "
                                      f"says why)")
            if reads and not usable:  # endless epochs of nothing: fail now, with the reason, instead of spinning
                where = "" if source is None else f" of source {source.name!r}"
                raise NoUsableSamples(f"none of the {reads} samples of epoch {epoch}{where} in this reader's shards "
                                      f"could be trained on (data-parallel rank {self.dp_rank}); the last: "
                                      f"{last_reason}. Check data.seq_len / data.oversize against the samples' "
                                      f"sizes (sora-inspect)")
            epoch += 1

    def clock_at(self, source, epoch: int, slot: int, num_slots: int, key) -> float:
        """The clock (in tokens) at the start of `epoch`: this slot's shards of every earlier epoch."""
        n = len(source.urls)
        return float(sum(source.shard_tokens[int(s)] for e in range(epoch)
                         for j, s in enumerate(permutation(n, self.spec.seed, *key, e)) if j % num_slots == slot))

    def clocks_within(self, source, shard: int, raws: list[dict]) -> list[float]:
        """Each sample's offset in its shard's share of the clock: the tokens before it, scaled so the shard spans
        its manifest token count (clocks stay increasing from shard to shard)."""
        limit = min(self.spec.seq_len, source.max_tokens or self.spec.seq_len)
        total, n = source.shard_tokens[shard], max(len(raws), 1)
        sizes = [sample_tokens(r, self.spec.patch, limit, total / n, source.max_frames) for r in raws]
        scale, out, at = total / max(sum(sizes), 1e-9), [], 0.0
        for size in sizes:
            out.append(at * scale)
            at += size
        return out

    def caption_members(self, sid, raw: dict) -> tuple[str, str]:
        """The (states, text) members of the caption data.caption_mix draws for this sample, from its identity."""
        if not self.spec.caption_mix:
            return "text.npy", "txt"
        names, shares = zip(*self.spec.caption_mix)
        key = names[np.random.default_rng([self.spec.seed, *sid, 3]).choice(len(names), p=np.divide(shares, sum(shares)))]
        return (f"text_{key}.npy", f"{key}.txt") if f"text_{key}.npy" in raw else ("text.npy", "txt")

    def make_item(self, sid, raw: dict, source=None) -> Item:
        """source: a mixture's source, with its own caps and caption dropout."""
        spec = self.spec
        clip = decode_clip(raw, spec.channels, spec.text_dim, spec.patch, *self.caption_members(sid, raw))
        latent = torch.from_numpy(clip.latent)
        if source is not None and source.max_frames and latent.shape[1] > source.max_frames:
            latent = latent[:, : max(source.max_frames // spec.patch[0], 1) * spec.patch[0]]
        tokens, positions = patchify(latent, spec.patch)
        grid = tuple(s // p for s, p in zip(latent.shape[1:], spec.patch))
        limit = min(spec.seq_len, (source.max_tokens if source is not None else None) or spec.seq_len)
        if tokens.shape[0] > limit:
            per_t = grid[1] * grid[2]
            keep = limit // per_t
            if spec.oversize != "crop_time" or keep == 0:
                raise BadSample(f"{tokens.shape[0]} tokens exceed the budget of {limit} (oversize={spec.oversize})")
            tokens, positions, grid = tokens[: keep * per_t], positions[: keep * per_t], (keep, grid[1], grid[2])
        text, caption = torch.from_numpy(clip.text[: spec.text_len]), clip.caption
        dropout = spec.caption_dropout if source is None or source.caption_dropout is None else source.caption_dropout
        drop = np.random.default_rng([spec.seed, *sid, 1]).random() < dropout
        if drop:  # the unconditional "caption": one zero vector, also what the sampler feeds for CFG
            text, caption = torch.zeros(1, spec.text_dim), ""
        return Item(sid, clip.key, tokens, positions, grid, text, caption)
