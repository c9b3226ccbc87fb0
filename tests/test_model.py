import dataclasses
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from sora_train.data import patchify, unpatchify
from sora_train.data.packing import Item, Packer
from sora_train.diffusion import DDPM, DDPMConfig, FlowConfig, RectifiedFlow, masked_mse_sum, per_token
from sora_train.models import DiT, DiTArgs
from sora_train.models.attention import FlexAttention, VarlenAttention, build_attention
from sora_train.models.dit import to_tokens
from sora_train.models.flops import forward_flops
from sora_train.bench.memory import kept_for_backward
from conftest import GRAPH_BACKEND
from sora_train.models.layers import FractionalPositions

ARGS = DiTArgs(in_channels=8, patch_size=(1, 2, 2), dim=48, depth=2, heads=4, text_dim=16, max_segments=8,
               attention="sdpa", frac_pos=True, frac_pos_joint=True)


def make_items(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    items = []
    for i, grid in enumerate([(2, 3, 2), (1, 2, 4), (3, 2, 2), (2, 2, 2)][:n]):
        latent = torch.randn(ARGS.in_channels, grid[0], grid[1] * 2, grid[2] * 2, generator=g)
        tokens, pos = patchify(latent, ARGS.patch_size)
        text = torch.randn(2 + i, ARGS.text_dim, generator=g)
        items.append(Item((0, 0, i), f"k{i}", tokens, pos, grid, text, ""))
    return items


def pack(items, seq_len=48, text_len=16):
    packer = Packer(seq_len, text_len, rows=1, max_per_row=8, lookahead=len(items), patch_dim=ARGS.patch_dim,
                    text_dim=ARGS.text_dim)
    out = []
    for it in items:
        out += packer.add(it)
    out += packer.flush()
    assert len(out) == 1
    return out[0]


def trained_model(args=ARGS, seed=0):
    """A DiT with every zero-initialised output layer randomised, so outputs are not trivially zero."""
    torch.manual_seed(seed)
    m = DiT(args)
    with torch.no_grad():
        for p in m.parameters():
            if p.abs().sum() == 0:
                p.normal_(0, 0.05)
    return m.eval()


def run(model, batch, t):
    return model(batch.tokens, t, batch.pos, batch.seg, batch.text, batch.text_seg, extent=batch.extent)


@pytest.mark.parametrize("backend", ["sdpa", "varlen", "naive"])
def test_sample_output_is_the_same_alone_and_packed(backend):
    model = trained_model(DiTArgs(**{**ARGS.__dict__, "attention": backend}))
    items = make_items(3)
    packed = pack(items)
    t = torch.tensor([[0.3, 0.6, 0.9] + [0.0] * 5])
    out = run(model, packed, t)
    for j, it in enumerate(items):
        alone = pack([it], seq_len=it.n, text_len=it.text.shape[0])
        ref = run(model, alone, t[:, j : j + 1])
        got = out[0][packed.seg[0] == packed.keys[0].index(it.key) + 1]
        torch.testing.assert_close(got, ref[0], rtol=1e-5, atol=1e-5)


def test_fractional_positions_use_each_samples_own_extent():
    model = trained_model()
    batch, t = pack(make_items(2)), torch.tensor([[0.5, 0.5] + [0.0] * 6])
    with pytest.raises(ValueError, match="extent"):
        model(batch.tokens, t, batch.pos, batch.seg, batch.text, batch.text_seg)
    base = run(model, batch, t)
    batch.grids[0, 1] += 1  # claim the second sample is larger: only its tokens change
    moved = run(model, batch, t)
    first = batch.seg[0] == 1
    torch.testing.assert_close(moved[0, first], base[0, first])
    assert (moved[0, batch.seg[0] == 2] - base[0, batch.seg[0] == 2]).abs().max() > 1e-3


def test_joint_position_waves_let_a_linear_map_follow_a_moving_object():
    # An object crossing the frame: present where |w - (0.25 + 0.5 t)| < 0.15, in fractions of the clip.
    t, h, w = torch.meshgrid(torch.arange(8), torch.arange(4), torch.arange(16), indexing="ij")
    pos = torch.stack([t, h, w], -1).reshape(1, -1, 3)
    extent = torch.tensor([8, 4, 16]).expand_as(pos)
    frac = (pos + 0.5) / extent
    target = ((frac[0, :, 2] - (0.25 + 0.5 * frac[0, :, 0])).abs() < 0.15).float()

    def residual(joint: bool) -> float:
        feats = FractionalPositions(8, joint).features(pos, extent)[0]
        x = torch.cat([feats, torch.ones(len(feats), 1)], 1).double()
        # gelsd (SVD): the features are rank-deficient (26 of 49, 138 of 161), where the default gelsy solved
        # badly on some LAPACK builds (torch 2.11: residuals 0.99 and 0.94 instead of 0.73 and 0.20)
        fit = torch.linalg.lstsq(x, target.double()[:, None], driver="gelsd").solution
        return float(((x @ fit)[:, 0] - target).pow(2).mean() / target.var())

    per_axis, joint = residual(False), residual(True)
    assert per_axis > 0.5  # per-axis waves sum to f(t) + g(w): most of the band is out of a linear map's reach
    assert joint < 0.5 * per_axis, (per_axis, joint)


def test_attention_backends_agree_with_naive():
    g = torch.Generator().manual_seed(0)
    B, S, L, H, D = 2, 40, 12, 4, 8
    seg = torch.tensor([[1] * 10 + [2] * 25 + [0] * 5, [1] * 7 + [2] * 7 + [3] * 20 + [0] * 6])
    tseg = torch.tensor([[1] * 4 + [2] * 6 + [0] * 2, [1] * 3 + [2] * 3 + [3] * 6])
    real = seg > 0
    for sk, L_ in ((seg, S), (tseg, L)):
        q = torch.randn(B, S, H, D, generator=g, requires_grad=True)
        k = torch.randn(B, L_, H, D, generator=g, requires_grad=True)
        v = torch.randn(B, L_, H, D, generator=g, requires_grad=True)
        naive = build_attention("naive")
        ref = naive(q, k, v, naive.prepare(seg, sk))
        (ref[real] ** 2).sum().backward()
        ref_grads = [x.grad.clone() for x in (q, k, v)]
        for name in ("sdpa", "varlen", "varlen:sdpa"):
            for x in (q, k, v):
                x.grad = None
            be = build_attention(name, max_segments=4)
            out = be(q, k, v, be.prepare(seg, sk))
            torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)
            (out[real] ** 2).sum().backward()
            for x, gr in zip((q, k, v), ref_grads):
                torch.testing.assert_close(x.grad, gr, rtol=1e-4, atol=1e-5)
        flex = FlexAttention(compile=False)  # forward only: flex backward is CUDA-only
        out = flex(q.detach(), k.detach(), v.detach(), flex.prepare(seg, sk))
        torch.testing.assert_close(out[real], ref[real].detach(), rtol=1e-4, atol=1e-4)


