"""W&B offline run contents and run-id continuity; sora-bench output."""

import gzip
import json
import struct
import subprocess
import sys

import pytest
import torch

from distributed import ROOT, env, tiny_model, torchrun

BLOCK = 32768


def wandb_records(path):
    """Records of an offline .wandb file: LevelDB-log framing (7-byte file header, 32 KiB blocks,
    records of crc32 + length + type) around wandb's own protobuf Record messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, out, pos, pending = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:  # block trailer padding
            pos += BLOCK - pos % BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            r = pb.Record()
            r.ParseFromString(pending)
            out.append(r)
    return out


def test_offline_wandb_run_holds_metrics_and_config_and_resume_continues_the_run(dataset, tmp_path):
    base = {"logging.wandb.mode": "offline", "checkpoint.every": 2, "data.seq_len": 512,
            "data.val": str(dataset / "shards"), "logging.val_every": 3, "logging.val_batches": 1}
    # A fresh extensions dir: one process must not JIT-build DeepSpeed's shared-memory all-reduce (45 s).
    ext = tmp_path / "torch_extensions"
    torchrun(1, ["-m", "sora_train.train", *tiny_model(dataset / "shards", tmp_path, **base, **{"optim.steps": 4})],
             extra_env={"TORCH_EXTENSIONS_DIR": str(ext)})
    assert not list(ext.rglob("*.so")), list(ext.rglob("*.so"))
    torchrun(1, ["-m", "sora_train.train", *tiny_model(dataset / "shards", tmp_path, **base, **{"optim.steps": 6})])
    runs = sorted((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and runs[0].name == runs[1].name  # the resumed job continued the same run id
    keys, steps, config = set(), [], {}
    for f in runs:
        for r in wandb_records(f):
            kind = r.WhichOneof("record_type")
            if kind == "history":
                items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
                keys |= set(items)
                if "loss" in items:
                    steps.append(int(items["_step"]))
            elif kind == "run":
                config.update({i.key: i.value_json for i in r.run.config.update})
    assert {"loss", "lr", "grad_norm", "perf/tokens_per_s", "perf/tflops", "time/data_wait_s", "data/skipped",
            "val/loss", "val/loss_t0.1", "val/loss_t0.9"} <= keys
    assert steps == [1, 2, 3, 4, 5, 6]
    timed = [r for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert all(r["time/fwd_bwd_s"] > r["time/optimizer_s"] > 0 and r["time/data_wait_s"] >= 0 for r in timed)
    val_steps = [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
                 if "val/loss" in r]
    assert val_steps == [3, 4, 6]  # every 3 steps, and each run's last step once (not again at step 6)
    assert json.loads(config["model"])["dim"] == 48 and json.loads(config["data"])["seq_len"] == 512


def test_sora_bench_model_and_packing_write_json(dataset, tmp_path):
    profile = tmp_path / "profile.txt"
    model = ["-m", "sora_train.bench", "model", "--model", "tiny", "--seq-len", "256", "--attention", "varlen",
             "--steps", "1", "--warmup", "1", "--peak-tflops", "2"]
    commands = {"trainer": [*model, "--ac", "none", "full", "--profile", str(profile)],  # the step users get
                "bare": [*model, "--bare"],  # the model alone
                "packing": ["-m", "sora_train.bench", "packing", "--data", str(dataset / "shards"), "--seq-len", "1024"],
                "params": ["-m", "sora_train.bench", "model", "--model", "30B", "--params-only"]}
    # All at once: each spends seconds importing torch, and no assertion below compares their speeds.
    running = {name: subprocess.Popen([sys.executable, *cmd] + ([] if name == "params" else
                                                                ["--json", str(tmp_path / f"{name}.json")]),
                                      cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for name, cmd in commands.items()}
    done = {name: p.communicate(timeout=300) + (p.returncode,) for name, p in running.items()}
    for name, (_, err, code) in done.items():
        assert code == 0, (name, err[-2000:])
    rows = {name: json.loads((tmp_path / f"{name}.json").read_text()) for name in ("trainer", "bare", "packing")}
    trainer, (bare,) = rows["trainer"], rows["bare"]
    assert [(t["path"], t["activation_checkpointing"]) for t in trainer] == [("trainer", "none"), ("trainer", "full")]
    assert bare["path"] == "bare" and trainer[0]["zero_stage"] == 3 and trainer[0]["optimizer"] == "adamw"
    assert 0 < trainer[1]["planned_gib"] < trainer[0]["planned_gib"]  # sora-bench plan's memory for each row
    for row in [*trainer, bare]:
        assert row["tokens_per_s"] > 0 and row["tflops"] > 0 and row["mfu"] == pytest.approx(row["tflops"] / 2)
    for row in trainer:  # the step's phases on its own clock: they add up to the step
        assert set(row["phases_s"]) == {"forward", "backward", "optimizer", "ema", "other"}
        assert min(row["phases_s"].values()) >= 0 and row["phases_s"]["backward"] > 0
        assert sum(row["phases_s"].values()) == pytest.approx(row["step_s"], rel=0.05, abs=0.01)
    head, _ = profile.read_text().split("\n\n", 1)  # time by kind of kernel, then the top ops
    kinds = {k.strip(): float(v) for k, v, _, _ in (line.rsplit(None, 3) for line in head.splitlines()[1:])}
    assert head.startswith("CPU time by kind of kernel") and kinds["gemm"] > 0 and kinds["attention"] > 0
    trace = json.loads(gzip.open(f"{profile}.trace.json.gz").read())  # the step's timeline beside the table
    assert any("aten::mm" in e.get("name", "") for e in trace["traceEvents"])
    # One FLOP count (models/flops.py) for both: the same rows, the same work per step.
    assert trainer[0]["tflops"] * trainer[0]["step_s"] == pytest.approx(bare["tflops"] * bare["step_s"], rel=1e-9)
    (row,) = rows["packing"]
    assert row["samples"] >= 3 * 48 and row["packing_efficiency"] > row["pad_to_longest_efficiency"]
    assert "params=" in done["params"][0]


def test_a_configuration_that_fails_mid_step_is_reported_and_cleaned_up_before_the_next(tmp_path):
    """sora-bench model runs configurations one after another in one process (on a GPU: AC none may run out of
    memory, then selective and full must still measure). A failure mid-step is an error row; its trainer is closed
    and its run directory removed, and the next configuration measures."""
    script = (
        "import sys, torch\n"
        "from sora_train import bench, train\n"
        "step, calls = train.Trainer.train_step, []\n"
        "def failing(self, batches):\n"
        "    calls.append(self)\n"
        "    if self is calls[0]:\n"
        "        raise torch.OutOfMemoryError('CUDA out of memory (simulated)')\n"
        "    return step(self, batches)\n"
        "train.Trainer.train_step = failing\n"
        "sys.argv = ['sora-bench', 'model', '--model', 'tiny', '--seq-len', '256', '--ac', 'none', 'full',\n"
        "            '--steps', '1', '--warmup', '1', '--json', sys.argv[1]]\n"
        "bench.main()\n")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    r = subprocess.run([sys.executable, "-c", script, str(tmp_path / "rows.json")], cwd=ROOT,
                       env={**env(), "TMPDIR": str(tmp)}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    failed, measured = json.loads((tmp_path / "rows.json").read_text())
    assert "out of memory" in failed["error"] and "step_s" not in failed
    assert measured["activation_checkpointing"] == "full" and measured["step_s"] > 0
    assert not list(tmp.glob("sora_bench_*")), list(tmp.iterdir())  # both run directories removed


def test_sora_bench_attention_compares_each_backend_with_the_float32_reference():
    from sora_train.bench.attention import attention_numerics

    rows = attention_numerics(512, heads=2, head_dim=16, text_len=32, backends=["sdpa", "varlen", "varlen:sdpa"],
                              steps=1, device=torch.device("cpu"))
    assert [r["kernel"] for r in rows] == ["sdpa", "sdpa_per_sequence", "sdpa_per_sequence"]
    for r in rows:  # float32 on CPU: the same function up to rounding, forward and backward, self and cross
        errs = [v for k, v in r.items() if k.endswith("_rel_err")]
        assert len(errs) == 8 and max(errs) < 1e-5, r
        assert r["self_finite"] and r["cross_finite"] and r["fwd_bwd_ms"] > 0 and r["segments"] >= 3


def test_sora_bench_packing_lengths_compares_the_token_and_cost_packers_on_the_same_streams():
    from sora_train.bench.packing import bench_balance

    tokens, cost = bench_balance("0.7:1024-4096,0.3:8192-32768", 65536, dp=4, grad_accum=1, samples=300,
                                 lookahead=32, model="1B")
    assert (tokens["balance"], cost["balance"]) == ("tokens", "cost")
    for r in (tokens, cost):
        assert r["samples"] == 4 * 300 and r["samples_lost"] == 0 and r["samples_repeated"] == 0
    assert cost["step_rank_max_over_mean"] < tokens["step_rank_max_over_mean"] - 0.1
    assert cost["row_cost_cv"] < 0.5 * tokens["row_cost_cv"] and cost["throughput_vs_tokens"] > 1.05


def test_plan_enumerates_layouts_prices_their_traffic_and_matches_the_measured_memory():
    from sora_train.bench.common import load_preset
    from sora_train.models.dit import count_params
    from sora_train.plan import ACT_TENSORS_RECOMPUTE, Cluster, layouts, plan

    assert sorted(layouts(8, 12)) == sorted([(8, 1, 1), (4, 1, 2), (2, 1, 4), (1, 1, 8), (4, 2, 1), (2, 2, 2),
                                             (1, 2, 4), (2, 4, 1), (1, 4, 2)])  # Ulysses divides the 12 heads
    a = load_preset("1B")
    rows = plan(a, 65536, Cluster(gpus=16))
    by = {(r["ulysses"], r["ring"]): r for r in rows}
    assert by[(1, 1)]["ulysses_s"] == by[(1, 1)]["ring_s"] == 0
    assert by[(2, 1)]["ring_s"] == 0 < by[(2, 1)]["ulysses_s"] and by[(1, 2)]["ulysses_s"] == 0 < by[(1, 2)]["ring_s"]
    assert by[(4, 4)]["memory_gib"] < by[(4, 1)]["memory_gib"] < by[(1, 1)]["memory_gib"]
    # A ring that leaves the node (sp 16 > 8 GPUs per node) pays the inter-node bandwidth: ~8x the same volume.
    assert by[(1, 16)]["ring_s"] > 5 * by[(1, 8)]["ring_s"]
    assert rows == sorted(rows, key=lambda r: (not r["fits"], -r["tokens_per_s"]))
    # The activation model against the measured single-GPU step (docs/performance.md: 1B, 64k, AC on, 19.7 GiB
    # with bf16 weights, gradients and AdamW states, 8 bytes per parameter).
    act = (a.depth + ACT_TENSORS_RECOMPUTE) * 65536 * a.dim * 2
    assert (count_params(a) * 8 + act) / 2**30 == pytest.approx(19.7, rel=0.05)
    # Through the trainer (ZeRO-3's 20 bytes per parameter), one H200: full checkpointing 36.5 GiB, all but the
    # attention kernels 45.2 GiB, selective and none out of 141 GiB (docs/performance.md).
    one = {ac: plan(a, 65536, Cluster(gpus=1), ac=ac)[0]["memory_gib"]
           for ac in ("full", "attention", "elementwise", "selective", "none")}
    assert one["full"] == pytest.approx(36.5, rel=0.08) and one["attention"] == pytest.approx(45.2, rel=0.08)
    assert one["attention"] < one["elementwise"] < 141 < one["selective"] < one["none"]
    # parallel.checkpoint_blocks: between full and none, fewer checkpointed blocks holding more
    part = [plan(a, 65536, Cluster(gpus=1), ac="full", checkpoint_blocks=k)[0]["memory_gib"] for k in (24, 16, 12, 0)]
    assert part[0] == one["full"] and part[-1] == one["none"] and part == sorted(part) and part[2] < 141
    # Compiled blocks keep less without checkpointing (one graph: the compiler recomputes cheap work itself) and the
    # same with full checkpointing; elementwise fits where eager selective does not.
    compiled = {ac: plan(a, 65536, Cluster(gpus=1), ac=ac, compiled=True)[0]["memory_gib"]
                for ac in ("full", "attention", "elementwise", "none")}
    assert compiled["none"] < one["none"] and compiled["elementwise"] < 141 and compiled["full"] <= one["full"]
    assert compiled["full"] < compiled["attention"] < compiled["elementwise"] < compiled["none"]


def test_bench_activations_counts_what_a_block_keeps():
    """sora-bench activations: full checkpointing keeps each block's input, one [tokens, dim] tensor exactly;
    without it a block keeps dozens; eager op policies are refused (their storage is invisible to the hooks)."""
    from sora_train.bench.memory import kept_per_block

    assert kept_per_block("tiny", 256, "full", False) == pytest.approx(1.0)
    assert kept_per_block("tiny", 256, "none", False) > 20
    with pytest.raises(ValueError, match="--ac attention keeps its tensors where saved-tensor hooks cannot see"):
        kept_per_block("tiny", 256, "attention", False)


def test_step_phases_time_each_phase_of_the_trainers_step_from_outside():
    """StepPhases wraps the trainer's forward, backward, optimizer step and EMA update for the bench's run only:
    each phase's time summed over micro-batches, the rest of the step as `other`, the methods restored after."""
    import time
    from types import SimpleNamespace

    from sora_train.bench.breakdown import StepPhases

    class Engine:
        def backward(self, loss):
            time.sleep(0.04)

    class Trainer:
        def __init__(self):
            self.engine, self.ema = Engine(), None  # no EMA: no such phase

        def loss(self):
            time.sleep(0.02)
            return 1.0

        def engine_step(self):
            time.sleep(0.01)

        def train_step(self):
            for _ in range(2):  # two micro-batches
                self.loss()
                self.engine.backward(1.0)
                self.engine_step()
            time.sleep(0.03)  # outside every phase

    trainer = Trainer()
    with StepPhases(trainer, torch.device("cpu")) as phases:
        for _ in range(3):
            phases.step(trainer.train_step)
    assert "loss" not in vars(trainer) and "backward" not in vars(trainer.engine)  # the class's methods again
    summary = phases.summary(steps=2)
    assert list(summary) == ["forward", "backward", "optimizer", "other"]
    assert summary["forward"] >= 0.04 and summary["backward"] >= 0.08 and summary["optimizer"] >= 0.02
    assert summary["other"] >= 0.03
    assert SimpleNamespace(**summary).backward > summary["forward"] > summary["optimizer"]


