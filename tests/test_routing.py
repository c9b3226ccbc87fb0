"""Content-aware routing (model.route): which tokens skip the span, the routed forward against a reference that runs
the span on each row's kept tokens alone, every attention backend on the span's rows, FLOPs, compile."""

import dataclasses

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sora_train.data import patchify
from sora_train.models import DiT, DiTArgs
from sora_train.models.attention import NaiveAttention, build_attention
from sora_train.models.flops import block_flops, forward_flops
from sora_train.models.routing import RouteArgs, RouteLayout, choose_routed, route_layout, temporal_change
from conftest import GRAPH_BACKEND

ARGS = DiTArgs(in_channels=8, patch_size=(1, 2, 2), dim=48, depth=4, heads=4, text_dim=16, max_segments=8,
               attention="naive", frac_pos=True, route=RouteArgs(share=0.5, start=1, end=-1))


def clip(grid, static_places=(), seed=0):
    """A latent whose patches at `static_places` ((h, w) in patch units) are the same in every frame and whose other
    patches change each frame -> (tokens, pos)."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    latent = torch.randn(ARGS.in_channels, t, h * 2, w * 2, generator=g)
    for ph, pw in static_places:
        latent[:, :, ph * 2:ph * 2 + 2, pw * 2:pw * 2 + 2] = latent[:, :1, ph * 2:ph * 2 + 2, pw * 2:pw * 2 + 2]
    return patchify(latent, ARGS.patch_size)


def packed_row(samples, seq_len):
    """[(tokens, pos)] -> x [1,S,P], pos [1,S,3], seg [1,S] (padding at the end)."""
    x = torch.zeros(1, seq_len, ARGS.patch_dim)
    pos, seg = torch.zeros(1, seq_len, 3, dtype=torch.long), torch.zeros(1, seq_len, dtype=torch.long)
    at = 0
    for j, (tokens, p) in enumerate(samples):
        n = tokens.shape[0]
        x[0, at:at + n], pos[0, at:at + n], seg[0, at:at + n] = tokens, p, j + 1
        at += n
    return x, pos, seg


def batch(seed=0):
    """Two packed rows of clips and an image, with padding: x, t, pos, seg, text, text_seg, extent."""
    static = [(0, 0), (0, 1), (1, 2)]
    rows = [packed_row([clip((3, 2, 3), static, seed), clip((1, 3, 2), seed=seed + 1)], 32),
            packed_row([clip((2, 2, 2), seed=seed + 2), clip((4, 1, 3), [(0, 1)], seed + 3)], 32)]
    x, pos, seg = (torch.cat(parts) for parts in zip(*rows))
    g = torch.Generator().manual_seed(seed)
    text_seg = torch.tensor([[1, 1, 1, 2, 2, 0], [1, 1, 2, 2, 2, 2]])
    extent = torch.zeros_like(pos)
    for r in range(2):
        for j in range(1, int(seg[r].max()) + 1):
            extent[r, seg[r] == j] = pos[r, seg[r] == j].amax(0) + 1
    return (x, torch.rand(2, 3, generator=g), pos, seg, torch.randn(2, 6, ARGS.text_dim, generator=g), text_seg,
            extent)


def trained_model(args=ARGS, seed=0):
    torch.manual_seed(seed)
    model = DiT(args)
    with torch.no_grad():  # adaLN-Zero starts every block as the identity: give the blocks something to do
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


class SpanOnKeptTokens(nn.Module):
    """The reference: a block of the span run on each row's kept tokens alone (a boolean selection, a row of its
    own, naive attention over its own segment mask); the routed tokens pass it unchanged."""

    def __init__(self, block, keep, seg, text_seg):
        super().__init__()
        self.block, self.keep, self.seg, self.text_seg = block, keep, seg, text_seg

    def forward(self, h, c, sample_of_token, rope, attention, self_mask, txt, cross_attention, cross_mask):
        naive, rows = NaiveAttention(), []
        for r in range(h.shape[0]):
            k = self.keep[r]
            seg = self.seg[r:r + 1, k]
            out = self.block(h[r:r + 1, k], c[r:r + 1], sample_of_token[r:r + 1, k], rope[r:r + 1, k], naive,
                             naive.prepare(seg, seg), txt[r:r + 1], naive, naive.prepare(seg, self.text_seg[r:r + 1]))
            row = h[r].clone()
            row[k] = out[0]
            rows.append(row)
        return torch.stack(rows)


def forward_and_grads(model, inputs, route=None):
    model.zero_grad()
    out = model(*inputs[:6], extent=inputs[6], route=route)
    out[inputs[3] > 0].pow(2).mean().backward()  # real tokens: at padding each backend leaves its own values
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("attention", ["naive", "sdpa", "varlen"])
@pytest.mark.parametrize("chunks", [1, 2])
def test_the_routed_forward_is_the_span_run_on_the_kept_tokens_alone(attention, chunks):
    """Outputs and every gradient of the routed model equal the reference's, whatever the backend and whether the
    span's rows are one run per sample (chunks=1) or one run per sequence-parallel chunk with filler between
    (chunks=2, as Ulysses gathers them: here one process holds both chunks, so the chunks' local places are
    offset to the row's)."""
    inputs = batch()
    x, _, pos, seg, _, text_seg, _ = inputs
    routed = choose_routed(temporal_change(x, pos, seg), seg, 0.5, torch.Generator().manual_seed(0))
    layout = RouteLayout.of(routed, seg, chunks)
    if chunks == 2:  # each chunk's places are local to it; on one process they index the whole row
        half = seg.shape[1] // 2
        offset = torch.arange(layout.index.shape[1]) // (layout.index.shape[1] // 2) * half
        layout = RouteLayout(torch.where(layout.seg > 0, layout.index + offset, 0), layout.seg)
        assert (layout.seg[:, :-1] > layout.seg[:, 1:]).any()  # a sample's kept tokens in two runs
    model = trained_model(dataclasses.replace(ARGS, attention=attention))
    got, got_grads = forward_and_grads(model, inputs, layout)

    reference = trained_model()
    keep = ~routed & (seg > 0)
    for i in ARGS.route.span(ARGS.depth):
        reference.blocks[i] = SpanOnKeptTokens(reference.blocks[i], keep, seg, text_seg)
    want, want_grads = forward_and_grads(reference, inputs)
    full, _ = forward_and_grads(trained_model(), inputs)

    real = seg > 0
    assert (want - full)[real].abs().max() > 1e-2  # routing changed the function
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name.replace(".block.", ".")], grad, rtol=1e-4, atol=1e-6)


