"""Weighted mixtures of shard sources (`data.sources`), drawn by tokens, resumable exactly.

Each reader (data-parallel rank x loader worker) reads its slot of every source's shards, as for one source, and
merges the sources by a token clock: a sample's clock is the tokens of its source that come before it in this
reader's order, divided by the source's weight. The reader always takes the sample with the smallest clock, so
over any window each source's share of *tokens* follows its weight (weighted fair queueing, by tokens: the
budget a packed row spends; by samples, a source of long clips would take a larger share of the compute than
its weight says). The clock is a pure function of the source's shard order and the manifest's token counts, so
after a resume the unconsumed samples come in the uninterrupted run's order; a source that runs out starts its
next epoch (its own permutation) and its clock runs on.

When the weights or the set of sources change on resume, the clocks restart from the tokens each source has
consumed by then (`base`): without it a source whose weight was lowered would wait until the others caught up
with its clock. Removing a source is refused (its position would be lost); weight 0 keeps it unread.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass, field

from .position import StreamPosition
from .shards import fingerprint, list_shards, load_manifest


@dataclass
class Source:
    """One source of a mixture, at run time."""

    name: str
    urls: list[str]
    weight: float
    shard_tokens: list[int]  # per shard, in url order: the manifest's token counts (the clock's units)
    shard_samples: list[int]
    dataset: str  # fingerprint (resume checks it)
    max_tokens: int | None = None  # per sample: longer ones are cropped in time (or skipped, data.oversize)
    max_frames: int | None = None  # per sample: latent frames kept from the start
    caption_dropout: float | None = None  # None: data.caption_dropout

    @property
    def seed_key(self) -> int:
        """Mixed into the source's shard and sample permutations: stable under renaming others or reordering."""
        return zlib.crc32(self.name.encode())

    @classmethod
    def of(cls, name: str, node) -> "Source":
        """From a `data.sources.<name>` node (SourceConfig's fields); the shards need their manifest.json."""
        cfg = source_config(name, node)
        urls = list_shards(cfg.train)
        manifest = load_manifest(cfg.train)
        if manifest is None:
            raise ValueError(f"data.sources.{name}: {cfg.train} has no manifest.json beside its shards; a mixture draws "
                             f"by tokens and takes each shard's token count from it (sora-encode writes it)")
        by_name = {s["shard"]: s for s in manifest["shards"]}
        names = [u.rsplit("/", 1)[-1] for u in urls]
        missing = [n for n in names if n not in by_name]
        if missing:
            raise ValueError(f"data.sources.{name}: shards {missing[:3]} are not in {cfg.train}'s manifest.json")
        patch_t = manifest.get("patch_size", [1])[0]
        return cls(name, urls, float(cfg.weight), [capped_tokens(by_name[n], cfg.max_frames, cfg.max_tokens, patch_t)
                                                   for n in names],
                   [int(by_name[n]["samples"]) for n in names], fingerprint(urls, manifest), cfg.max_tokens,
                   cfg.max_frames, cfg.caption_dropout)