def test_a_varlen_kernel_named_in_config_is_checked():
    assert build_attention("varlen:sdpa").kernel == "sdpa_per_sequence"
    with pytest.raises(ValueError, match="unknown varlen kernel 'fa9'"):
        build_attention("varlen:fa9")
    with pytest.raises(ValueError, match="unknown attention backend 'vorlen'"):
        build_attention("vorlen")


def test_varlen_takes_long_samples_one_at_a_time_unless_a_kernel_is_named():
    long = VarlenAttention.LONG_SAMPLE_TOKENS
    seg_long = torch.tensor([[1] * long + [2] * (long + 2) + [0] * 5000])  # mean of samples (not padding) >= long
    seg_short = torch.tensor([[1] * (long - 1) + [2] * (long - 2) + [0] * 9000])
    auto, named = VarlenAttention(4), VarlenAttention(4, "torch_varlen")
    assert auto.prepare(seg_long, seg_long)["one_at_a_time"] and not auto.prepare(seg_short, seg_short)["one_at_a_time"]
    assert not named.prepare(seg_long, seg_long)["one_at_a_time"]
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    assert auto.kernel_for(cuda, bf16, auto.prepare(seg_long, seg_long)) == "sdpa_per_sequence"
    assert named.kernel_for(cuda, bf16, named.prepare(seg_long, seg_long)) == "torch_varlen"
    assert auto.kernel_for(torch.device("cpu"), bf16) == "sdpa_per_sequence"


def test_varlen_gives_flash_only_the_head_dims_it_takes():
    """torch's varlen kernel refuses head dims that are not multiples of 8 (an H200, the tiny model's 12): the
    automatic choice goes one sequence at a time; a fused kernel named in the config is an error naming the dim."""
    seg = torch.tensor([[1] * 100 + [2] * 60 + [0] * 4])
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    auto, named = VarlenAttention(4), VarlenAttention(4, "torch_varlen")
    if auto._torch_varlen is None:
        pytest.skip("torch has no varlen_attn here")
    assert auto.kernel_for(cuda, bf16, auto.prepare(seg, seg), 64) == auto.kernel != "sdpa_per_sequence"
    for head_dim in (12, 20, 264):
        assert auto.kernel_for(cuda, bf16, auto.prepare(seg, seg), head_dim) == "sdpa_per_sequence"
        with pytest.raises(ValueError, match=f"multiple of 8 and at most 256, not {head_dim}"):
            named.kernel_for(cuda, bf16, named.prepare(seg, seg), head_dim)
    assert VarlenAttention(4, "sdpa").kernel_for(cuda, bf16, None, 12) == "sdpa_per_sequence"


def test_per_sample_values_reach_their_tokens_the_same_way_on_both_paths():
    g = torch.Generator().manual_seed(0)
    per_sample = torch.randn(2, 5, 7, generator=g, dtype=torch.float64, requires_grad=True)
    sample_of_token = torch.tensor([[0] * 4 + [1] * 9 + [2] * 3 + [0] * 2, [0] * 6 + [3] * 6 + [4] * 6])
    cot = torch.randn(2, 18, 7, generator=g, dtype=torch.float64)
    results = []
    for onehot in (False, True):  # index_select's backward (CPU) and the one-hot GEMM CUDA takes
        out = to_tokens(per_sample, sample_of_token, onehot=onehot)
        (grad,) = torch.autograd.grad(out, per_sample, cot)
        results.append((out, grad))
    assert torch.equal(results[0][0], per_sample[torch.arange(2)[:, None], sample_of_token])
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=1e-12, atol=1e-12)


def test_output_is_zero_at_init():
    model = DiT(ARGS)
    batch = pack(make_items(3))
    assert torch.count_nonzero(run(model, batch, torch.rand(1, 8))) == 0