def test_routing_off_leaves_the_step_as_it_was():
    """model.route.share=0 draws nothing (the step's noise and t are today's) and the model without a route is the
    model without routing, bit for bit."""
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    x, _, pos, seg, *_ = batch()
    assert route_layout(RouteArgs(share=0.0), x, pos, seg, g) is None
    assert torch.equal(g.get_state(), state)
    inputs = batch()
    on, off = trained_model(), trained_model(dataclasses.replace(ARGS, route=RouteArgs()))
    assert torch.equal(forward_and_grads(on, inputs)[0], forward_and_grads(off, inputs)[0])


def test_the_selection_routes_the_least_changing_patches_and_keeps_every_first_frame():
    """A clip with 3 of 6 places static over 3 frames: those places' 6 later tokens change by 0, the first frame has
    no earlier one (inf). At share 6/18 exactly they are routed; an image in the same row (no earlier frame) routes
    floor(share * n) of its tokens by a draw; padding is never routed."""
    static = [(0, 0), (0, 1), (1, 2)]
    x, pos, seg = packed_row([clip((3, 2, 3), static), clip((1, 3, 3), seed=1)], 32)
    change = temporal_change(x, pos, seg)
    t, place = pos[0, :, 0], [tuple(p) for p in pos[0, :, 1:].tolist()]
    first_clip = seg[0] == 1
    is_static = torch.tensor([p in static for p in place]) & first_clip & (t > 0)
    assert torch.all(change[0, is_static] == 0)
    assert torch.all(change[0, first_clip & ~is_static & (t > 0)] > 0.1)
    assert torch.all(change[0, (t == 0) | (seg[0] == 0)] == float("inf"))

    share = 6 / 18
    choices = [choose_routed(change, seg, share, torch.Generator().manual_seed(s))[0] for s in range(4)]
    for routed in choices:
        assert torch.equal(routed & first_clip, is_static)
        assert int(routed[seg[0] == 2].sum()) == int(9 * share) and not routed[seg[0] == 0].any()
    assert len({tuple(r[seg[0] == 2].tolist()) for r in choices}) > 1  # the image's tokens: drawn

    random = route_layout(RouteArgs(share=share, select="random"), x, pos, seg, torch.Generator().manual_seed(0))
    kept_static = (random.seg[0] == 1) & is_static[random.index[0]]
    assert kept_static.any()  # a random choice keeps some static tokens in the span
    assert int((random.seg == 1).sum()) == 18 - 6 and int((random.seg == 2).sum()) == 9 - 3


