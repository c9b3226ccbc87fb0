"""The project's own sbatch templates, submitted to a real two-node SLURM cluster on localhost."""

import json
import time
from pathlib import Path

import pytest

from distributed import env as dist_env
from distributed import step_losses, tiny_model
from slurm_cluster import Cluster, ensure_installed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    reason = ensure_installed()
    if reason:
        pytest.skip(reason)
    c = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        c.start()
        yield c
    finally:
        c.stop()


def job_env():
    return {**dist_env(), "MASTER_ADDR": "127.0.0.1", "OMP_NUM_THREADS": "1"}


TRAIN_ARGS = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=20",
              "--export=ALL", "--signal=USR1@1"]


def train_overrides(dataset, **extra):
    # out_dir is set by the template from the job id; drop the helper's
    return [o for o in tiny_model(dataset / "shards", Path("unused"), **{"data.seq_len": 512, **extra})
            if not o.startswith("out_dir=")]


def test_two_node_zero3_training_job_completes_with_a_checkpoint(cluster, dataset, tmp_path):
    run_dir = tmp_path / "run"
    job = cluster.sbatch(*TRAIN_ARGS, "slurm/train.sbatch", *train_overrides(dataset, **{"optim.steps": 6}),
                         env={**job_env(), "SORA_RUN_DIR": str(run_dir)})
    state = cluster.wait(job, timeout=400)
    logs = "".join(p.read_text() for p in sorted((run_dir / "logs").glob("*")) if p.is_file())
    assert state[job] == "COMPLETED", logs[-4000:]
    assert (run_dir / "checkpoints" / "latest").read_text() == "step_00000006"
    meta = json.loads((run_dir / "checkpoints" / "step_00000006" / "meta.json").read_text())
    assert meta["world_size"] == 2
    assert {p.name for p in (run_dir / "logs").glob("rank-*.log")} == {"rank-0.log", "rank-1.log"}
    assert sorted(step_losses(run_dir)) == list(range(1, 7))


def test_preempted_job_checkpoints_requeues_and_loses_no_step(cluster, dataset, tmp_path):
    overrides = train_overrides(dataset, **{"optim.steps": 24})
    ref_dir, run_dir = tmp_path / "reference", tmp_path / "preempted"
    ref = cluster.sbatch(*TRAIN_ARGS, "slurm/train.sbatch", *overrides, env={**job_env(), "SORA_RUN_DIR": str(ref_dir)})
    job = cluster.sbatch(*TRAIN_ARGS, "slurm/train.sbatch", *overrides, env={**job_env(), "SORA_RUN_DIR": str(run_dir)})
    metrics = run_dir / "metrics.jsonl"
    end = time.time() + 300
    while time.time() < end and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        time.sleep(0.5)
    cluster.run("scancel", "--signal=USR1", job)  # what SLURM sends before a time limit or preemption
    cluster.wait(ref, timeout=600)
    end = time.time() + 420
    # The requeued job runs again under the same id, after SLURM's hold (the test cluster's cred_expire=10 s).
    while time.time() < end and "finished with exit code 0" not in (run_dir / "logs" / "jobs.txt").read_text():
        time.sleep(1)
    jobs = (run_dir / "logs" / "jobs.txt").read_text()
    assert "requeueing" in jobs and "restart 1" in jobs, jobs
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == list(range(1, 25)), steps  # none lost, none repeated
    assert any("preempted_by_signal" in r for r in rows)
    assert step_losses(run_dir) == step_losses(ref_dir)


def test_encode_array_job_writes_every_shard_once_after_a_killed_task(cluster, tmp_path):
    from data_tools.synthetic import generate

    captions = generate(tmp_path / "raw", 12, seed=5, min_size=32, max_size=48, min_frames=4, max_frames=8)
    out = tmp_path / "shards"
    args = ["--export=ALL", "--cpus-per-task=1", "slurm/encode.sbatch", "--captions", str(captions), "--out",
            str(out), "--clips-per-shard", "2", "--max-pixels", "1024", "--max-frames", "4"]
    first = cluster.sbatch("--array=0-2", "--hold", *args, env=dist_env())
    cluster.run("scancel", f"{first}_1")  # task 1 is killed before it writes anything
    (out).mkdir(parents=True, exist_ok=True)
    (out / "shard-000001.tar.tmp").write_bytes(b"half a tar")  # what a kill mid-write leaves
    cluster.run("scontrol", "release", first)
    cluster.wait(first, timeout=300)
    assert not (out / "manifest.json").exists()
    done_first = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    assert set(done_first) == {"shard-000000.tar", "shard-000002.tar", "shard-000003.tar", "shard-000005.tar"}
    again = cluster.sbatch("--array=0-2", *args, env=dist_env())
    states = cluster.wait(again, timeout=300)
    assert set(states.values()) == {"COMPLETED"}, states
    manifest = json.loads((out / "manifest.json").read_text())
    assert [s["shard"] for s in manifest["shards"]] == [f"shard-{i:06d}.tar" for i in range(6)]
    assert manifest["samples"] + manifest["failures"] == 12
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar") if p.name in done_first} == done_first
    assert not list(out.glob("*.tmp"))
    keys = set()
    import webdataset as wds

    for shard in sorted(out.glob("*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            assert s["__key__"] not in keys
            keys.add(s["__key__"])
    assert len(keys) == manifest["samples"]
