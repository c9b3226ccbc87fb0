"""CUDA checks (`pytest -m gpu`, run by launch/gpu_check.sh; skipped where there is no CUDA device).

What gloo on CPU cannot show: the kernels in bf16 against a float32 reference, packing invariance on the
device, NCCL collectives of the real trainer, the zero.Init build on the device, and ZeRO-0 = ZeRO-3 there.
"""

import json

import pytest
import torch

from distributed import ROOT, tiny_model, torchrun

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("backend", ["sdpa", "flex", "varlen", "varlen:torch_varlen", "varlen:sdpa"])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_attention_backend_in_bf16_matches_the_float32_reference_forward_and_backward(backend, head_dim):
    from sora_train.bench.attention import attention_numerics

    (r,) = attention_numerics(4096, 1024 // head_dim, head_dim, 128, [backend], steps=1, device=CUDA)
    assert "error" not in r, r
    assert r["self_finite"] and r["cross_finite"], r
    for kind in ("self", "cross"):
        for grad in ("out", "dq", "dk", "dv"):
            assert r[f"{kind}_{grad}_rel_err"] < 1e-2, (kind, grad, r)  # bf16: ~2-3e-3 measured on an H200


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
# head dim 16 (flex's least on CUDA; flash varlen's kernel) and 12 (varlen: one sequence at a time)
@pytest.mark.parametrize("backend,dim", [("sdpa", 64), ("varlen", 64), ("flex", 64), ("varlen", 48)])
def test_a_sample_gives_the_same_output_alone_and_packed_on_cuda(backend, dim, dtype, tol):
    from test_model import ARGS, make_items, pack, run, trained_model

    from sora_train.models import DiTArgs

    model = trained_model(DiTArgs(**{**ARGS.__dict__, "attention": backend, "dim": dim})).to(CUDA, dtype)
    items = make_items(3)
    packed = pack(items).to(CUDA)
    t = torch.tensor([[0.3, 0.6, 0.9] + [0.0] * 5], device=CUDA)

    def forward(batch, tt):
        batch.tokens, batch.text = batch.tokens.to(dtype), batch.text.to(dtype)
        return run(model, batch, tt.to(dtype)).float()

    with torch.no_grad():
        out = forward(packed, t)
        for j, it in enumerate(items):
            alone = forward(pack([it], seq_len=it.n, text_len=it.text.shape[0]).to(CUDA), t[:, j : j + 1])
            got = out[0][packed.seg[0] == packed.keys[0].index(it.key) + 1]
            torch.testing.assert_close(got, alone[0], rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_to_tokens_on_cuda_computes_the_float64_function(dtype):
    """Both paths' forward is exact (a single 1.0 per row). The backward sums ~800 tokens per sample: CUDA's default
    (one-hot, a GEMM accumulating in fp32) is within the dtype's rounding of the float64 sums. index_select's
    backward there is bf16 atomics into the same few rows: 4.5 off sums of ~30 on an H200, why CUDA takes one-hot."""
    from sora_train.models.dit import to_tokens

    g = torch.Generator(device=CUDA).manual_seed(0)
    per_sample = torch.randn(2, 5, 64, device=CUDA, generator=g).to(dtype)  # the reference sees the same values
    sample_of_token = torch.randint(0, 5, (2, 4096), device=CUDA, generator=g)
    cot = torch.randn(2, 4096, 64, device=CUDA, generator=g).to(dtype)

    def forward_backward(dt, onehot):
        x = per_sample.to(dt).requires_grad_()
        out = to_tokens(x, sample_of_token, onehot=onehot)
        return out, torch.autograd.grad(out, x, cot.to(dt))[0]

    ref_out, ref_grad = forward_backward(torch.float64, False)
    for onehot in (False, True):
        assert torch.equal(forward_backward(dtype, onehot)[0].double(), ref_out)
    out, grad = forward_backward(dtype, None)
    tol = 1e-5 if dtype == torch.float32 else 8e-3  # bf16: the result's own rounding (8 bits)
    assert ((grad.double() - ref_grad).abs().max() / ref_grad.abs().max()).item() < tol


def test_zero3_build_on_cuda_is_partitioned_and_starts_closed(tmp_path):
    out = tmp_path / "build.json"
    torchrun(1, [str(ROOT / "tests" / "dist" / "zero_init_build.py"), str(out), "3", "model=XL"], timeout=300)
    (r,) = json.loads(out.read_text())
    assert r["closed"] is True and r["total"] > 8e8, r


def test_trainer_collectives_run_under_nccl_on_device_tensors(dataset, tmp_path):
    """The real trainer on one GPU under NCCL: a NaN step (the non-finite agreement), validation, checkpoints."""
    out = tmp_path / "probe.json"
    torchrun(1, [str(ROOT / "tests" / "dist" / "collective_devices.py"), str(out), "2",
                 *tiny_model(dataset / "shards", tmp_path / "run", **{
                     "optim.steps": 3, "checkpoint.every": 2, "data.val": str(dataset / "shards"),
                     "logging.val_every": 2, "logging.val_batches": 1, "ema.enabled": True})], timeout=300)
    probe = json.loads(out.read_text())
    assert probe["device"].startswith("cuda"), probe["device"]
    assert probe["records"] and all(r["devices"] == [probe["device"]] for r in probe["records"]), probe


@pytest.fixture(scope="module")
def stage_runs(dataset, tmp_path_factory):
    """3 steps at ZeRO stage 0 and 3, fp32 and bf16, in one launch on one GPU (tests/dist/driver.py)."""
    tmp = tmp_path_factory.mktemp("stages")
    spec = {str(tmp / f"{p}_stage{s}.json"): tiny_model(dataset / "shards", tmp / f"{p}_{s}", **{
        "optim.steps": 3, "parallel.zero_stage": s, "parallel.precision": p}) for p in ("fp32", "bf16") for s in (0, 3)}
    (tmp / "runs.json").write_text(json.dumps(spec))
    torchrun(1, [str(ROOT / "tests" / "dist" / "driver.py"), str(tmp / "runs.json")], timeout=400)
    return {p: [json.loads((tmp / f"{p}_stage{s}.json").read_text())["loss"] for s in (0, 3)] for p in ("fp32", "bf16")}


@pytest.mark.parametrize("precision,rtol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_trainer_steps_give_the_same_losses_at_zero_stage_0_and_3_on_cuda(stage_runs, precision, rtol):
    stage0, stage3 = stage_runs[precision]
    assert all(torch.isfinite(torch.tensor(stage0 + stage3)))
    torch.testing.assert_close(torch.tensor(stage3), torch.tensor(stage0), rtol=rtol, atol=1e-6)


def against_eager_bf16(attention: str, **levers) -> tuple[float, float]:
    """The tiny model (head dim 16) eager in bf16 on CUDA against a copy with parallelize_dit's levers: the
    output's relative error and the gradients' cosine."""
    import copy
    import dataclasses

    from test_model import ARGS, make_items, pack, run, trained_model

    from sora_train.parallel import ParallelDims, parallelize_dit

    eager = trained_model(dataclasses.replace(ARGS, attention=attention, dim=64)).train().to(CUDA, torch.bfloat16)
    other = parallelize_dit(copy.deepcopy(eager), ParallelDims(1, 0, 0, 1), **levers)
    batch = pack(make_items(3), seq_len=64).to(CUDA)
    batch.tokens, batch.text = batch.tokens.bfloat16(), batch.text.bfloat16()
    t = torch.rand(1, ARGS.max_segments, device=CUDA, dtype=torch.bfloat16)
    results = []
    for model in (eager, other):
        out = run(model, batch, t).float()
        out.pow(2).mean().backward()
        results.append((out.detach(), torch.cat([p.grad.float().flatten() for p in model.parameters()])))
    (a, ga), (b, gb) = results
    return ((b - a).norm() / a.norm()).item(), torch.nn.functional.cosine_similarity(ga, gb, dim=0).item()


@pytest.mark.parametrize("lever", ["compile", "float8"])
def test_compiled_and_float8_blocks_compute_the_bf16_function_on_cuda(lever):
    """Inductor's Triton kernels (CPU tests see its C++ ones) and float8 on the device's own GEMMs, forward and
    backward, against the eager bf16 model: compiled within bf16's rounding, float8 within e4m3's (~5% per GEMM)."""
    if lever == "float8":
        pytest.importorskip("torchao.float8")
        if torch.cuda.get_device_capability() < (8, 9):
            pytest.skip("float8 GEMMs need compute capability 8.9")
    err, cosine = against_eager_bf16("varlen", activation_checkpointing="full", compile_blocks=lever == "compile",
                                     float8="tensorwise" if lever == "float8" else "none")
    assert err < (3e-2 if lever == "compile" else 0.12), err
    assert cosine > (0.999 if lever == "compile" else 0.98)


@pytest.mark.parametrize("policy", ["attention", "elementwise"])
def test_op_checkpointing_keeps_the_cuda_attention_kernels(policy):
    """Under parallel.activation_checkpointing=attention|elementwise no attention kernel runs again in backward on
    CUDA either, through torch's varlen custom op (varlen on short samples) and through SDPA per sample
    (varlen:sdpa), with the gradients of no checkpointing in bf16's rounding."""
    import dataclasses

    from test_model import ARGS, CountOps, make_items, pack, run, trained_model

    from sora_train.parallel import ParallelDims, parallelize_dit

    batch = pack(make_items(3), seq_len=64).to(CUDA)
    batch.tokens, batch.text = batch.tokens.bfloat16(), batch.text.bfloat16()
    t = torch.rand(1, ARGS.max_segments, device=CUDA, dtype=torch.bfloat16)
    for attention in ("varlen", "varlen:sdpa"):  # head dim 16
        grads, forward, recomputed = {}, {}, {}
        for ac in ("none", policy):
            model = trained_model(dataclasses.replace(ARGS, attention=attention, dim=64)).train()
            model = parallelize_dit(model.to(CUDA, torch.bfloat16), ParallelDims(1, 0, 0, 1), ac)
            with CountOps() as count:
                out = run(model, batch, t).float()
            forward[ac] = count.calls["attention"]
            with CountOps() as count:
                out.pow(2).mean().backward()
            grads[ac] = torch.cat([p.grad.float().flatten() for p in model.parameters()])
            recomputed[ac] = count.calls["attention"]
        assert forward[policy] == forward["none"] > 0 and recomputed[policy] == 0, (attention, forward, recomputed)
        assert torch.nn.functional.cosine_similarity(grads["none"], grads[policy], dim=0) > 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [128, 64, 12])
def test_the_packed_attention_op_computes_sdpa_per_sequence_on_cuda(dtype, head_dim):
    """sora_train::packed_attention (compiled blocks' per-sequence path) calls cuDNN's or flash's kernels as SDPA's
    autograd does, its backward fed the saved log-sum-exp: SDPA's output and gradients per sequence, within the
    kernels' own run-to-run noise; float32 and head dim 12 take SDPA's other kernels, their backward by formula."""
    from test_model import packed_attention_and_sdpa, packed_qkv

    from sora_train.models.packed_attention import _kernel

    lengths_q, lengths_k = [3000, 0, 1700, 500, 96], [3000, 40, 1700, 0, 96]
    q, k, v = (x.detach().to(CUDA).requires_grad_() for x in packed_qkv(lengths_q, lengths_k, dtype, 8, head_dim))
    direct = _kernel(*(x[:3000].transpose(0, 1)[None] for x in (q, k, v)))
    if dtype == torch.bfloat16 and head_dim % 8 == 0:
        assert direct in ("cudnn", "flash"), direct  # not the fallback by formula
    got, want = packed_attention_and_sdpa(q, k, v, lengths_q, lengths_k)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < (1e-2 if dtype == torch.bfloat16 else 1e-4), (name, direct, err)


def test_compiled_blocks_with_checkpointing_inside_compute_the_eager_function_on_cuda():
    """The checkpoint inside the compiled block (elementwise on the first block, none on the second: the two graphs
    every policy's compiled block takes), the attention one node (torch's varlen op on short samples,
    sora_train::packed_attention one sequence at a time): Inductor's Triton kernels and the recompute it fuses give
    the eager model's output and gradients within bf16's rounding. The other policies differ only in what the same
    machinery keeps (tests/test_model.py)."""
    for attention in ("varlen", "varlen:sdpa"):  # head dim 16
        err, cosine = against_eager_bf16(attention, activation_checkpointing="elementwise", compile_blocks=True,
                                         checkpoint_blocks=1)
        assert err < 3e-2 and cosine > 0.999, (attention, err, cosine)


def test_the_device_clock_times_the_kernels_not_their_launch():
    """The trainer's time/* metrics and the bench's phases read CUDA events: a phase's seconds are its kernels'
    (the host returns from launching them long before they end: a host clock would count them in the next phase)."""
    import time

    from sora_train.engine.metrics import DeviceClock

    clock, a = DeviceClock(CUDA), torch.randn(8192, 8192, device=CUDA, dtype=torch.bfloat16)
    a @ a
    torch.cuda.synchronize()
    host0, t0 = time.perf_counter(), clock.now()
    for _ in range(20):  # ~22 TFLOP: ~30 ms at ~750 TFLOP/s
        a @ a
    t1, launched = clock.now(), time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    assert clock.seconds(t0, t1) == pytest.approx(done - host0, rel=0.25)
    assert launched - host0 < 0.5 * clock.seconds(t0, t1)