def test_patchify_unpatchify_round_trip():
    latent = torch.randn(5, 4, 6, 10)
    tokens, pos = patchify(latent, (2, 3, 2))
    assert tokens.shape == (2 * 2 * 5, 5 * 12) and pos.max(0).values.tolist() == [1, 1, 4]
    assert torch.equal(unpatchify(tokens, (2, 2, 5), (2, 3, 2), 5), latent)


def test_training_noise_is_a_pure_function_of_the_key_drawn_apart_from_the_timesteps():
    """The trainer draws a row's noise on its device from a generator seeded by the key's generator: the same key,
    the same noise; another key, other noise; and not the host generator's own normals (from which t was drawn)."""
    from sora_train.diffusion import noise, step_generator

    a, b = (noise((4, 4096, 8), step_generator(0, 5, k), torch.device("cpu")) for k in (1, 1))
    assert torch.equal(a, b) and a.shape == (4, 4096, 8) and a.dtype == torch.float32
    assert not torch.equal(a, noise((4, 4096, 8), step_generator(0, 5, 2), torch.device("cpu")))
    assert abs(float(a.mean())) < 0.02 and abs(float(a.std()) - 1) < 0.02
    host = torch.randn((4, 4096, 8), generator=step_generator(0, 5, 1))
    assert abs(float(torch.corrcoef(torch.stack([a.flatten(), host.flatten()]))[0, 1])) < 0.01


def gaussian_posterior(x, t, mu, s, a, b):
    """x_t = a x0 + b eps with x0 ~ N(mu, s^2): E[x0 | x_t], E[eps | x_t]."""
    var = a * a * s * s + b * b
    r = x - a * mu
    return mu + a * s * s / var * r, b / var * r


def test_flow_sampler_maps_noise_to_the_data_distribution():
    mu, s = 1.5, 0.5
    flow = RectifiedFlow(FlowConfig(resolution_shift=False, shift=1.0))

    def velocity(x, t):
        x0, eps = gaussian_posterior(x, t, mu, s, 1 - t, t)
        return eps - x0

    x = flow.sample(velocity, torch.randn(20000, generator=torch.Generator().manual_seed(0)), 50, 1)
    assert abs(x.mean().item() - mu) < 0.03 * mu and abs(x.std().item() - s) < 0.03 * s
    xh = flow.sample(velocity, torch.randn(20000, generator=torch.Generator().manual_seed(0)), 20, 1, "heun")
    assert abs(xh.std().item() - s) < 0.03 * s


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_sampler_maps_noise_to_the_data_distribution(prediction):
    mu, s = -1.0, 0.7
    ddpm = DDPM(DDPMConfig(prediction=prediction))

    def predict(x, t):
        k = min(round(t * 1000), 999)
        a, b = ddpm.ab[k].sqrt(), (1 - ddpm.ab[k]).sqrt()
        x0, eps = gaussian_posterior(x, t, mu, s, a, b)
        return eps if prediction == "eps" else a * eps - b * x0

    x = ddpm.sample(predict, torch.randn(20000, generator=torch.Generator().manual_seed(0)), 50)
    assert abs(x.mean().item() - mu) < 0.03 * abs(mu) and abs(x.std().item() - s) < 0.03 * s


def test_resolution_shift_moves_larger_samples_towards_noise():
    flow = RectifiedFlow(FlowConfig(base_tokens=256))
    g = torch.Generator().manual_seed(0)
    small = flow.sample_t(torch.full((1, 4000), 256), g).mean()
    large = flow.sample_t(torch.full((1, 4000), 256 * 16), g).mean()
    assert large > small + 0.2


def test_loss_counts_real_tokens_only():
    pred, target = torch.zeros(1, 4, 3), torch.ones(1, 4, 3)
    target[0, 3] = 100.0  # padding
    assert masked_mse_sum(pred, target, torch.tensor([[1, 1, 2, 0]])).item() == 3.0


def test_loss_t_floor_turns_the_v_loss_into_an_x0_loss_below_the_floor():
    g = torch.Generator().manual_seed(0)
    x0, noise, x0_hat = (torch.randn(1, 3, 8, generator=g) for _ in range(3))
    t = torch.tensor([0.1, 0.5, 0.9]).reshape(1, 3, 1)
    seg = torch.ones(1, 3, dtype=torch.long)
    x0_err = (x0_hat - x0).pow(2).mean(-1)[0]  # per token
    for floor, expect in [(0.0, x0_err / t.flatten() ** 2), (0.5, x0_err / t.flatten().clamp(min=0.5) ** 2),
                          (1.0, x0_err)]:
        flow = RectifiedFlow(FlowConfig(prediction="x0", loss_t_floor=floor))
        x_t, target = flow.corrupt(x0, noise, t)
        per_tok = [masked_mse_sum(flow.velocity(x0_hat, x_t, t)[:, i:i + 1], target[:, i:i + 1], seg[:, i:i + 1],
                                  flow.loss_weight(t)[:, i:i + 1]) for i in range(3)]
        torch.testing.assert_close(torch.stack(per_tok), expect, rtol=1e-5, atol=1e-6)


