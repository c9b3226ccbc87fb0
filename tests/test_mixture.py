"""Weighted mixtures of shard sources (data.sources): token shares, exact and elastic resume, changes on resume."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from omegaconf import OmegaConf

from sora_train.data import PackedLoader, StreamPosition, StreamSpec
from sora_train.data.config import SourceConfig
from sora_train.data.mixture import MixturePosition, sources_of

SPEC = StreamSpec(seq_len=512, text_len=256, rows=2, max_per_row=32, lookahead=16, seed=0, epochs=None,
                  caption_dropout=0.0, oversize="crop_time", patch=(1, 2, 2), channels=4, text_dim=8)


def npy(a) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def write_source(root: Path, name: str, samples: int, frames: tuple[int, int], shards: int, seed: int = 0) -> Path:
    """Shards of random latents [4,T,8,8] (16 tokens per frame at patch 1x2x2), T drawn from `frames`, with the
    manifest sora-encode writes (per-shard samples and tokens)."""
    out = root / name
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per = -(-samples // shards)
    entries = []
    for k in range(shards):
        path, tokens, n, grids = out / f"shard-{k:06d}.tar", 0, 0, []
        with wds.TarWriter(str(path)) as sink:
            for j in range(k * per, min(samples, (k + 1) * per)):
                t = int(rng.integers(frames[0], frames[1] + 1))
                sink.write({"__key__": f"{name}_{j:05d}", "latent.npy": npy(rng.standard_normal((4, t, 8, 8)).astype(np.float16)),
                            "text.npy": npy(np.ones((3, 8), np.float16)), "txt": f"{name} {j}",
                            "json": json.dumps({"latent_shape": [4, t, 8, 8]})})
                tokens, n = tokens + 16 * t, n + 1
                grids.append([t, 16])
        entries.append({"shard": path.name, "samples": n, "tokens": tokens, "grids": grids})
    (out / "manifest.json").write_text(json.dumps({"shards": entries, "codec": {"latent_channels": 4},
                                                   "text_encoder": {"width": 8}, "patch_size": [1, 2, 2]}))
    return out


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Sources of 10x different size and sample length: many short clips, few long ones, and a middle one."""
    root = tmp_path_factory.mktemp("mix")
    return {"short": write_source(root, "short", 400, (1, 2), 8, seed=1),  # 16-32 tokens per sample
            "long": write_source(root, "long", 40, (10, 20), 4, seed=2),  # 160-320 tokens
            "mid": write_source(root, "mid", 120, (3, 8), 4, seed=3)}


def mixture(dirs: dict, weights: dict):
    return sources_of(OmegaConf.create({n: OmegaConf.structured(SourceConfig(train=str(dirs[n]), weight=w))
                                        for n, w in weights.items()}))


def source_of(key: str) -> str:
    return key.split("_")[0]


def token_shares(batches) -> dict[str, float]:
    tokens = {}
    for b in batches:
        for r, row in enumerate(b.keys):
            for j, key in enumerate(row):
                tokens[source_of(key)] = tokens.get(source_of(key), 0) + int(b.grids[r, j].prod())
    total = sum(tokens.values())
    return {k: v / total for k, v in tokens.items()}


def take(loader, n: int) -> list:
    it, out = iter(loader), []
    for _ in range(n):
        out.append(next(it))
    return out


def keys(batches) -> list[str]:
    return [k for b in batches for row in b.keys for k in row]


def test_token_shares_follow_the_weights_over_short_windows(three):
    weights = {"short": 0.5, "long": 0.3, "mid": 0.2}
    loader = PackedLoader(mixture(three, weights), SPEC, num_workers=0)
    batches = take(loader, 60)  # 120 rows of 512 tokens: the short source cycles ~4 epochs, the long one ~1.5
    shares = token_shares(batches)
    assert all(abs(shares[n] - w) < 0.02 for n, w in weights.items()), shares
    for start in range(0, 60, 5):  # any 10 rows (5 batches of 2): within a few % as well
        window = token_shares(batches[start : start + 5])
        assert all(abs(window[n] - w) < 0.08 for n, w in weights.items()), (start, window)
    assert loader.stats.as_metrics()["data/token_share/long"] == pytest.approx(shares["long"])


