"""Content-aware token routing in training: a share of each sample's tokens skips a span of blocks.

TREAD (Krause et al., ICCV 2025, arXiv 2501.04765) routes a random share of the tokens around the middle blocks;
they re-join the residual stream after the span unchanged, every token keeps its prediction and its loss, and
sampling runs the full model. Here the share is chosen by content, as run-length tokenisation (Choudhury et al.,
NeurIPS 2024, arXiv 2411.05222) finds repeated patches: by how little a token's clean latent patch changes from
the same place one latent frame earlier. A sample's first latent frame (and an image, which is one) has nothing
earlier to repeat, so it ranks last (the "key frame" of each run of static patches stays in the span); ties are
broken by a draw, so an image's tokens are routed at random.

Three pure functions of the batch and a generator (exact and elastic resume hold):
  temporal_change(tokens, pos, seg)          -> [B,S] each token's change (inf: no earlier frame, padding)
  choose_routed(change, seg, share, gen)      -> [B,S] bool, the routed tokens, floor(share * n) of each sample
  RouteLayout.of(routed, seg, chunks)         -> where the tokens that run the span sit, per sequence chunk
The model (dit.py) gathers the kept tokens before the span and scatters them back after it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SELECTIONS = ("redundancy", "random")


@dataclass
class RouteArgs:
    """`model.route`: which blocks the routed tokens skip in training, and how many tokens, chosen how.
    Changes no parameter: a stage may turn it on or off (init_from)."""

    share: float = 0.0  # of each sample's tokens routed around the span in training (0: off)
    start: int = 1  # the first block skipped (0-based)
    end: int = -1  # the first block after the span; negative: counted from the end (-1: the last block runs all)
    select: str = "redundancy"  # redundancy (least-changing patches first) | random

    @property
    def enabled(self) -> bool:
        return self.share > 0

    def span(self, depth: int) -> range:
        end = self.end + depth if self.end < 0 else self.end
        return range(self.start, end)

    def validate(self, depth: int) -> None:
        if not 0 <= self.share < 1:
            raise ValueError(f"model.route.share={self.share}: use a share in [0, 1) (0: routing off)")
        if self.select not in SELECTIONS:
            raise ValueError(f"model.route.select={self.select!r}: use one of {', '.join(SELECTIONS)}")
        span = self.span(depth)
        if self.enabled and not (0 <= span.start < span.stop <= depth):
            raise ValueError(f"model.route.start={self.start} model.route.end={self.end}: the span (blocks from "
                             f"start up to, not including, end) holds none of the {depth} blocks; e.g. start=1 end=-1 "
                             f"skips the 2nd to the second-to-last")


def temporal_change(tokens: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor) -> torch.Tensor:
    """Each token's change to the token at the same (h, w) one latent frame earlier in its sample: the RMS of the
    difference of their clean patch vectors over the RMS of the sample's tokens (comparable across codecs and
    brightness). tokens [B,S,P], pos [B,S,3] (t,h,w), seg [B,S] -> [B,S] float32; inf where there is no earlier
    frame (a sample's first, an image) and at padding.

    The earlier token is found by the layout patchify writes, a sample's tokens in (t,h,w) raster order: i - h*w
    for a grid of h*w tokens per frame; a token whose candidate is not at (t-1, h, w) of the same sample counts as
    having none, so another layout only loses routing, never routes a wrong token."""
    B, S, _ = tokens.shape
    x = tokens.float()
    real = seg > 0
    slots = int(seg.max()) + 1
    row_slot = seg + torch.arange(B, device=seg.device)[:, None] * slots
    count = torch.bincount(row_slot.flatten(), minlength=B * slots).float()
    power = torch.bincount(row_slot.flatten(), weights=x.pow(2).mean(-1).flatten(), minlength=B * slots)
    sample_rms = (power / count.clamp(min=1)).sqrt()[row_slot]  # [B,S]
    # tokens per frame of each token's sample: the positions' (h, w) extent, per sample
    hw = torch.zeros(B * slots, dtype=torch.long, device=seg.device)
    hw = hw.scatter_reduce(0, row_slot.flatten(), (pos[..., 1] + 1).flatten(), "amax")
    ww = torch.zeros_like(hw).scatter_reduce(0, row_slot.flatten(), (pos[..., 2] + 1).flatten(), "amax")
    per_frame = (hw * ww)[row_slot]  # [B,S]
    idx = torch.arange(S, device=seg.device).expand(B, S)
    prev = (idx - per_frame).clamp(min=0)
    prev_pos, prev_seg = pos.gather(1, prev[..., None].expand(B, S, 3)), seg.gather(1, prev)
    found = real & (pos[..., 0] > 0) & (prev_seg == seg) & (prev_pos == pos - pos.new_tensor([1, 0, 0])).all(-1)
    diff = (x - x.gather(1, prev[..., None].expand_as(x))).pow(2).mean(-1).sqrt()
    change = diff / sample_rms.clamp(min=1e-6)
    return torch.where(found, change, torch.full_like(change, float("inf")))


def choose_routed(change: torch.Tensor, seg: torch.Tensor, share: float, generator: torch.Generator | None = None
                  ) -> torch.Tensor:
    """The tokens that skip the span: floor(share * n) of each sample's n, the least-changing first (`change`:
    temporal_change's, or zeros for a random choice), ties by a draw from `generator`. Padding is never counted as
    routed (it skips the span anyway: RouteLayout keeps real tokens only). -> [B,S] bool."""
    B, S = seg.shape
    draw = torch.rand(B, S, generator=generator).to(seg.device)
    # lexicographic (segment, change, draw): stable sorts from the last key to the first
    order = torch.argsort(draw, dim=1, stable=True)
    order = order.gather(1, torch.argsort(change.gather(1, order), dim=1, stable=True))
    order = order.gather(1, torch.argsort(seg.gather(1, order), dim=1, stable=True))
    sorted_seg = seg.gather(1, order)
    slots = int(seg.max()) + 1
    counts = torch.zeros(B, slots, dtype=torch.long, device=seg.device).scatter_add_(1, seg, torch.ones_like(seg))
    first = counts.cumsum(1) - counts  # each segment's first place in the sorted row
    rank = torch.arange(S, device=seg.device) - first.gather(1, sorted_seg)
    quota = (counts.double() * share).floor().long()
    quota[:, 0] = 0
    routed_sorted = rank < quota.gather(1, sorted_seg)
    return torch.zeros_like(routed_sorted).scatter(1, order, routed_sorted)


def route_layout(args: RouteArgs, tokens: torch.Tensor, pos: torch.Tensor, seg: torch.Tensor,
                 generator: torch.Generator, chunks: int = 1) -> "RouteLayout | None":
    """A training micro-batch's routing (None when args.route is off): clean tokens [B,S,P], pos, seg of the full
    rows, the step's generator (drawn from only when routing is on), `chunks` sequence-parallel ranks."""
    if not args.enabled:
        return None
    change = temporal_change(tokens, pos, seg) if args.select == "redundancy" else torch.zeros(seg.shape)
    return RouteLayout.of(choose_routed(change, seg, args.share, generator), seg, chunks)


@dataclass
class RouteLayout:
    """Where the tokens that run the span sit: each sequence chunk (one per sequence-parallel rank; 1 without)
    keeps its real, unrouted tokens in order, then filler up to K, the most any chunk of the batch keeps, so every
    rank's inner blocks have the same size and the collectives theirs. index [B, chunks*K]: each kept token's place
    within its chunk (filler: 0); seg [B, chunks*K]: its segment id (filler: 0, padding).

    The span's rows then hold a sample's kept tokens in several runs with filler between them when chunks > 1;
    every attention backend takes such rows (varlen sorts them by segment: models/attention.py)."""

    index: torch.Tensor
    seg: torch.Tensor
    chunks: int = 1

    @classmethod
    def of(cls, routed: torch.Tensor, seg: torch.Tensor, chunks: int = 1) -> "RouteLayout":
        B, S = seg.shape
        if S % chunks:
            raise ValueError(f"rows of {S} tokens do not split into {chunks} sequence chunks")
        n = S // chunks
        keep = (~routed & (seg > 0)).view(B, chunks, n)
        K = max(int(keep.sum(-1).max()), 1)
        # kept tokens first, in order (a stable sort of "not kept"), then the chunk's others as filler
        order = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[..., :K]  # [B,chunks,K]
        filled = keep.gather(-1, order)
        index = torch.where(filled, order, torch.zeros_like(order))
        inner_seg = torch.where(filled, seg.view(B, chunks, n).gather(-1, order), torch.zeros_like(order))
        return cls(index.reshape(B, chunks * K), inner_seg.reshape(B, chunks * K), chunks)

    def chunk(self, rank: int) -> "RouteLayout":
        """The part one sequence-parallel rank holds (its own chunk's kept tokens)."""
        if self.chunks == 1:
            return self
        return RouteLayout(self.index.chunk(self.chunks, 1)[rank], self.seg.chunk(self.chunks, 1)[rank], 1)

    def to(self, device) -> "RouteLayout":
        return RouteLayout(self.index.to(device), self.seg.to(device), self.chunks)


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B,S,...] -> [B,K,...] at index [B,K]."""
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(*index.shape, *x.shape[2:]))


def scatter_tokens(outer: torch.Tensor, inner: torch.Tensor, layout: RouteLayout) -> torch.Tensor:
    """outer [B,S,D] with the span's outputs inner [B,K,D] written at the kept places (filler dropped): the routed
    tokens re-join the residual stream as they left it."""
    B, S, D = outer.shape
    target = torch.where(layout.seg > 0, layout.index, torch.full_like(layout.index, S))  # filler -> a spare row
    wide = torch.cat([outer, outer.new_zeros(B, 1, D)], 1)
    return wide.scatter(1, target[..., None].expand(-1, -1, D), inner)[:, :S]