def test_a_few_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    model = DiT(ARGS)
    batch = pack(make_items(3))
    flow = RectifiedFlow(FlowConfig())
    g = torch.Generator().manual_seed(0)
    t = flow.sample_t(batch.grids.prod(-1), g)
    noise = torch.randn(batch.tokens.shape, generator=g)
    x_t, target = flow.corrupt(batch.tokens, noise, per_token(t, batch.seg))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = masked_mse_sum(model(x_t, t, batch.pos, batch.seg, batch.text, batch.text_seg, extent=batch.extent), target,
                              batch.seg) / batch.real_tokens
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]


def test_unconditional_model_has_no_text_path():
    m = DiT(DiTArgs(**{**ARGS.__dict__, "cross_attention": False}))
    batch = pack(make_items(2))
    assert not any("cross_attn" in n or "y_embedder" in n for n, _ in m.named_parameters())
    assert m(batch.tokens, torch.rand(1, 8), batch.pos, batch.seg, extent=batch.extent).shape == batch.tokens.shape


def test_analytic_flops_match_the_flop_counter():
    """Packed count == sum over samples run alone (sum of n_i^2 attention), checked with FlopCounterMode on the
    matmul-only backend, which the counter sees completely."""
    args = DiTArgs(**{**ARGS.__dict__, "attention": "naive"})
    model = DiT(args)
    items = make_items(4)
    packed = pack(items, seq_len=sum(it.n for it in items), text_len=32)
    counted = 0
    for it in items:
        alone = pack([it], seq_len=it.n, text_len=it.text.shape[0])
        with FlopCounterMode(display=False) as fc:
            run(model, alone, torch.rand(1, 1))  # one sample slot: per-slot work counted once
        counted += fc.get_total_flops()
    analytic = forward_flops(args, packed.seg, packed.text_seg)
    assert abs(analytic - counted) / counted < 0.02, (analytic, counted)


def test_model_code_has_no_parallelism_imports():
    for f in Path(__file__).parents[1].joinpath("sora_train", "models").glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+(torch\.distributed|deepspeed)", f.read_text(), re.M), f


def test_probe_recomputes_the_cross_attention_the_model_applies():
    """sora_train.inference.probe reports attention mass per prompt word; its softmax must be the one the backend used:
    probs @ v through the output projection reproduces the module's output."""
    from sora_train.models.layers import CrossAttention
    from sora_train.inference.probe import cross_attention_mass, cross_attention_probs

    torch.manual_seed(0)
    module = CrossAttention(24, 4)
    x, text = torch.randn(1, 10, 24), torch.randn(1, 5, 24)
    sdpa = build_attention("sdpa", 8)
    out = module(x, text, sdpa, sdpa.prepare(torch.ones(1, 10, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)))
    probs = cross_attention_probs(module, x, text)  # [1,H,S,L]
    v = module.kv(text).unflatten(-1, (2, 4, 6))[..., 1, :, :]
    assert torch.allclose(module.proj(torch.einsum("bhsl,blhd->bshd", probs, v).flatten(2)), out, atol=1e-5)

    model = DiT(DiTArgs(in_channels=3, patch_size=(1, 2, 2), dim=24, depth=2, heads=4, text_dim=16, attention="sdpa"))
    mass = cross_attention_mass(model, torch.randn(7, 16), grid=(2, 2, 2))
    assert mass.shape == (2, 4, 7) and torch.allclose(mass.sum(-1), torch.ones(2, 4))
    with pytest.raises(ValueError, match="no cross-attention"):
        cross_attention_mass(DiT(DiTArgs(in_channels=3, dim=24, depth=1, heads=4, text_dim=384, attention="sdpa",
                                         cross_attention=False)),
                             torch.randn(7, 16))


def packed_layouts(args, S=256):
    """7 packed rows of changing segment layout: the model's inputs (x, t, pos, seg, text, text_seg, extent)."""
    from sora_train.bench.common import synthetic_packed_batch

    for i, span in enumerate([(16, 85), (8, 32), (32, 128), (4, 16), (85, 256), (12, 64), (50, 128)]):
        seg, tseg, pos = synthetic_packed_batch(args, S, 1, span, 10, seed=i)
        g = torch.Generator().manual_seed(i)
        x, t = torch.randn(1, S, args.patch_dim, generator=g), torch.rand(1, args.max_segments, generator=g)
        text = torch.randn(1, tseg.shape[1], args.text_dim, generator=g)
        yield x, t, pos, seg, text, tseg, pos.amax(1, keepdim=True).expand_as(pos) + 1


def test_compiled_blocks_compute_the_eager_function_in_one_graph_without_recompiling_per_packed_layout():
    """parallel.compile compiles each block. Packed rows change their segment layout every step: tracing the
    attention's per-sequence path specialised each block on the layout's lengths (a recompile per step, eager for
    good after dynamo's limit of 8); left out of the graph, it broke each block into 7 graphs. As one op
    (models/packed_attention.py) it is one node: one graph per block, no break, whatever the layout."""
    import copy
    import dataclasses

    from torch._dynamo.utils import counters

    args = dataclasses.replace(ARGS, attention="varlen", max_segments=32)
    eager = trained_model(args)
    compiled = copy.deepcopy(eager)
    for block in compiled.blocks:
        block.compile(backend=GRAPH_BACKEND)
    torch._dynamo.reset()
    counters.clear()
    graphs, segments = [], set()
    for *inputs, extent in packed_layouts(args):
        segments.add(int(inputs[3].max()))
        results = []
        for model in (eager, compiled):
            model.zero_grad()
            out = model(*inputs, extent=extent)
            out.pow(2).mean().backward()
            results.append((out.detach(), [p.grad.clone() for p in model.parameters()]))
        (a, grads_a), (b, grads_b) = results
        assert a.abs().max() > 0.1  # not the zero-initialised output
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)
        for ga, gb in zip(grads_a, grads_b):
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)
        graphs.append(counters["stats"]["unique_graphs"])
    assert len(segments) >= 4 and graphs[-1] == graphs[1], (segments, graphs)  # no recompile after layout 2
    assert graphs[0] == 1 and sum(counters["graph_break"].values()) == 0, (graphs, dict(counters["graph_break"]))


