"""FVD, FID and CLIPScore (inference/metrics.py, features.py, frechet.py): the Fréchet distance against its closed
forms and scipy, CLIPScore against the CLIP model's own embeddings, networks refused in one line, sora-eval
task=metrics, and the training hook (2 ranks, sharded) equal to sora-eval on the checkpoint it measured."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.testing import assert_close

import feature_nets
from sora_train.inference.features import CLIP_FRAMES, MetricNetworkError, resized, spread_frames
from sora_train.inference.frechet import Gaussian, frechet_distance
from sora_train.inference.metrics import Metrics


def gaussian(mean, cov, n=10**6):
    return Gaussian(torch.as_tensor(mean, dtype=torch.float64), torch.as_tensor(cov, dtype=torch.float64), n)


def test_frechet_distance_equals_its_closed_forms_and_scipys_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    cov = a @ a.T + np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    # The same covariance: the squared distance of the means.
    assert frechet_distance(gaussian(mu1, cov), gaussian(mu2, cov)) == pytest.approx(((mu1 - mu2) ** 2).sum(),
                                                                                      rel=1e-9)
    # Diagonal (commuting) covariances: sum((sqrt(a) - sqrt(b))^2) plus the means' term.
    d1, d2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(d1) - np.sqrt(d2)) ** 2).sum()
    assert frechet_distance(gaussian(mu1, np.diag(d1)), gaussian(mu2, np.diag(d2))) == pytest.approx(want, rel=1e-9)
    assert frechet_distance(gaussian(mu1, cov), gaussian(mu1, cov)) == pytest.approx(0, abs=1e-9)

    # Random features, full rank and rank-deficient (fewer vectors than dimensions, FVD's usual case): scipy's
    # sqrtm of S1 S2 (pytorch-fid's and StyleGAN-V's formula, its imaginary round-off dropped) gives the same.
    from scipy import linalg

    for n, d in ((400, 24), (30, 64)):
        x = rng.normal(size=(n, d)) @ rng.normal(size=(d, d))
        y = rng.normal(0.3, 1.2, size=(n, d)) @ rng.normal(size=(d, d))
        s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
        root = linalg.sqrtm(s1 @ s2).real
        want = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
        got = frechet_distance(Gaussian.of(torch.from_numpy(x)), Gaussian.of(torch.from_numpy(y)))
        assert got == pytest.approx(want, rel=1e-6)
    with pytest.raises(ValueError, match="at least 2"):
        Gaussian.of(torch.zeros(1, 4))


@pytest.fixture
def networks(metric_networks):
    return metric_networks


def test_clipscore_is_100_max_cos_of_the_models_own_embeddings(networks):
    from transformers import AutoTokenizer, CLIPModel

    metrics = Metrics(SimpleNamespace(fvd_network=None, fid_network=None, clip_network=networks["clip_network"]),
                      torch.device("cpu"))
    rng = np.random.default_rng(1)
    videos = [rng.integers(0, 256, (5, 40, 56, 3), dtype=np.uint8) for _ in range(12)]
    captions = [f"a {c} square moving {m}" for c in ("red", "blue", "green") for m in ("left", "right", "up", "down")]
    got = metrics.nets["clipscore"](videos, captions)

    model, tok = CLIPModel.from_pretrained(networks["clip_network"]).eval(), AutoTokenizer.from_pretrained(
        networks["clip_network"])
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    want = []
    with torch.no_grad():
        for v, c in zip(videos, captions):
            pixels = (resized(spread_frames(v, CLIP_FRAMES), 32, "bicubic", antialias=True) - mean) / std
            image = model.get_image_features(pixel_values=pixels)
            text = model.get_text_features(**tok([c], return_tensors="pt"))
            image, text = (getattr(e, "pooler_output", e) for e in (image, text))
            cos = torch.nn.functional.cosine_similarity(image, text)
            want.append(float(100 * cos.clamp(min=0).mean()))
    assert_close(got, torch.tensor(want), rtol=1e-4, atol=1e-4)
    assert (got == 0).any() and (got > 0).any()  # both sides of max(cos, 0) taken


def test_feature_networks_that_cannot_be_used_are_refused_in_one_line_naming_the_path(networks, tmp_path):
    from sora_train.codecs.text import minilm_path

    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a network")
    fixed_input = tmp_path / "fixed.pt"  # TorchScript taking one input size only, not the protocol's
    torch.jit.script(torch.nn.Linear(7, 3)).save(str(fixed_input))
    not_inception = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, not_inception)
    bert = minilm_path()
    cases = [
        ("fvd_network", str(tmp_path / "missing.pt"), "no such file or folder"),
        ("fvd_network", str(text_file), "not a TorchScript file"),
        ("fvd_network", str(fixed_input), "fails on the protocol's input"),
        ("fvd_network", bert, "a 'bert' model, not a video model"),
        ("fid_network", bert, "a 'bert' model, not an image model"),
        ("fid_network", str(not_inception), "not a torchvision Inception-v3 state dict"),
        ("fid_network", str(text_file), "not a state dict"),
        ("clip_network", bert, "a 'bert' model, not a CLIP model"),
        ("clip_network", networks["fvd_network"], "a file; pass a transformers CLIP model folder"),
    ]
    for key, path, message in cases:
        cfg = SimpleNamespace(**{"fvd_network": None, "fid_network": None, "clip_network": None, key: path})
        with pytest.raises(MetricNetworkError) as e:
            Metrics(cfg, torch.device("cpu"))
        assert message in str(e.value) and f"metrics.{key}={path}" in str(e.value) and "\n" not in str(e.value), \
            (key, path, str(e.value))
    with pytest.raises(ValueError, match="no feature network given"):
        Metrics(SimpleNamespace(fvd_network=None, fid_network=None, clip_network=None), torch.device("cpu"))


def test_the_floor_splits_the_real_clips_at_random_not_by_their_order(networks):
    """Held-out clips in an order with structure (here every other clip from another distribution, as a dataset
    written source by source or the synthetic world's neighbours can be): two halves drawn at random are near
    each other; even against odd clips would read the order as a distance (4 per feature)."""
    metrics = Metrics(SimpleNamespace(fvd_network=networks["fvd_network"], fid_network=None, clip_network=None),
                      torch.device("cpu"))
    d, n = metrics.widths["fvd"], 200
    features = torch.randn(n, d, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.1
    features[0::2] += 1.0
    features[1::2] -= 1.0
    rows = torch.cat([torch.arange(n, dtype=torch.float64)[:, None], features], 1)
    assert metrics.floor(rows)["fvd"] < 0.1 * d
    assert metrics.scores(rows[0::2], rows[1::2])["fvd"] == pytest.approx(4.0 * d, rel=0.05)


def test_videomae_and_inception_networks_give_their_protocols_features(tmp_path):
    video = feature_nets.videomae(tmp_path / "videomae")
    inception = feature_nets.inception(tmp_path / "inception.pth")
    m = Metrics(SimpleNamespace(fvd_network=str(video), fid_network=str(inception), clip_network=None),
                torch.device("cpu"))
    assert m.widths == {"fvd": 32, "fid": 4 * 2048}  # the mean hidden state; 2048-d pool features of 4 frames
    rng = np.random.default_rng(2)
    from sora_train.inference.metrics import HeldOut

    items = [HeldOut(i, "x", (3, 24, 40), "test") for i in range(2)]
    rows = m.rows(items, [rng.integers(0, 256, (3, 24, 40, 3), dtype=np.uint8) for _ in items])
    assert rows.shape == (2, 1 + 32 + 4 * 2048) and torch.isfinite(rows).all() and rows[:, 0].tolist() == [0, 1]


def test_sora_eval_task_metrics_reports_each_metric_its_floor_and_protocol(straight_run, dataset, networks,
                                                                           tmp_path):
    from omegaconf import OmegaConf

    from sora_train.config import EvalConfig, MetricsConfig
    from sora_train.inference.evaluate import run

    cfg = OmegaConf.structured(EvalConfig(
        checkpoint=str(straight_run / "checkpoints"), out_dir=str(tmp_path), task="metrics", steps=4, guidance=[1.0],
        device="cpu", metrics=MetricsConfig(**networks, real=str(dataset / "shards"), clips=10, batch=3)))
    report = run(cfg)
    assert report["clips"] == 10 and report["skipped"] == 0 and "biased upward" in report["note"]
    got, floor = report["results"]["guidance_1.0"], report["results"]["real_halves"]
    assert set(got) == {"fvd", "fid", "clipscore", "fvd_at_half", "fid_at_half"}
    assert set(floor) == {"fvd", "fid", "clipscore"}
    assert all(np.isfinite(v) and v >= 0 for v in [*got.values(), *floor.values()])
    # A 10-step model's samples are further from the real clips than the real clips' two halves are from each other
    # (at the same counts: half against half).
    assert got["fvd_at_half"] > floor["fvd"] and got["fid_at_half"] > floor["fid"]
    assert "StyleGAN-V" in report["networks"]["fvd"]["protocol"] and len(report["sizes"]) > 1  # each clip's own size
    assert len(report["per_clip"]["guidance_1.0"]) == 10
    assert (tmp_path / "contact_sheet_guidance_1.0.png").is_file()
    assert json.loads((tmp_path / "report.json").read_text())["results"] == report["results"]

    # The raw videos of a captions.jsonl, at a fixed size: every sample and real clip at it (the real ones resized
    # to cover it and centre-cropped); without a size they are refused (videos have no encoded size).
    cfg.metrics.real, cfg.metrics.size, cfg.metrics.clips = str(dataset / "raw" / "captions.jsonl"), [4, 32, 32], 4
    report = run(cfg)
    assert report["sizes"] == [[4, 32, 32]] and report["clips"] == 4
    assert report["results"]["real_halves"]["fvd"] >= 0 and "fvd" in report["results"]["guidance_1.0"]
    cfg.metrics.size = None
    with pytest.raises(ValueError, match=r"captions.jsonl: videos have no encoded size: set metrics.size"):
        run(cfg)


def test_training_metrics_over_two_ranks_equal_sora_eval_on_the_checkpoint_they_measured(straight_run, dataset,
                                                                                         metric_networks, tmp_path):
    """conftest's straight_run measures at steps 5 and 10 on 2 ranks (ZeRO-3, EMA, 6 clips in batches of 2: each rank
    generates its share, one rank repeats a batch); sora-eval on its step-10 checkpoint, in one process and in
    batches of 5, gives the same figures. The resumed runs that match it exactly (test_distributed,
    test_reliability) did not measure: the hook leaves training as it was."""
    from omegaconf import OmegaConf

    from sora_train.config import EvalConfig, MetricsConfig
    from sora_train.inference.evaluate import run
    from conftest import training_metrics

    rows = [json.loads(line) for line in open(straight_run / "metrics.jsonl")]
    logged = {r["step"]: r for r in rows if "metrics/fvd" in r}
    assert sorted(logged) == [5, 10] and "metrics/floor_fvd" in logged[5] and "metrics/floor_fvd" not in logged[10]
    assert 0 < logged[10]["metrics/time_share"] < 1 and logged[10]["metrics/clips"] == 6
    assert 1 <= len(list((straight_run / "metrics" / "step_00000010").glob("*.gif"))) <= 4  # rank 0's, videos=4

    cfg = OmegaConf.structured(EvalConfig(
        checkpoint=str(straight_run / "checkpoints" / "step_00000010"), out_dir=str(tmp_path), task="metrics",
        steps=30, guidance=[4.0], device="cpu",
        metrics=MetricsConfig(**{**training_metrics(metric_networks, dataset / "shards"), "batch": 5})))
    report = run(cfg)
    for k in ("fvd", "fid", "clipscore", "fvd_at_half", "fid_at_half"):
        assert report["results"]["guidance_4.0"][k] == pytest.approx(logged[10][f"metrics/{k}"], rel=1e-3, abs=1e-6)
    for k in ("fvd", "fid", "clipscore"):
        assert report["results"]["real_halves"][k] == pytest.approx(logged[5][f"metrics/floor_{k}"], rel=1e-6)


def test_held_out_clips_are_decoded_by_their_own_codec_and_unreadable_videos_skipped(dataset, tmp_path):
    """Shards encoded with another codec than the checkpoint's decode with theirs (the manifest names it), at
    their own pixel size; a captions.jsonl row whose video is missing or corrupt is skipped and counted."""
    import shutil

    from sora_train.codecs import PixelCodec
    from sora_train.inference.metrics import held_out

    other = PixelCodec((1, 2, 2))  # the checkpoint's, say; the test shards are pixel-1x4x4
    items, skipped = held_out(str(dataset / "shards"), 3, other, None)
    assert skipped == 0 and all(it.codec is not None and it.codec.info.name == "pixel-1x4x4" for it in items)
    for it in items:
        assert it.frames(other).shape == (it.size[0], it.size[1], it.size[2], 3)
        assert it.size[1] == it.latent.shape[2] * 4  # the shards' factors, not the checkpoint's
    raw = dataset / "raw"
    rows = (raw / "captions.jsonl").read_text().splitlines()[:3]
    videos = tmp_path / "videos"
    shutil.copytree(raw / "videos", videos)
    broken = json.loads(rows[1])["path"]
    (tmp_path / broken).write_bytes(b"not a video")  # the second row's file, corrupt
    (tmp_path / "captions.jsonl").write_text("\n".join(rows + ['{"path": "videos/missing.mp4", "caption": "x"}']))
    items, skipped = held_out(str(tmp_path / "captions.jsonl"), 10, other, [4, 32, 32])
    assert len(items) == 2 and skipped == 2 and [it.index for it in items] == [0, 1]
