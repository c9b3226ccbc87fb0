import io
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data_tools.encode import EncodePolicy, frame_indices, npy_bytes, prepare_frames
from sora_train.codecs import PixelCodec
from sora_train.data.packing import Item, Packer
from sora_train.data import (DataQualityError, ManifestMismatch, PackedLoader, StreamPosition, StreamSpec,
                             check_manifest, list_shards, load_manifest, unpack)
from sora_train.video_io import read_video

SPEC = StreamSpec(seq_len=512, text_len=96, rows=2, max_per_row=16, lookahead=8, seed=0, epochs=1, caption_dropout=0.0,
                  oversize="crop_time", patch=(1, 2, 2), channels=48, text_dim=384)


def all_keys(loader):
    return [k for b in loader for row in b.keys for k in row]


def test_round_trip_video_to_packed_batch_is_exact(dataset):
    shards = dataset / "shards"
    manifest = load_manifest(str(shards))
    assert manifest["samples"] == 48 and len(manifest["shards"]) == 6
    rows = [json.loads(line) for line in open(dataset / "raw" / "captions.jsonl")]
    codec, policy = PixelCodec((1, 4, 4)), EncodePolicy(patch_size=(1, 2, 2), max_pixels=48 * 48, max_frames=8)
    checked = 0
    for batch in PackedLoader(str(shards), SPEC):
        latents = unpack(batch, batch.tokens, SPEC.patch, SPEC.channels)
        for r, row_keys in enumerate(batch.keys):
            for key, latent in zip(row_keys, latents[r]):
                chunk, j = (int(x) for x in key[1:].split("_"))
                frames, fps = read_video(dataset / "raw" / rows[chunk * 8 + j]["path"])
                expected = codec.encode(prepare_frames(frames, fps, policy, codec))[0].half().float()
                assert torch.equal(latent, expected), key
                checked += 1
    assert checked == 48


@pytest.mark.parametrize("num_frames", [8, 14, 15, 47])
def test_span_policy_keeps_frames_from_first_to_last(num_frames):
    codec = PixelCodec((1, 4, 4))
    idx = frame_indices(num_frames, 24.0, EncodePolicy(max_frames=8, span=True), codec)
    assert len(idx) == 8 and idx[0] == 0 and idx[-1] == num_frames - 1
    assert all(b > a for a, b in zip(idx, idx[1:]))
    assert frame_indices(num_frames, 24.0, EncodePolicy(max_frames=8), codec) == list(range(8))


@pytest.mark.parametrize("workers", [0, 2])
def test_dp_ranks_and_workers_cover_one_epoch_exactly_once(dataset, workers):
    seen = [all_keys(PackedLoader(str(dataset / "shards"), SPEC, dp_rank=r, dp_size=2, num_workers=workers))
            for r in range(2)]
    assert set(seen[0]).isdisjoint(seen[1])
    together = seen[0] + seen[1]
    assert len(together) == len(set(together)) == 48


def test_packing_puts_whole_samples_in_rows_within_budget(dataset):
    for b in PackedLoader(str(dataset / "shards"), SPEC):
        assert b.tokens.shape[1:] == (512, 192) and b.text.shape[1] == 96
        for r in range(b.seg.shape[0]):
            segs = b.seg[r][b.seg[r] > 0]
            assert torch.all(segs[1:] >= segs[:-1])  # contiguous segments in order
            for j in range(len(b.keys[r])):
                g = b.grids[r, j]
                assert int((b.seg[r] == j + 1).sum()) == int(g.prod())
                assert int((b.text_seg[r] == j + 1).sum()) > 0


def _take(loader, n):
    """The first n batches (fewer where the rank's share of a finite epoch is smaller)."""
    return list(itertools.islice(iter(loader), n))