def packed_qkv(lengths_q, lengths_k, dtype, heads=4, head_dim=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lengths_q), heads, head_dim, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(sum(lengths_k), heads, head_dim, generator=g).to(dtype).requires_grad_() for _ in "kv")
    return q, k, v


def packed_attention_and_sdpa(q, k, v, lengths_q, lengths_k):
    """The op's output and gradients, and SDPA's run one sequence at a time on the same packed q, k, v."""
    import torch.nn.functional as F

    from sora_train.models.packed_attention import packed_attention

    out, _ = packed_attention(q, k, v, torch.tensor([lengths_q, lengths_k]))
    grad = torch.randn_like(out)
    got = [out, *torch.autograd.grad(out, (q, k, v), grad)]
    outs, start_q, start_k = [], 0, 0
    for n_q, n_k in zip(lengths_q, lengths_k):
        sq, sk = slice(start_q, start_q + n_q), slice(start_k, start_k + n_k)
        if n_q:
            outs.append(F.scaled_dot_product_attention(*(x[s].transpose(0, 1)[None] for x, s in
                                                         ((q, sq), (k, sk), (v, sk))))[0].transpose(0, 1)
                        if n_k else torch.zeros_like(q[sq]))
        start_q, start_k = start_q + n_q, start_k + n_k
    ref = torch.cat(outs)
    return got, [ref, *torch.autograd.grad(ref, (q, k, v), grad)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_attention_op_computes_sdpa_one_sequence_at_a_time(dtype):
    """sora_train::packed_attention (compiled blocks' per-sequence path): SDPA's output and gradients for each
    sequence, bit for bit on the CPU (the same kernels, its backward fed the forward's log-sum-exp); queries with
    no keys (a row's padding) get zeros, keys with no queries no gradient."""
    from sora_train.models.packed_attention import packed_attention

    lengths_q, lengths_k = [30, 0, 17, 5, 9], [30, 4, 17, 0, 11]
    q, k, v = packed_qkv(lengths_q, lengths_k, dtype)
    got, want = packed_attention_and_sdpa(q, k, v, lengths_q, lengths_k)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert got[2][30:34].abs().max() == 0 and got[3][30:34].abs().max() == 0  # keys with no queries
    assert got[0][sum(lengths_q[:4]) - 5:sum(lengths_q[:4])].abs().max() == 0  # queries with no keys: zeros
    with pytest.raises(ValueError, match=r"lengths \[52, 51\] do not cover the 61 queries and 62 keys"):
        packed_attention(q[:61], k, v, torch.tensor([lengths_q[:4], lengths_k[:4]]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_packed_attention_op_takes_the_formulas_where_sdpa_has_no_kernel_it_calls(monkeypatch, dtype):
    """Where SDPA would take a kernel the op does not call (float32 on CUDA, head dims flash refuses), the op's
    backward computes the gradients from attention's formulas, a block of queries at a time (autograd does not run
    inside an op): SDPA's gradients within float32 rounding, over blocks that split sequences."""
    import functools

    from sora_train.models import packed_attention as op

    monkeypatch.setattr(op, "_kernel", lambda q, k, v: "formula")
    monkeypatch.setattr(op, "_attention_backward_by_formula",
                        functools.partial(op._attention_backward_by_formula, rows=7))
    lengths_q, lengths_k = [30, 0, 17, 5, 9], [30, 4, 17, 0, 11]
    got, want = packed_attention_and_sdpa(*packed_qkv(lengths_q, lengths_k, dtype), lengths_q, lengths_k)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **({} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}))


@pytest.mark.parametrize("kernel", ["cudnn", "flash"])
def test_the_packed_attention_op_calls_the_cuda_kernels_as_sdpa_autograd_does(monkeypatch, kernel):
    """The CUDA kernels' calls (cuDNN's and flash's forward with log-sum-exp, then their backward) checked
    against torch's own schemas and shape functions on meta tensors: arguments in order, the log-sum-exp handed
    back in the shape the kernel wrote it. Their numbers are tests/test_gpu.py's."""
    from sora_train.models import packed_attention as op

    monkeypatch.setattr(op, "_kernel", lambda q, k, v: kernel)
    q, k, v = (torch.empty(1, 4, n, 64, dtype=torch.bfloat16, device="meta") for n in (100, 70, 70))
    out, lse = op._forward_one(q, k, v)
    assert out.shape == q.shape and lse.shape == (4, 100) and lse.dtype == torch.float32
    grads = op._backward_one(torch.empty_like(out), q, k, v, out, lse)
    assert [g.shape for g in grads] == [q.shape, k.shape, v.shape]


def test_compiled_blocks_on_the_fused_varlen_path_stop_recompiling_after_two_layouts(monkeypatch):
    """On CUDA most rows take torch's varlen op, traced into the block with the rows' longest sample lengths as
    ints (max_q, max_k of the self- and cross-attention masks). Dynamo specialises a changed int once, then makes
    it dynamic: over 7 packed layouts the block compiles 3 times and no more (8 is its limit, then eager for good).
    CPU stand-in with torch's op signature: sora_train::packed_attention behind it."""
    from torch._dynamo.utils import counters

    import sora_train.models.packed_attention as packed_attention_module

    def lengths(cu_q, cu_k):
        return torch.stack([cu_q.diff(), cu_k.diff()]).long().cpu()

    @torch.library.custom_op("sora_test::varlen_attn", mutates_args=())
    def varlen_attn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                    max_q: int, max_k: int) -> torch.Tensor:
        return torch.ops.sora_train.packed_attention(q, k, v, lengths(cu_q, cu_k))[0]

    @varlen_attn.register_fake
    def _(q, k, v, cu_q, cu_k, max_q, max_k):
        return torch.empty_like(q)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:3], output)
        ctx.lengths = lengths(*inputs[3:5])

    def backward(ctx, grad):
        q, k, v, out = ctx.saved_tensors
        lse = q.new_zeros(q.shape[1], q.shape[0], dtype=torch.float32)  # unused: CPU attention by formula
        grads = torch.ops.sora_train.packed_attention_backward(grad, q, k, v, out, lse, ctx.lengths)
        return (*grads, None, None, None, None)

    varlen_attn.register_autograd(backward, setup_context=setup_context)
    monkeypatch.setattr(packed_attention_module, "_kernel", lambda q, k, v: "formula")
    monkeypatch.setattr(VarlenAttention, "kernel_for", lambda self, *args, **kwargs: "torch_varlen")
    args = dataclasses.replace(ARGS, attention="varlen", max_segments=32)
    model = trained_model(args)
    for attention in (model.attention, model.cross_attention):
        attention._torch_varlen = lambda q, k, v, cu_q, cu_k, max_q, max_k: torch.ops.sora_test.varlen_attn(
            q, k, v, cu_q, cu_k, max_q, max_k)
    for block in model.blocks:
        block.compile(backend=GRAPH_BACKEND)
    torch._dynamo.reset()
    counters.clear()
    for inputs in packed_layouts(args):
        model(*inputs[:-1], extent=inputs[-1]).pow(2).mean().backward()
    assert counters["stats"]["unique_graphs"] <= 3 and not counters["graph_break"], dict(counters["stats"])