def test_the_layout_keeps_the_same_count_on_every_chunk():
    """Under sequence parallelism every rank's span has K tokens (the most any chunk keeps), its own kept ones first
    and in order, then filler."""
    x, _, pos, seg, *_ = batch()
    routed = choose_routed(temporal_change(x, pos, seg), seg, 0.5, torch.Generator().manual_seed(1))
    for chunks in (1, 2, 4):
        layout = RouteLayout.of(routed, seg, chunks)
        n, K = seg.shape[1] // chunks, layout.index.shape[1] // chunks
        keep = (~routed & (seg > 0)).view(2, chunks, n)
        assert K == int(keep.sum(-1).max())
        for r in range(chunks):
            part = layout.chunk(r)
            for b in range(2):
                places = keep[b, r].nonzero()[:, 0]
                assert torch.equal(part.index[b, :len(places)], places)
                assert torch.equal(part.seg[b, :len(places)], seg[b].view(chunks, n)[r][places])
                assert not part.seg[b, len(places):].any()


def test_varlen_attends_rows_whose_segments_come_in_runs():
    """A sample in two runs with padding between (a routed span under sequence parallelism): varlen sorts the row
    by segment, attends, and puts it back; output and gradients are the naive mask's."""
    g = torch.Generator().manual_seed(0)
    seg = torch.tensor([[1, 1, 2, 0, 1, 2, 2, 0, 3, 3], [1, 1, 1, 1, 2, 2, 2, 3, 0, 0]])
    q, k, v = (torch.randn(2, 10, 2, 6, generator=g, requires_grad=True) for _ in "qkv")
    results = []
    for backend in (build_attention("naive"), build_attention("varlen")):
        out = backend(q, k, v, backend.prepare(seg, seg))
        grads = torch.autograd.grad(out[seg > 0].pow(2).sum(), (q, k, v))
        results.append([out[seg > 0], *grads])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_flops_count_the_span_on_the_tokens_that_ran_it():
    """One sample, no padding: the FLOP counter on the routed forward (naive attention: the counter sees all of it)
    matches the analytic count, which is the full count less the span's blocks on the routed tokens."""
    model = trained_model()
    tokens, pos = clip((3, 2, 3), [(0, 0), (1, 1)])
    x, pos, seg = packed_row([(tokens, pos)], 18)
    text_seg = torch.ones(1, 4, dtype=torch.long)
    routed = choose_routed(temporal_change(x, pos, seg), seg, 0.5, torch.Generator().manual_seed(0))
    layout = RouteLayout.of(routed, seg)
    with FlopCounterMode(display=False) as fc:
        model(x, torch.rand(1, 1), pos, seg, torch.randn(1, 4, ARGS.text_dim), text_seg,
              extent=pos.amax(1, keepdim=True).expand_as(pos) + 1, route=layout)
    analytic = forward_flops(ARGS, seg, text_seg, layout.seg)
    assert abs(analytic - fc.get_total_flops()) / fc.get_total_flops() < 0.02, (analytic, fc.get_total_flops())
    span = len(ARGS.route.span(ARGS.depth))
    assert analytic == forward_flops(ARGS, seg, text_seg) - round(span * (block_flops(ARGS, seg, text_seg) -
                                                                          block_flops(ARGS, layout.seg, text_seg)))
    assert analytic < 0.8 * forward_flops(ARGS, seg, text_seg)