@pytest.mark.parametrize("workers,balance", [(0, False), (2, False), (2, True)])
def test_resume_gives_exactly_the_uninterrupted_batches(dataset, workers, balance):
    spec = StreamSpec(**{**SPEC.__dict__, "epochs": None, "rows": 1, "seq_len": 384, "balance": balance})  # endless
    full = _take(PackedLoader(str(dataset / "shards"), spec, num_workers=workers), 40)
    first = PackedLoader(str(dataset / "shards"), spec, num_workers=workers)
    _take(first, 17)
    state = json.loads(json.dumps(first.state_dict()))  # through JSON, as the checkpoint stores it
    resumed = _take(PackedLoader(str(dataset / "shards"), spec, num_workers=workers, position=state), 23)
    for a, b in zip(full[17:], resumed):
        assert a.keys == b.keys
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.text, b.text) and torch.equal(a.pos, b.pos)


@pytest.mark.parametrize("before,after,balance", [(4, 2, False), (2, 4, False), (3, 1, False), (4, 2, True)])
def test_elastic_resume_consumes_every_sample_once(dataset, before, after, balance):
    src, spec = str(dataset / "shards"), StreamSpec(**{**SPEC.__dict__, "balance": balance})
    loaders = [PackedLoader(src, spec, dp_rank=r, dp_size=before, num_workers=2) for r in range(before)]
    seen = []
    for ld in loaders:
        seen += [k for b in _take(ld, 2) for row in b.keys for k in row]
    merged = StreamPosition.merge([ld.position for ld in loaders]).state_dict()
    for r in range(after):
        seen += all_keys(PackedLoader(src, spec, dp_rank=r, dp_size=after, num_workers=1, position=merged))
    assert len(seen) == len(set(seen)) == 48