class CountOps(TorchDispatchMode):
    """The ops run inside its `with`, as the checkpointing policies see them: attention kernels, GEMMs, the rest."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from sora_train.parallel import attention_kernel, matrix_product

        kind = "attention" if attention_kernel(func) else "gemm" if matrix_product(func) else "other"
        self.calls[kind] += 1
        return func(*args, **(kwargs or {}))


def test_attention_checkpointing_recomputes_each_block_but_its_attention_kernels():
    """parallel.activation_checkpointing=attention: torch's selective checkpointing keeps the attention kernels'
    outputs and recomputes every other op of the block: the same gradients as no checkpointing; in backward the
    attention kernels run forward again under full checkpointing, never under this policy."""
    from sora_train.parallel import ParallelDims, parallelize_dit

    batch, t = pack(make_items(3)), torch.rand(1, ARGS.max_segments)
    grads, recomputed = {}, {}
    # parallel.checkpoint_blocks=1: the policy on the first block only, the rest keeping every activation
    for policy, blocks in (("none", -1), ("attention", -1), ("full", -1), ("full", 1), ("full", 0)):
        model = parallelize_dit(trained_model().train(), ParallelDims(1, 0, 0, 1), policy, checkpoint_blocks=blocks)
        out = run(model, batch, t)
        with CountOps() as count:
            out.pow(2).mean().backward()
        grads[policy, blocks] = [p.grad for p in model.parameters()]
        recomputed[policy, blocks] = count.calls["attention"]
    for key in grads:
        for a, b in zip(grads["none", -1], grads[key]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert recomputed["none", -1] == 0 and recomputed["attention", -1] == 0
    assert recomputed["full", -1] == 2 * ARGS.depth  # self- and cross-attention in each block
    assert recomputed["full", 1] == 2 and recomputed["full", 0] == 0 and ARGS.depth == 2
    with pytest.raises(ValueError, match="parallel.checkpoint_blocks=3: use -1"):
        parallelize_dit(trained_model(), ParallelDims(1, 0, 0, 1), "full", checkpoint_blocks=3)


def test_the_checkpointing_policies_know_every_attention_kernel_and_gemm_by_its_op():
    """What torch's selective checkpointing sees: SDPA's aten kernels, but torch's varlen kernel (the CUDA path of
    most packed rows) as its custom op, whose name has no "attention": it was recomputed under the attention
    policy."""
    pytest.importorskip("torch.nn.attention.varlen")
    from sora_train.parallel import attention_kernel, matrix_product

    aten, varlen = torch.ops.aten, torch.ops.torch_attn
    for op in (aten._scaled_dot_product_cudnn_attention.default, aten._scaled_dot_product_flash_attention.default,
               aten._scaled_dot_product_efficient_attention.default, varlen._varlen_attn.default,
               aten._scaled_dot_product_flash_attention_for_cpu.default):
        assert attention_kernel(op) and not matrix_product(op), op
    for op in (varlen._varlen_attn_backward.default, aten._scaled_dot_product_cudnn_attention_backward.default,
               aten.mm.default, aten.addmm.default, aten._scaled_mm.default, aten.bmm.default, aten.gelu.default):
        assert not attention_kernel(op), op
    assert [matrix_product(op) for op in (aten.mm.default, aten.addmm.default, aten._scaled_mm.default,
                                          aten.bmm.default, aten.gelu.default)] == [True, True, True, False, False]


def test_elementwise_checkpointing_recomputes_no_gemm_and_no_attention():
    """parallel.activation_checkpointing=elementwise: the linear layers' GEMMs and the attention kernels run once
    (backward runs exactly as many GEMMs as without checkpointing, full runs the forward's again); norms,
    modulation, activations and RoPE are recomputed. The same gradients."""
    from sora_train.parallel import ParallelDims, parallelize_dit

    batch, t = pack(make_items(3)), torch.rand(1, ARGS.max_segments)
    grads, backward = {}, {}
    for policy in ("none", "elementwise", "attention", "full"):
        model = parallelize_dit(trained_model().train(), ParallelDims(1, 0, 0, 1), policy)
        out = run(model, batch, t)
        with CountOps() as count:
            out.pow(2).mean().backward()
        grads[policy], backward[policy] = [p.grad for p in model.parameters()], count.calls
    for policy in ("elementwise", "attention", "full"):
        for a, b in zip(grads["none"], grads[policy]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    assert backward["elementwise"]["gemm"] == backward["none"]["gemm"] > 0
    assert backward["elementwise"]["attention"] == 0 and backward["full"]["attention"] > 0
    assert backward["attention"]["gemm"] > backward["none"]["gemm"]  # the forward's GEMMs again
    assert backward["elementwise"]["other"] > backward["none"]["other"]  # the elementwise work again


def test_a_compiled_block_keeps_no_per_token_modulation_on_either_to_tokens_path(monkeypatch):
    """CUDA's to_tokens sums its backward by a one-hot GEMM. Its forward was that GEMM too, whose [tokens, 6 dim]
    output a compiled block kept for backward (the compiler recomputes no GEMM): 6 of the 1B preset's 31 [tokens,
    dim] tensors per block (`sora-bench activations`). Now a gather in both: what CPU's path keeps, within indices."""
    import functools

    import sora_train.models.dit as dit
    from sora_train.parallel import ParallelDims, parallelize_dit

    args = dataclasses.replace(ARGS, attention="varlen")
    batch, t = pack(make_items(3)), torch.rand(1, ARGS.max_segments)
    kept = {}
    for onehot in (False, True):
        monkeypatch.setattr(dit, "to_tokens", functools.partial(dit.to_tokens, onehot=onehot))
        torch._dynamo.reset()
        model = parallelize_dit(trained_model(args).train(), ParallelDims(1, 0, 0, 1), "none", compile_blocks=True,
                                compile_backend=GRAPH_BACKEND)
        kept[onehot] = kept_for_backward(model, lambda: run(model, batch, t))
        monkeypatch.undo()
    one_tensor = batch.tokens.shape[1] * ARGS.dim * 4  # [tokens, dim] float32
    assert abs(kept[True] - kept[False]) < one_tensor, kept