def source_config(name: str, node):
    """A `data.sources.<name>` node checked against SourceConfig (the node itself is loosely typed: see
    DataConfig.sources), with its defaults; ValueError naming the source and what to write."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from .config import SourceConfig

    if not isinstance(node, (dict, DictConfig)):
        raise ValueError(f"data.sources.{name}={node!r}: a source is a mapping, e.g. "
                         f"+data.sources.{name}='{{train: {node if isinstance(node, str) else '/data/shards'}, weight: 0.5}}'")
    try:  # the schema's defaults and types
        cfg = OmegaConf.merge(OmegaConf.structured(SourceConfig), node)
        if OmegaConf.is_missing(cfg, "train"):
            raise ValueError("train (its shards) is not set, e.g. {train: /data/shards, weight: 0.5}")
    except (OmegaConfBaseException, ValueError) as e:
        raise ValueError(f"data.sources.{name}: {str(e).splitlines()[0]}") from None
    if cfg.weight < 0:
        raise ValueError(f"data.sources.{name}.weight={cfg.weight}: weights are >= 0")
    return cfg


def sources_of(cfg_sources) -> list[Source]:
    if not cfg_sources:
        raise ValueError("data.sources is empty")
    out = [Source.of(name, node) for name, node in cfg_sources.items()]
    if not any(s.weight > 0 for s in out):
        raise ValueError("data.sources: every weight is 0")
    return out


def consumed_tokens(source: Source, pos: StreamPosition) -> float:
    """Tokens of `source` the position has consumed, counted from the manifest (in-progress shards pro rata)."""
    total = sum(source.shard_tokens[s] for shards in pos.done.values() for s in shards)
    for shards in pos.epochs.values():
        for s, progress in shards.items():
            total += source.shard_tokens[s] * len(progress.consumed) / max(source.shard_samples[s], 1)
    return total


@dataclass
class MixturePosition:
    """The global position of a mixture: each source's StreamPosition, by name, and the clocks' base."""

    sources: dict[str, StreamPosition]
    weights: dict[str, float]  # the weights the clocks run with
    base: dict[str, float] = field(default_factory=dict)  # tokens consumed when the clocks last restarted
    layout: tuple[int, int] | None = None
    rotation: dict[int, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)  # this run's order: a sample id's first field indexes it

    @classmethod
    def fresh(cls, sources: list[Source], seed: int) -> "MixturePosition":
        return cls({s.name: StreamPosition(seed, s.dataset) for s in sources}, {s.name: s.weight for s in sources},
                   {s.name: 0.0 for s in sources}, names=[s.name for s in sources])

    def resumed_with(self, sources: list[Source], seed: int) -> "MixturePosition":
        """This saved position continued by `sources`: the same sources keep their positions; new ones start;
        other weights or new sources restart the clocks from what is consumed. Raises ValueError on a removed
        source, another dataset under a source's name, or another seed."""
        names = [s.name for s in sources]
        gone = sorted(set(self.sources) - set(names))
        if gone:
            raise ValueError(f"data.sources: the checkpoint's source(s) {gone} are missing; a resumed mixture keeps "
                             f"every source (set data.sources.<name>.weight=0 to stop reading one)")
        out = MixturePosition(dict(self.sources), dict(self.weights), dict(self.base), self.layout,
                              dict(self.rotation), names)
        for s in sources:
            pos = out.sources.get(s.name)
            if pos is None:
                out.sources[s.name] = StreamPosition(seed, s.dataset)
                continue
            if pos.dataset != s.dataset:
                raise ValueError(f"data.sources.{s.name}: the checkpoint's position belongs to another dataset "
                                 f"(fingerprint {pos.dataset}, now {s.dataset}); resume needs the same shards")
            if pos.seed != seed:
                raise ValueError(f"data.seed changed ({pos.seed} -> {seed}); the saved position is only meaningful "
                                 f"under the seed it was saved with")
        if {s.name: s.weight for s in sources} != self.weights:
            out.weights = {s.name: s.weight for s in sources}
            out.base = {s.name: consumed_tokens(s, out.sources[s.name]) for s in sources}
        return out

    # -- what the consumer records (sample ids carry the source's index in `names` first) ------------------
    def consume(self, ids) -> None:
        for src, *sid in ids:
            self.sources[self.names[src]].consume([tuple(sid)])

    def shard_ended(self, src: int, epoch: int, shard: int, total: int) -> None:
        self.sources[self.names[src]].shard_ended(epoch, shard, total)

    def of(self, src: int) -> StreamPosition:
        return self.sources[self.names[src]]

    # -- merging the ranks' views and (de)serialising -------------------------------------------------------
    @classmethod
    def merge(cls, parts: list["MixturePosition"], base: "MixturePosition | None" = None) -> "MixturePosition":
        first = parts[0]
        merged = {n: StreamPosition.merge([p.sources[n] for p in parts], base=base.sources[n] if base else None)
                  for n in first.sources}
        out = cls(merged, dict(first.weights), dict(first.base), first.layout, {}, list(first.names))
        for p in parts:
            out.rotation.update(p.rotation)
        return out

    def state_dict(self) -> dict:
        return {"mixture": {n: p.state_dict() for n, p in self.sources.items()}, "weights": self.weights,
                "base": self.base, "layout": list(self.layout) if self.layout else None,
                "rotation": {str(k): v for k, v in self.rotation.items()}, "names": self.names}

    @classmethod
    def from_state_dict(cls, d: dict) -> "MixturePosition":
        return cls({n: StreamPosition.from_state_dict(p) for n, p in d["mixture"].items()},
                   {n: float(w) for n, w in d["weights"].items()}, {n: float(b) for n, b in d["base"].items()},
                   tuple(d["layout"]) if d.get("layout") else None,
                   {int(k): int(v) for k, v in d.get("rotation", {}).items()}, list(d.get("names", [])))


def position_from_state_dict(d: dict):
    """A saved data position: a mixture's or one source's."""
    return MixturePosition.from_state_dict(d) if "mixture" in d else StreamPosition.from_state_dict(d)


def capped(t: int, per_t: int, max_frames: int | None, limit: int | None, patch_t: int = 1) -> int:
    """Tokens of a sample of `t` temporal patches of `per_t` tokens each, as trained: cut to max_frames latent
    frames, then cropped in time to `limit` tokens (what PackedStream.make_item does)."""
    if max_frames and t * patch_t > max_frames:
        t = max(max_frames // patch_t, 1)
    if limit and t * per_t > limit:
        t = limit // per_t
    return t * per_t


def capped_tokens(shard: dict, max_frames: int | None, max_tokens: int | None, patch_t: int = 1) -> int:
    """A manifest shard entry's tokens under a source's caps: its clock counts what is trained. From each sample's
    grid (sora-encode writes them); a manifest from before the grids has only the uncapped total."""
    if not (max_frames or max_tokens) or "grids" not in shard:
        return int(shard["tokens"])
    return sum(capped(t, per_t, max_frames, max_tokens, patch_t) for t, per_t in shard["grids"])


def sample_tokens(raw: dict, patch: tuple[int, int, int], limit: int, fallback: float,
                  max_frames: int | None = None) -> float:
    """A raw sample's token count as trained, from its json (latent_shape), without decoding the latent; `fallback`
    for a sample without one (the clock only needs to be deterministic, not exact)."""
    try:
        _, t, h, w = json.loads(raw["json"])["latent_shape"]
        return capped(t // patch[0], (h // patch[1]) * (w // patch[2]), max_frames, limit, patch[0])
    except (KeyError, ValueError, TypeError):
        return fallback