def test_a_sources_frame_cap_counts_on_its_clock_as_trained(three):
    """max_frames: 2 on the long clips (10-20 frames): their clock counts the capped tokens, so the shares of the
    trained tokens still follow the weights (counting the manifest's uncapped tokens starved the capped source)."""
    sources = mixture(three, {"long": 0.5, "mid": 0.5})
    capped = sources_of(OmegaConf.create({"long": {"train": str(three["long"]), "weight": 0.5, "max_frames": 2},
                                          "mid": {"train": str(three["mid"]), "weight": 0.5}}))
    assert sum(capped[0].shard_tokens) == 40 * 2 * 16 < sum(sources[0].shard_tokens)
    shares = token_shares(take(PackedLoader(capped, SPEC, num_workers=0), 30))
    assert abs(shares["long"] - 0.5) < 0.03, shares


def test_sora_inspect_reports_a_mixtures_token_shares_and_packing_without_training(three, capsys):
    from data_tools.inspect_shards import main

    main(["--mix", f"short={three['short']}:2", f"long={three['long']}:1", f"mid={three['mid']}:1", "--rows", "120",
          "--seq-len", "512", "--lookahead", "16", "--max-per-row", "32"])
    report = json.loads(capsys.readouterr().out)
    assert report["weight_share"] == {"short": 0.5, "long": 0.25, "mid": 0.25}
    assert all(abs(report["token_share"][n] - w) < 0.02 for n, w in report["weight_share"].items()), report
    assert 0.85 < report["packing_efficiency"] <= 1.0


@pytest.mark.parametrize("arg, message", [
    ("a=/no/such/shards:1", "shard source '/no/such/shards' is not a directory"),
    ("a={short}", "--mix a=.*: give NAME=SHARDS:WEIGHT"),
    ("a={short}:-1", r"data.sources.a.weight=-1.0: weights are >= 0"),
    ("a={short}:0", "every weight is 0"),
])
def test_sora_inspect_refuses_a_bad_mix_in_one_line(three, capsys, arg, message):
    import re

    from data_tools.inspect_shards import main

    with pytest.raises(SystemExit) as e:
        main(["--mix", arg.format(short=three["short"])])
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(message, err) and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_mixture_continues_the_uninterrupted_stream_exactly(three, workers):
    weights = {"short": 0.5, "long": 0.3, "mid": 0.2}
    straight = keys(take(PackedLoader(mixture(three, weights), SPEC, num_workers=workers), 30))
    first = PackedLoader(mixture(three, weights), SPEC, num_workers=workers)
    before = keys(take(first, 11))
    resumed = PackedLoader(mixture(three, weights), SPEC, num_workers=workers, position=first.state_dict())
    assert before + keys(take(resumed, 19)) == straight


def test_elastic_resume_of_a_mixture_consumes_every_sample_once(three):
    """Two ranks read 5 batches each, their positions merge, one rank (2 workers) finishes the epoch: every
    sample of every source exactly once."""
    spec = StreamSpec(**{**SPEC.__dict__, "epochs": 1})
    weights = {"short": 0.5, "long": 0.3, "mid": 0.2}
    ranks = [PackedLoader(mixture(three, weights), spec, dp_rank=r, dp_size=2, num_workers=1) for r in range(2)]
    seen = [k for ld in ranks for k in keys(take(ld, 5))]
    merged = MixturePosition.merge([ld.position for ld in ranks], base=ranks[0].start)
    rest = PackedLoader(mixture(three, weights), spec, num_workers=2, position=merged.state_dict())
    seen += keys(rest)
    assert len(seen) == len(set(seen)) == 400 + 40 + 120