def test_compiled_blocks_take_every_checkpointing_policy_and_keep_what_it_says():
    """With the attention one op in the block's graph, checkpointing goes inside the compiled block and the
    compiler applies the op policies: the same gradients as eager without checkpointing, and the tensors kept for
    backward shrink from none to elementwise (GEMM and attention outputs) to attention to full. Policies one after
    another in one process: each block is compiled for its own (dynamo guards on the policy's name)."""
    from sora_train.parallel import ParallelDims, parallelize_dit

    args = dataclasses.replace(ARGS, attention="varlen")
    batch, t = pack(make_items(3)), torch.rand(1, ARGS.max_segments)
    torch._dynamo.reset()
    grads, kept = {}, {}
    for policy, compiled in (("none", False), ("elementwise", True), ("attention", True), ("full", True),
                             ("none", True)):
        model = parallelize_dit(trained_model(args).train(), ParallelDims(1, 0, 0, 1), policy, compile_blocks=compiled,
                                compile_backend=GRAPH_BACKEND)
        kept[policy, compiled] = kept_for_backward(model, lambda: run(model, batch, t))
        grads[policy, compiled] = [p.grad for p in model.parameters()]
    for key in grads:
        for a, b in zip(grads["none", False], grads[key]):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
    sizes = [kept[p, True] for p in ("full", "attention", "elementwise", "none")]
    assert sizes == sorted(set(sizes)), kept