@pytest.mark.parametrize("name,kind", [
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
    ("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_TNN", "gemm"),
    ("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128", "gemm"),
    ("aten::addmm", "gemm"),
    ("triton_poi_fused__to_copy_add_mul_native_layer_norm_0", "compiled (fused)"),
    ("## Call CompiledFxGraph fuhhpugjflz55xczfq2l3tafk7cuipfecetpm4z6lye ##", "compiled (fused)"),
    ("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<c10::BFloat16, float>", "norm"),
    ("void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float, at::native::NormTwoOps<float>>>",
     "reductions (loss, gradient norm)"),
    ("void multi_tensor_apply_kernel<TensorListMetadata<4>, AdamFunctor<float>>", "optimizer, EMA"),
    ("ncclDevKernel_AllGather_RING_LL", "communication"),
    ("void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>", "copy, fill, cast"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::FillFunctor<c10::BFloat16>>", "copy, fill, cast"),
    ("void at::native::index_elementwise_kernel<128, 4, scatter_gather>", "other elementwise"),
    ("void at::native::vectorized_elementwise_kernel<8, at::native::CUDAFunctor_add<c10::BFloat16>>",
     "other elementwise"),
])
def test_a_profiles_kernels_are_sorted_by_kind(name, kind):
    from sora_train.bench.breakdown import kernel_kind

    assert kernel_kind(name) == kind


def test_the_meter_sums_each_micro_batchs_phases_and_keeps_one_micro_batchs_clock_points():
    """A log window of any length (logging.every=0: the whole run) holds one micro-batch's CUDA events, not all."""
    from sora_train.engine.metrics import Throughput

    meter = Throughput(None, 1)
    for k in range(5):  # host-clock points (CPU): before the batch, forward, optimizer step, after
        meter.add_phases(10.0 * k, 10.0 * k + 1, 10.0 * k + 4, 10.0 * k + 6)
        assert len(meter.pending) == 1
    out = meter.summary()
    assert (out["time/data_wait_s"], out["time/fwd_bwd_s"], out["time/optimizer_s"]) == (5.0, 15.0, 10.0)
    meter.reset()
    assert meter.summary()["time/fwd_bwd_s"] == 0.0