def test_weights_may_change_and_sources_be_added_on_resume_but_not_removed(three, tmp_path):
    first = PackedLoader(mixture(three, {"short": 0.5, "long": 0.5}), SPEC)
    seen = keys(take(first, 10))
    saved = first.state_dict()
    # New weights and a new source: the clocks restart from what is consumed, so the shares follow the new
    # weights at once (a source whose weight dropped is not starved until the others catch up).
    after = PackedLoader(mixture(three, {"short": 0.2, "long": 0.4, "mid": 0.4}), SPEC, position=saved)
    batches = take(after, 30)
    shares = token_shares(batches)
    assert all(abs(shares[n] - w) < 0.03 for n, w in {"short": 0.2, "long": 0.4, "mid": 0.4}.items()), shares
    assert set(seen).isdisjoint(keys(batches[:3]))  # nothing consumed comes again
    with pytest.raises(ValueError, match=r"source\(s\) \['long'\] are missing.*weight=0"):
        PackedLoader(mixture(three, {"short": 1.0}), SPEC, position=saved)
    with pytest.raises(ValueError, match="one source's \\(data.train\\)"):
        PackedLoader(mixture(three, {"short": 1.0}), SPEC, position=StreamPosition(0, "x").state_dict())
    kept = PackedLoader(mixture(three, {"short": 1.0, "long": 0.0}), SPEC, position=saved)  # weight 0: kept, unread
    assert {source_of(k) for k in keys(take(kept, 5))} == {"short"}
    assert kept.state_dict()["mixture"]["long"] == saved["mixture"]["long"]


def test_the_trainer_resumes_a_mixture_exactly(dataset, tmp_path):
    """sora-train on two sources (data.sources from the command line): a run stopped at step 4 and resumed
    trains steps 5-6 on the same batches as a straight run (the same losses), and logs each source's share."""
    from distributed import step_losses, tiny_model, torchrun

    def run(out, steps):
        args = [a for a in tiny_model(dataset / "shards", out, **{"optim.steps": steps, "checkpoint.every": 2})
                if not a.startswith("data.train=")]
        torchrun(1, ["-m", "sora_train.train", *args, f"+data.sources.a={{train: {dataset / 'shards'}, weight: 0.7}}",
                     f"+data.sources.b={{train: {dataset / 'shards'}, weight: 0.3, caption_dropout: 0.5}}"])

    run(tmp_path / "straight", 6)
    run(tmp_path / "parts", 4)
    run(tmp_path / "parts", 6)
    straight, parts = step_losses(tmp_path / "straight"), step_losses(tmp_path / "parts")
    assert [parts[s] for s in (5, 6)] == [straight[s] for s in (5, 6)]
    rows = [json.loads(line) for line in open(tmp_path / "straight" / "metrics.jsonl")]
    shares = [r for r in rows if "data/token_share/a" in r][-1]
    for name in ("a", "b"):  # each source's loss (in the steps that drew it), beside its share of the tokens
        assert [r[f"loss/{name}"] > 0 for r in rows if f"loss/{name}" in r].count(True) >= 2
    assert 0.5 < shares["data/token_share/a"] < 0.9 and shares["data/token_share/a"] + shares["data/token_share/b"] == pytest.approx(1)


def test_a_mixture_run_resumed_on_another_world_size_trains_on_every_sample_once(dataset, tmp_path):
    """2 ranks for 4 steps, then 1 rank to step 8 (DeepSpeed's universal checkpoint): the merged positions of the
    ranks hand over every source's progress, so no sample is trained on twice and none skipped."""
    from distributed import tiny_model, torchrun

    out = tmp_path / "run"

    def run(ranks, steps):
        args = [a for a in tiny_model(dataset / "shards", out, **{"optim.steps": steps, "checkpoint.every": 2,
                                                                   "logging.sample_ids": True})
                if not a.startswith("data.train=")]
        torchrun(ranks, ["-m", "sora_train.train", *args, f"+data.sources.a={{train: {dataset / 'shards'}, weight: 2}}",
                         f"+data.sources.b={{train: {dataset / 'shards'}, weight: 1}}"])

    run(2, 4)
    run(1, 8)
    records = [json.loads(line) for f in sorted((out / "sample_ids").glob("dp*.jsonl")) for line in open(f)]
    ids = [tuple(i) for r in records for i in r["ids"]]
    assert sorted({r["step"] for r in records}) == list(range(1, 9))
    assert len(ids) == len(set(ids)) and {i[0] for i in ids} == {0, 1}  # each once; both sources drawn
    # The saved position counts, per source, exactly the samples trained on (8 per finished shard).
    position = json.loads((out / "checkpoints" / "step_00000008" / "data_position.json").read_text())
    consumed = {n: sum(len(p["consumed"]) for e in pos["epochs"].values() for p in e.values())
                + sum(8 * len(d) for d in pos["done"].values()) for n, pos in position["mixture"].items()}
    assert consumed == {n: sum(1 for i in ids if i[0] == k) for k, n in enumerate(["a", "b"])}