def test_compiled_blocks_hold_no_complex_tensors_so_rope_fuses():
    """Inductor generates no code for complex numbers: RoPE's complex multiply ran as an eager kernel between two
    fp32 buffers inside every compiled block. Compiled, RoPE takes its real form (one fused pass with the QK norm
    and the cast); the test above shows both forms compute the same function."""
    from sora_train.bench.common import synthetic_packed_batch

    args = dataclasses.replace(ARGS, attention="varlen", max_segments=32)
    model, S = trained_model(args), 128
    seg, tseg, pos = synthetic_packed_batch(args, S, 1, (16, 64), 10, seed=0)
    complex_values = []

    def backend(gm, example_inputs):  # what dynamo hands the compiler: every tensor the graph computes
        complex_values.extend(str(n.target) for n in gm.graph.nodes
                              if getattr(n.meta.get("example_value"), "is_complex", lambda: False)())
        return gm.forward

    for block in model.blocks:
        block.compile(backend=backend)
    torch._dynamo.reset()
    x, t = torch.randn(1, S, args.patch_dim), torch.rand(1, args.max_segments)
    text = torch.randn(1, tseg.shape[1], args.text_dim)
    model(x, t, pos, seg, text, tseg, extent=pos.amax(1, keepdim=True).expand_as(pos) + 1)
    assert complex_values == []


def test_activation_checkpointing_policies_keep_the_gradients_and_drop_what_they_say():
    """parallel.activation_checkpointing: none | full (blocks recomputed) | selective (only each MLP recomputed):
    the same gradients; the tensors kept for backward shrink from none to selective to full."""
    from sora_train.parallel import ParallelDims, parallelize_dit

    batch, t = pack(make_items(3)), torch.rand(1, ARGS.max_segments)
    grads, saved = {}, {}
    for policy in ("none", "selective", "full"):
        model = parallelize_dit(trained_model().train(), ParallelDims(1, 0, 0, 1), policy)
        kept = []

        def pack_hook(x):
            kept.append(x.numel() * x.element_size())
            return x

        with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda x: x):
            out = run(model, batch, t)
        out.pow(2).mean().backward()
        grads[policy] = [p.grad for p in model.parameters()]
        saved[policy] = sum(kept)
    for policy in ("selective", "full"):
        for a, b in zip(grads["none"], grads[policy]):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    assert saved["full"] < saved["selective"] < saved["none"], saved
    with pytest.raises(ValueError, match="activation_checkpointing='on'"):
        parallelize_dit(trained_model(), ParallelDims(1, 0, 0, 1), "on")


def rowwise_float8_here() -> bool:
    """torch emulates rowwise-scaled float8 GEMMs on CPU from 2.14 (2.11: per-tensor scales only)."""
    try:
        a = torch.ones(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.float32)
    except RuntimeError:
        return False
    return True


def test_float8_swaps_the_token_wide_linears_keeps_the_names_and_the_function_within_float8_error():
    """parallel.float8: the blocks' token-wide linear layers become torchao Float8Linear (the same Parameters,
    so checkpoints and ZeRO-3 see no change); the model computes the bf16 function to float8's precision
    (e4m3 keeps 3 mantissa bits: ~5% per GEMM), and activation checkpointing recomputes it exactly."""
    pytest.importorskip("torchao.float8")
    import copy

    from sora_train.parallel import FLOAT8_RECIPES, ParallelDims, convert_to_float8, parallelize_dit

    batch, t = pack(make_items(3)), torch.rand(1, ARGS.max_segments)
    plain = trained_model().train()
    names = set(plain.state_dict())
    results = {}
    recipes = ("none", "tensorwise", "rowwise")
    if not rowwise_float8_here():
        recipes = recipes[:2]
    for recipe, ac in (("none", "none"), ("tensorwise", "none"), ("tensorwise", "full"), ("rowwise", "none")):
        if recipe not in recipes:
            continue
        model = parallelize_dit(copy.deepcopy(plain), ParallelDims(1, 0, 0, 1), ac, float8=recipe)
        assert set(model.state_dict()) == names
        out = run(model, batch, t)
        out.pow(2).mean().backward()
        results[recipe, ac] = out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])
        swapped = sorted(n for n, m in model.named_modules() if type(m).__name__ == "Float8Linear")
        expected = sorted(f"blocks.{i}.{layer}" for i in range(ARGS.depth) for layer in
                          ("attn.qkv", "attn.proj", "cross_attn.q", "cross_attn.proj", "mlp.fc1", "mlp.fc2"))
        assert swapped == ([] if recipe == "none" else expected), swapped
    ref_out, ref_grad = results["none", "none"]
    for recipe in recipes[1:]:
        out, grad = results[recipe, "none"]
        err = ((out - ref_out).norm() / ref_out.norm()).item()
        assert 1e-3 < err < 0.1, (recipe, err)  # float8, and close: not bf16, not broken
        assert torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0) > 0.99
    torch.testing.assert_close(results["tensorwise", "full"][0], results["tensorwise", "none"][0])
    torch.testing.assert_close(results["tensorwise", "full"][1], results["tensorwise", "none"][1])
    assert FLOAT8_RECIPES == ("none", "tensorwise", "rowwise")
    with pytest.raises(ValueError, match="parallel.float8='e4m3'"):
        convert_to_float8(copy.deepcopy(plain), "e4m3")


def test_a_model_cast_whole_to_bf16_computes_the_float32_function():
    """model.to(torch.bfloat16) casts buffers too: the fractional positions' wave table became bf16 and its product
    with the float32 fractions failed (the CUDA tests cast models so)."""
    model, batch, t = trained_model(), pack(make_items(3)), torch.rand(1, ARGS.max_segments)
    with torch.no_grad():
        ref = run(model, batch, t)
        batch.tokens, batch.text = batch.tokens.bfloat16(), batch.text.bfloat16()
        out = run(model.to(torch.bfloat16), batch, t.bfloat16()).float()
    assert ((out - ref).norm() / ref.norm()).item() < 3e-2