def long_tailed_items(count: int, seed: int = 0):
    """70% short clips (1-4k tokens), 30% long (8-32k): rows of 64k hold several long ones, and how they are
    spread over rows sets each row's attention."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        n = int(rng.integers(1024, 4096) if rng.random() < 0.7 else rng.integers(8192, 32768))
        yield Item(sid=(0, 0, i), key=f"s{i}", tokens=torch.zeros(n, 1), pos=torch.zeros(n, 3, dtype=torch.long),
                   grid=(1, 1, n), text=torch.zeros(4, 1), caption="")


def test_cost_balanced_rows_keep_every_sample_once_and_cut_the_attention_imbalance():
    attention = {}
    for balance in (False, True):
        packer = Packer(65536, 256, rows=1, max_per_row=64, lookahead=32, patch_dim=1, text_dim=1, balance=balance)
        batches = [b for it in long_tailed_items(600) for b in packer.add(it)]
        full = len(batches)  # rows built from a full lookahead; flush() empties the buffer into whatever is left
        batches += packer.flush()
        keys = [k for b in batches for k in b.keys[0]]
        assert sorted(keys) == sorted(f"s{i}" for i in range(600))  # none lost, none twice
        rows = [[int(g.prod()) for g in b.grids[0] if g[0]] for b in batches[:full]]
        assert all(sum(r) <= 65536 for r in rows)
        assert sum(map(sum, rows)) / (65536 * len(rows)) > 0.97, balance  # balancing keeps the rows full
        attention[balance] = np.array([sum(n * n for n in r) for r in rows], dtype=float)
    imbalance = {b: a.max() / a.mean() for b, a in attention.items()}
    spread = {b: a.std() / a.mean() for b, a in attention.items()}
    assert imbalance[True] < 0.8 * imbalance[False] and spread[True] < 0.4 * spread[False], (imbalance, spread)


def test_resume_refuses_another_dataset_or_seed(dataset, tmp_path):
    ld = PackedLoader(str(dataset / "shards"), SPEC)
    _take(ld, 1)
    state = ld.state_dict()
    one = sorted((dataset / "shards").glob("*.tar"))[0]
    (tmp_path / one.name).write_bytes(one.read_bytes())
    with pytest.raises(ValueError, match="belongs to another dataset"):
        PackedLoader(str(tmp_path), SPEC, position=state)
    with pytest.raises(ValueError, match="data.seed changed"):
        PackedLoader(str(dataset / "shards"), StreamSpec(**{**SPEC.__dict__, "seed": 5}), position=state)


def test_shard_sources_directory_brace_and_pipe(dataset):
    d = dataset / "shards"
    assert len(list_shards(str(d))) == 6
    assert list_shards(f"{d}/shard-{{000000..000005}}.tar") == list_shards(str(d))
    piped = [f"pipe:cat {u}" for u in list_shards(str(d))]
    assert sorted(all_keys(PackedLoader(piped, SPEC))) == sorted(all_keys(PackedLoader(str(d), SPEC)))
    with pytest.raises(FileNotFoundError, match="not a directory"):
        list_shards(str(d / "missing"))


# ---- bad input ------------------------------------------------------------------------------

def _sample(key, latent, text=np.zeros((4, 384), np.float16)):
    s = {"__key__": key, "latent.npy": npy_bytes(latent), "txt": "x", "json": "{}"}
    if text is not None:
        s["text.npy"] = npy_bytes(text)
    return s


def _write_tar(path, samples):
    import webdataset as wds

    with wds.TarWriter(str(path)) as w:
        for s in samples:
            w.write(s)


def _bad_dir(dataset, tmp_path):
    """Good shards plus one shard of bad samples and one truncated shard."""
    for p in sorted((dataset / "shards").glob("*.tar")):
        (tmp_path / p.name).write_bytes(p.read_bytes())
    good = np.zeros((48, 2, 4, 4), np.float16)
    obj = io.BytesIO()
    np.save(obj, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    samples = [_sample("wrong_shape", np.zeros((7, 2, 4, 4), np.float16)),
               _sample("nan", np.full((48, 2, 4, 4), np.nan, np.float16)),
               _sample("no_text", good, text=None),
               {**_sample("pickled", good), "latent.npy": obj.getvalue()},
               {**_sample("garbage", good), "latent.npy": b"\x93NUMPY garbage"},
               _sample("fine", good)]
    _write_tar(tmp_path / "shard-bad.tar", samples)
    whole = (sorted((dataset / "shards").glob("*.tar"))[0]).read_bytes()
    (tmp_path / "shard-truncated.tar").write_bytes(whole[: len(whole) // 2 + 100])
    return tmp_path


def test_bad_samples_are_skipped_counted_and_named(dataset, tmp_path):
    ld = PackedLoader(str(_bad_dir(dataset, tmp_path)), SPEC, max_bad_fraction=0.5)
    keys = all_keys(ld)
    reasons = {key: reason for url, key, reason in ld.stats.recent}
    assert {"wrong_shape", "nan", "no_text", "pickled", "garbage"} <= set(reasons)
    assert "fine" in keys and not {"wrong_shape", "nan", "no_text", "pickled", "garbage"} & set(keys)
    assert "latent shape (7, 2, 4, 4)" in reasons["wrong_shape"] and "NaN" in reasons["nan"]
    assert "text.npy" in reasons["no_text"] and "npy" in reasons["pickled"]
    assert any(u.endswith("shard-truncated.tar") and k == "<tar>" for u, k, _ in ld.stats.recent)
    truncated = ld.stats.by_shard[str(tmp_path / "shard-truncated.tar")]
    assert ld.stats.by_shard[str(tmp_path / "shard-bad.tar")] == 5 and truncated >= 1  # tar error + a partial sample
    assert ld.stats.skipped == 5 + truncated
    # 48 good + "fine" + the intact front of the truncated copy of shard 0 (whose keys repeat shard 0's)
    assert len(set(keys)) == 49 and 49 < len(keys) < 49 + 8


def test_too_many_bad_samples_stops_with_the_shards_named(dataset, tmp_path):
    with pytest.raises(DataQualityError, match="shard-bad.tar"):
        all_keys(PackedLoader(str(_bad_dir(dataset, tmp_path)), SPEC, max_bad_fraction=0.01, min_reads_for_check=10))


def test_manifest_that_does_not_match_the_model_is_refused(dataset):
    m = load_manifest(str(dataset / "shards"))
    check_manifest(m, 48, 384, (1, 2, 2))
    with pytest.raises(ManifestMismatch, match="latent channels.*in_channels=16"):
        check_manifest(m, 16, 384, (1, 2, 2))
    with pytest.raises(ManifestMismatch, match="text width.*text_dim=768"):
        check_manifest(m, 48, 768, (1, 2, 2))
    with pytest.raises(ManifestMismatch, match="patch size"):
        check_manifest(m, 48, 384, (1, 4, 4))


def test_encoder_skips_bad_videos_resumes_and_splits_array_tasks(tmp_path):
    from data_tools.encode import run
    from data_tools.synthetic import generate

    captions = generate(tmp_path / "raw", 6, seed=3, min_size=32, max_size=48, min_frames=4, max_frames=6)
    (tmp_path / "raw" / "videos" / "clip_000001.mp4").write_bytes(b"not a video")
    with open(captions, "a") as f:
        f.write(json.dumps({"path": "videos/missing.mp4", "caption": "gone"}) + "\n")
    policy, kw = EncodePolicy(max_pixels=32 * 32, max_frames=4), {"kind": "pixel"}
    out = tmp_path / "shards"
    assert run(str(captions), str(out), kw, None, policy, clips_per_shard=2, num_tasks=2, task_index=0,
               progress=False) is None  # task 1's shards are missing: no manifest yet
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000002.tar"]
    stamp = (out / "shard-000000.tar").stat().st_mtime_ns
    manifest = json.loads(run(str(captions), str(out), kw, None, policy, clips_per_shard=2, num_tasks=2,
                              task_index=1, progress=False).read_text())
    assert (out / "shard-000000.tar").stat().st_mtime_ns == stamp
    assert manifest["samples"] == 5 and manifest["failures"] == 2 and len(manifest["shards"]) == 4
    failures = [json.loads(line) for line in open(out / "failures.jsonl")]
    assert {Path(f["path"]).name for f in failures} == {"clip_000001.mp4", "missing.mp4"}
    run(str(captions), str(out), kw, None, policy, clips_per_shard=2, progress=False)  # rerun: all skipped
    assert (out / "shard-000000.tar").stat().st_mtime_ns == stamp
    # A rerun with other settings or other captions would skip the finished shards by name and mix two datasets.
    from data_tools.encode import OutputInUse

    with pytest.raises(OutputInUse, match=r"\(policy\.max_pixels: 1024 -> 2304\); encode into a new --out"):
        run(str(captions), str(out), kw, None, EncodePolicy(max_pixels=48 * 48, max_frames=4), clips_per_shard=2,
            progress=False)
    with pytest.raises(OutputInUse, match=r"\(codec\.factors: None -> \[1, 8, 8\]\)"):
        run(str(captions), str(out), {"kind": "pixel", "factors": (1, 8, 8)}, None, policy, clips_per_shard=2,
            progress=False)
    other = generate(tmp_path / "raw2", 6, seed=4, min_size=32, max_size=48, min_frames=4, max_frames=6)
    with pytest.raises(OutputInUse, match="captions_sha256"):
        run(str(other), str(out), kw, None, policy, clips_per_shard=2, progress=False)
    assert (out / "shard-000000.tar").stat().st_mtime_ns == stamp and json.loads((out / "manifest.json").read_text()) == manifest


def test_an_encode_of_nothing_fails_and_no_run_waits_on_its_shards(tmp_path, capsys):
    """Every clip too short: the encoder exits non-zero; training refuses the set before step 0, naming it; a reader
    of such shards without a manifest (pipe: sources) stops with the reason instead of cycling empty epochs."""
    from data_tools.encode import main
    from data_tools.synthetic import generate
    from sora_train.data.stream import NoUsableSamples, PackedStream
    from sora_train.preflight import ConfigError, check_data_sources
    from test_commands import compose

    captions = generate(tmp_path / "raw", 3, seed=3, min_size=32, max_size=48, min_frames=4, max_frames=6)
    out = tmp_path / "empty"
    with pytest.raises(SystemExit) as e:
        main(["--captions", str(captions), "--out", str(out), "--min-frames", "100", "--no-progress"])
    assert e.value.code == 1 and "no clip was encoded" in capsys.readouterr().err
    assert json.loads((out / "manifest.json").read_text())["samples"] == 0
    with pytest.raises(ConfigError, match=f"data.train: {out} holds no samples"):
        check_data_sources(compose([f"data.train={out}", "data.num_workers=0"]), 1)
    (out / "manifest.json").unlink()
    spec = StreamSpec(seq_len=256, text_len=64, rows=1, max_per_row=8, lookahead=4, seed=0, epochs=20,
                      caption_dropout=0.0, oversize="crop_time", patch=(1, 2, 2), channels=48, text_dim=384)
    urls = [str(out / "shard-000000.tar")]
    with pytest.raises(NoUsableSamples, match="hold no samples"):
        next(iter(PackedStream(urls, spec, 0, 1, StreamPosition(0, "x"))))


def test_encoder_options_out_of_range_are_refused(tmp_path, capsys):
    from data_tools.encode import main

    for flag, value, message in (("--clip-seconds", "-1", "--clip-seconds must be > 0, got -1"),
                                 ("--clip-seconds", "0", "--clip-seconds must be > 0, got 0"),
                                 ("--max-frames", "0", "--max-frames must be >= 1")):
        with pytest.raises(SystemExit) as e:
            main(["--captions", str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "o"), flag, value])
        assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_a_reencode_is_byte_identical_and_a_changed_dataset_is_named_shard_by_shard(tmp_path):
    from data_tools.encode import run
    from data_tools.synthetic import generate
    from sora_train.data.shards import dataset_changes

    captions = generate(tmp_path / "raw", 4, seed=3, min_size=32, max_size=48, min_frames=4, max_frames=6)
    policy, kw = EncodePolicy(max_pixels=32 * 32, max_frames=4), {"kind": "pixel"}
    shas = []
    for name in ("a", "b"):
        manifest = json.loads(run(str(captions), str(tmp_path / name), kw, None, policy, clips_per_shard=2,
                                  progress=False).read_text())
        shas.append([s["sha256"] for s in manifest["shards"]])
    assert shas[0] == shas[1]  # other --out, other time: the same bytes, so a checkpoint resumes on either
    assert dataset_changes({"train": str(tmp_path / "a")}, {"train": str(tmp_path / "b")}) == ""
    run(str(captions), str(tmp_path / "c"), kw, None, EncodePolicy(max_pixels=48 * 48, max_frames=4),
        clips_per_shard=2, progress=False)
    changes = dataset_changes({"train": str(tmp_path / "a")}, {"train": str(tmp_path / "c")})
    assert "data.train: " in changes and "2 of 2 shards with other contents (shard-000000.tar, shard-000001.tar)" \
        in changes and "encoded with other settings (max_pixels)" in changes, changes
    assert "has no manifest.json" in dataset_changes({"train": str(tmp_path / "gone")}, {"train": str(tmp_path / "a")})


def test_merging_resumed_positions_keeps_one_view_per_shard(dataset):
    """After a resume every rank starts from the same base; the merge checks only new consumption."""
    src = str(dataset / "shards")
    first = [PackedLoader(src, SPEC, dp_rank=r, dp_size=2) for r in range(2)]
    for ld in first:
        _take(ld, 2)
    base = StreamPosition.merge([ld.position for ld in first]).state_dict()
    again = [PackedLoader(src, SPEC, dp_rank=r, dp_size=2, position=base) for r in range(2)]
    for ld in again:
        all_keys(ld)  # to the end of the epoch
    merged = StreamPosition.merge([ld.position for ld in again], base=again[0].start)
    assert merged.done[0] == set(range(6)) and not merged.epochs.get(0)
    partial = PackedLoader(src, SPEC, dp_rank=0, dp_size=2, position=base)
    _take(partial, 1)  # leaves shards in progress
    with pytest.raises(RuntimeError, match="consumed by two ranks"):
        StreamPosition.merge([partial.position, partial.position], base=partial.start)


def test_synthetic_radius_range_sets_the_drawn_shape_size(tmp_path):
    from data_tools.synthetic import main

    areas = {}
    for lo, hi in [(0.16, 0.16), (0.3, 0.3)]:
        out = tmp_path / f"r{lo}"
        main(["--out", str(out), "--num-clips", "3", "--min-size", "48", "--max-size", "48", "--max-aspect", "1",
              "--min-frames", "4", "--max-frames", "4", "--radius", str(lo), str(hi)])
        rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
        assert [r["attributes"]["size"] for r in rows] == [lo] * 3
        frames, _ = read_video(out / rows[0]["path"])  # [T,H,W,3]
        background = np.median(frames[:, 0].reshape(-1, 3), 0)
        areas[lo] = (np.abs(frames[1].astype(float) - background).sum(-1) > 60).mean()
    assert 2.5 < areas[0.3] / areas[0.16] < 4.5  # area ~ radius^2: (0.3 / 0.16)^2 = 3.5


class Hung(Exception):
    pass


def within(seconds: int, fn):
    """fn() or Hung after `seconds` (a hang is a failure, not a test that never ends)."""
    import signal

    def alarm(signum, frame):
        raise Hung(f"no answer in {seconds} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_a_budget_no_sample_fits_fails_fast_naming_the_cause(dataset):
    """Every sample over data.seq_len (skipped): the endless stream used to loop over epochs forever."""
    from dataclasses import replace

    from sora_train.data.stream import NoUsableSamples

    spec = replace(SPEC, seq_len=16, epochs=None, oversize="skip")
    with pytest.raises(NoUsableSamples, match=r"none of the \d+ samples of epoch 0.*exceed the budget of 16.*data.seq_len"):
        within(60, lambda: next(iter(PackedLoader(str(dataset / "shards"), spec))))


def test_fewer_shards_than_readers_is_refused_naming_both_counts(dataset, tmp_path):
    """1 shard on 2 data-parallel ranks: the rank without a shard used to wait for a first batch forever."""
    from dataclasses import replace

    one = tmp_path / "one"
    one.mkdir()
    (one / "shard-000000.tar").symlink_to(dataset / "shards" / "shard-000000.tar")
    spec = replace(SPEC, epochs=None)
    with pytest.raises(ValueError, match=r"1 shard\(s\) for 2 readers \(data-parallel size 2 x data.num_workers=1\)"):
        within(60, lambda: next(iter(PackedLoader(str(one), spec, dp_rank=1, dp_size=2))))
    assert next(iter(PackedLoader(str(one), spec, dp_rank=0, dp_size=1))).real_tokens > 0  # alone it is enough


def test_resume_tells_datasets_with_the_same_shard_names_apart_by_content(dataset, tmp_path):
    """Every encode names its shards shard-000000.tar, ...: two one-shard datasets differ only in content, which
    the manifest's per-shard sha256 (written by the encoder) shows."""
    manifest = load_manifest(str(dataset / "shards"))
    assert all(len(s["sha256"]) == 64 for s in manifest["shards"])
    dirs = []
    for i in (0, 1):
        d = tmp_path / f"set{i}"
        d.mkdir()
        (d / "shard-000000.tar").write_bytes((dataset / "shards" / f"shard-{i:06d}.tar").read_bytes())
        entry = {**manifest["shards"][i], "shard": "shard-000000.tar"}
        (d / "manifest.json").write_text(json.dumps({**manifest, "shards": [entry]}))
        dirs.append(d)
    ld = PackedLoader(str(dirs[0]), SPEC)
    _take(ld, 1)
    PackedLoader(str(dirs[0]), SPEC, position=ld.state_dict())  # the same dataset resumes
    with pytest.raises(ValueError, match="the same names with other contents"):
        PackedLoader(str(dirs[1]), SPEC, position=ld.state_dict())
