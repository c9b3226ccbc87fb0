"""Several captions per sample: encoded side by side, picked per sample by data.caption_mix, resumable exactly."""

import json

import pytest

from sora_train.data import PackedLoader, StreamSpec

SPEC = StreamSpec(seq_len=512, text_len=256, rows=1, max_per_row=16, lookahead=4, seed=0, epochs=None,
                  caption_dropout=0.0, oversize="crop_time", patch=(1, 2, 2), channels=48, text_dim=384)


@pytest.fixture(scope="module")
def two_captions(tmp_path_factory):
    """24 clips whose captions file has a detailed caption beside the short one (missing on every 4th line)."""
    from data_tools.encode import EncodePolicy, run
    from data_tools.synthetic import generate

    root = tmp_path_factory.mktemp("captions")
    captions = generate(root / "raw", 24, seed=4, min_size=32, max_size=48, min_frames=4, max_frames=6)
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    for i, r in enumerate(rows):
        if i % 4:
            r["caption_long"] = f"in detail: {r['caption']}, starting near the {'left' if i % 2 else 'top'} edge"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    policy = EncodePolicy(max_pixels=32 * 32, max_frames=4, min_frames=1, caption_keys=("caption", "caption_long"))
    run(str(captions), str(root / "shards"), {"kind": "pixel", "factors": (1, 4, 4)}, None, policy,
        clips_per_shard=6, progress=False)
    return root


def captions_seen(loader, batches: int) -> list[str]:
    it, out = iter(loader), []
    for _ in range(batches):
        out += [c for row in next(it).captions for c in row]
    return out


def test_every_caption_field_survives_encode_to_shards(two_captions):
    manifest = json.loads((two_captions / "shards" / "manifest.json").read_text())
    assert manifest["caption_keys"] == ["caption", "caption_long"] and manifest["samples"] == 24
    captions = captions_seen(PackedLoader(str(two_captions / "shards"), SPEC), 6)
    assert not any(c.startswith("in detail") for c in captions)  # no mix: the first caption
    spec = StreamSpec(**{**SPEC.__dict__, "caption_mix": (("caption_long", 1.0),)})
    captions = captions_seen(PackedLoader(str(two_captions / "shards"), spec), 6)
    detailed = [c for c in captions if c.startswith("in detail")]
    assert detailed and len(detailed) / len(captions) == pytest.approx(0.75, abs=0.15)  # 1 in 4 has none: its first


def test_the_caption_mix_follows_its_shares_and_resumes_exactly(two_captions):
    spec = StreamSpec(**{**SPEC.__dict__, "caption_mix": (("caption", 0.5), ("caption_long", 0.5))})
    src = str(two_captions / "shards")
    straight = captions_seen(PackedLoader(src, spec), 40)
    detailed = sum(c.startswith("in detail") for c in straight) / len(straight)
    assert detailed == pytest.approx(0.5 * 0.75, abs=0.08)  # half drawn long, of which 3 in 4 have one
    first = PackedLoader(src, spec)
    before = captions_seen(first, 17)
    resumed = PackedLoader(src, spec, position=first.state_dict())
    assert before + captions_seen(resumed, 23) == straight


def test_a_caption_mix_naming_a_caption_the_shards_lack_is_refused(two_captions, tmp_path):
    from hydra import compose, initialize_config_dir

    from sora_train import CONF_DIR
    from sora_train.config import register
    from sora_train.preflight import ConfigError, preflight

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart", f"data.train={two_captions / 'shards'}",
                                          "data.val=null", f"out_dir={tmp_path}", "data.num_workers=0",
                                          "+data.caption_mix={caption: 0.5, caption_medium: 0.5}"])
    with pytest.raises(ConfigError, match=r"\['caption_medium'\] are not among .*\['caption', 'caption_long'\]"):
        preflight(cfg)
