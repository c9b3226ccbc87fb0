"""Stages (init_from): a new run from another run's weights, at step 0 with a fresh optimizer and data position."""

import json

import pytest
import torch

from distributed import tiny_model, torchrun


def fp32(step_dir) -> tuple[dict, dict]:
    from sora_train.inference.export import consolidated_ema, fp32_weights

    return fp32_weights(step_dir), consolidated_ema(step_dir)


@pytest.fixture(scope="module")
def parent(dataset, tmp_path_factory):
    """4 steps of the tiny model with EMA on 2 ranks (ZeRO-3), exported."""
    from sora_train.inference.export import export

    out = tmp_path_factory.mktemp("stage1") / "run"
    torchrun(2, ["-m", "sora_train.train", *tiny_model(dataset / "shards", out, **{
        "optim.steps": 4, "checkpoint.every": 4, "ema.enabled": True})])
    export(out / "checkpoints", out / "export")
    return out


@pytest.mark.parametrize("source,ranks", [("export", 1), ("checkpoints", 2)])
def test_a_stage_starts_from_the_parents_weights_and_ema(dataset, parent, tmp_path, source, ranks):
    """Built as a stage (before any step), on another world size or the same: the parent's fp32 weights and EMA,
    bit for bit, at step 0; a shape-neutral model key may change."""
    out = tmp_path / "start.pt"
    r = torchrun(ranks, ["tests/dist/stage_start.py", str(out), *tiny_model(dataset / "shards", tmp_path / "child", **{
        "ema.enabled": True, "model.attention": "sdpa", "init_from.path": parent / source})])
    assert f"stage from {parent / source}" in r.stdout and "model keys changed: attention" in r.stdout
    got = torch.load(out, weights_only=True)
    weights, ema = fp32(parent / "checkpoints" / "step_00000004")
    assert got["step"] == 0
    assert got["weights"].keys() == weights.keys() and all(torch.equal(got["weights"][n], weights[n]) for n in weights)
    assert all(torch.equal(got["ema"][n], ema[n]) for n in ema)


def test_a_stage_trains_on_its_own_data_and_records_its_lineage(dataset, parent, tmp_path):
    out = tmp_path / "child"
    torchrun(1, ["-m", "sora_train.train", *tiny_model(dataset / "shards", out, **{
        "optim.steps": 2, "checkpoint.every": 2, "init_from.path": parent / "export", "data.seed": 7})])
    meta = json.loads((out / "checkpoints" / "step_00000002" / "meta.json").read_text())
    assert meta["step"] == 2 and meta["lineage"][0]["step"] == 4 and meta["lineage"][0]["out_dir"] == str(parent)
    position = json.loads((out / "checkpoints" / "step_00000002" / "data_position.json").read_text())
    assert position["seed"] == 7 and sum(len(p["consumed"]) for e in position["epochs"].values()
                                         for p in e.values()) + 8 * sum(len(d) for d in position["done"].values()) \
        <= 2 * 16  # two steps' samples at most: a fresh position, not the parent's
    torchrun(1, ["-m", "sora_train.train", *tiny_model(dataset / "shards", out, **{
        "optim.steps": 3, "checkpoint.every": 3, "init_from.path": parent / "export", "data.seed": 7})])
    meta = json.loads((out / "checkpoints" / "step_00000003" / "meta.json").read_text())
    assert meta["lineage"][0]["step"] == 4  # a resumed stage keeps where it came from


def test_a_stage_that_changes_parameter_shapes_is_refused_by_name(dataset, parent, tmp_path):
    r = torchrun(1, ["-m", "sora_train.train", *tiny_model(dataset / "shards", tmp_path / "child", **{
        "model.dim": 64, "init_from.path": parent / "export"})], check=False)
    assert r.returncode != 0 and "model.dim: 48 -> 64, which changes its parameters" in r.stderr, r.stderr[-2000:]
    r = torchrun(1, ["-m", "sora_train.train", *tiny_model(dataset / "shards", tmp_path / "child2", **{
        "init_from.path": parent / "export", "init_from.optimizer": True})], check=False)
    assert r.returncode != 0 and "it is an export (no optimizer state)" in r.stderr, r.stderr[-2000:]
    left = {p.name for p in (tmp_path / "child2").glob("*")} | {p.name for p in (tmp_path / "child2").glob(".lock")}
    assert not left & {".lock", "config.yaml", "checkpoints"}, left  # refused before the run took its directory