def test_compiled_blocks_take_routed_spans_of_changing_size_without_recompiling_each_step():
    """parallel.compile: the span's rows change size every step (K, the most kept tokens of any chunk). The blocks
    compile for the full rows, then once more with the size dynamic, and no more: the same outputs and gradients
    as eager over 4 steps of 3 or more span sizes."""
    import copy

    from torch._dynamo.utils import counters

    args = dataclasses.replace(ARGS, attention="varlen")
    eager = trained_model(args)
    compiled = copy.deepcopy(eager)
    for block in compiled.blocks:
        block.compile(backend=GRAPH_BACKEND)
    torch._dynamo.reset()
    counters.clear()
    graphs, sizes = [], set()
    for step in range(4):
        inputs = batch(seed=step)
        x, _, pos, seg, *_ = inputs
        layout = route_layout(dataclasses.replace(args.route, share=0.3 + 0.05 * step), x, pos, seg,
                              torch.Generator().manual_seed(step))
        sizes.add(layout.index.shape[1])
        (a, grads_a), (b, grads_b) = (forward_and_grads(m, inputs, layout) for m in (eager, compiled))
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        for name in grads_a:
            torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(sizes) >= 3 and graphs[-1] == graphs[1], (sizes, graphs)
    assert sum(counters["graph_break"].values()) == 0, dict(counters["graph_break"])


def test_a_route_that_holds_no_block_is_refused():
    with pytest.raises(ValueError, match="model.route.start=3 model.route.end=-1: the span .* none of the 4 blocks"):
        DiTArgs(depth=4, route=RouteArgs(share=0.5, start=3, end=-1)).validate()
    with pytest.raises(ValueError, match=r"model.route.share=1.0"):
        DiTArgs(route=RouteArgs(share=1.0)).validate()
    with pytest.raises(ValueError, match="model.route.select='oldest'"):
        DiTArgs(route=RouteArgs(share=0.5, select="oldest")).validate()
    DiTArgs(depth=4, route=RouteArgs(share=0.0, start=3, end=-1)).validate()  # off: the span is not read


def test_sora_inspect_reports_the_share_of_patches_that_repeat(dataset, capsys):
    """--redundancy: the share of latent patches whose RMS change from one latent frame to the next (over the
    sample's RMS) is under each threshold, checked against the frames compared directly."""
    import json

    import numpy as np
    import webdataset as wds

    from data_tools.inspect_shards import main
    from sora_train.data import list_shards, load_manifest
    from sora_train.data.decode import decode_clip

    shards = str(dataset / "shards")
    main([shards, "--redundancy", "20", "--thresholds", "0.01,0.5"])
    report = json.loads(capsys.readouterr().out)
    m = load_manifest(shards)
    changes, total = [], 0
    for raw in list(wds.tarfile_to_samples()([{"url": u} for u in list_shards(shards)]))[:20]:
        latent = decode_clip(raw, m["codec"]["latent_channels"], m["text_encoder"]["width"], (1, 2, 2)).latent
        latent = latent.astype(np.float64)
        C, T, H, W = latent.shape
        patches = latent.reshape(C, T, H // 2, 2, W // 2, 2)
        diff = np.sqrt(((patches[:, 1:] - patches[:, :-1]) ** 2).mean(axis=(0, 3, 5)))  # [T-1, H/2, W/2]
        changes.append((diff / np.sqrt((latent ** 2).mean())).ravel())
        total += T * (H // 2) * (W // 2)
    later = np.concatenate(changes)
    assert report["samples"] == 20 and report["tokens"] == total
    assert report["tokens_with_an_earlier_frame"] == len(later)
    for t in ("0.01", "0.5"):
        assert report["below"][t]["of_later_frames"] == pytest.approx((later < float(t)).mean(), abs=1e-4)
        assert report["below"][t]["of_all_tokens"] == pytest.approx((later < float(t)).sum() / total, abs=1e-4)
    assert 0 < report["below"]["0.01"]["of_later_frames"] < report["below"]["0.5"]["of_later_frames"]
