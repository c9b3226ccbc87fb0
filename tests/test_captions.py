"""Several captions per sample: encoded side by side, picked per sample by data.caption_mix, resumable exactly."""

import json
from pathlib import Path

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


def test_a_caption_mix_over_sources_with_other_captions_falls_back_as_inside_one(two_captions, dataset, tmp_path,
                                                                                capsys):
    """Stills with short captions beside clips with long ones: the mix is taken, and a source without the drawn
    caption trains on its first, as a sample without it inside one dataset does."""
    from test_commands import compose

    from sora_train.data import PackedLoader
    from sora_train.data.mixture import sources_of
    from sora_train.preflight import preflight

    cfg = compose(["experiment=quickstart", "data.train=null", "data.val=null", f"out_dir={tmp_path}",
                   "data.num_workers=0", f"+data.sources.long={{train: {two_captions / 'shards'}, weight: 0.5}}",
                   f"+data.sources.short={{train: {dataset / 'shards'}, weight: 0.5}}",
                   "+data.caption_mix={caption: 0.5, caption_long: 0.5}"])
    preflight(cfg)
    assert "data.sources.short has no caption_long caption(s)" in capsys.readouterr().err
    spec = StreamSpec(**{**SPEC.__dict__, "caption_mix": (("caption_long", 1.0),)})
    seen = captions_seen(PackedLoader(sources_of(cfg.data.sources), spec, num_workers=0), 6)
    assert any(c.startswith("in detail: ") for c in seen) and any(not c.startswith("in detail: ") for c in seen)


TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}<image>"
            "{% else %}{{ c['text'] }}{% endif %}{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A randomly initialised LLaVA (CLIP vision + Llama text, 32-wide) with MiniLM's tokenizer, saved like a
    downloaded model: the captioning pipeline is tested, not caption quality."""
    import torch
    from transformers import (AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor)

    from sora_train.codecs.text import minilm_path

    out = tmp_path_factory.mktemp("vlm") / "tiny-llava"
    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    text = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                       bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    torch.manual_seed(0)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_seq_length=5,
                                              image_token_index=tok.convert_tokens_to_ids("<image>"),
                                              vision_feature_select_strategy="full")).save_pretrained(out)
    LlavaProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                   tokenizer=tok, patch_size=16, vision_feature_select_strategy="full", chat_template=TEMPLATE,
                   num_additional_image_tokens=1).save_pretrained(out)
    return out


def test_sora_caption_captions_resumes_lists_failures_and_feeds_the_encoder(tiny_vlm, tmp_path):
    from data_tools.caption import run
    from data_tools.encode import EncodePolicy, run as encode
    from data_tools.synthetic import generate

    captions = generate(tmp_path / "raw", 5, seed=6, min_size=32, max_size=48, min_frames=4, max_frames=6)
    with open(captions, "a") as f:
        f.write(json.dumps({"path": "videos/gone.mp4", "caption": "missing"}) + "\n{not json\n")
    out = tmp_path / "long" / "captions.jsonl"
    assert run(str(captions), str(out), str(tiny_vlm), frames=2, batch=2, max_new_tokens=6, lines_per_part=3,
               num_tasks=2, task_index=0) is None  # task 1's part is missing: no output yet
    assert run(str(captions), str(out), str(tiny_vlm), frames=2, batch=2, max_new_tokens=6, lines_per_part=3,
               num_tasks=2, task_index=1) == out
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    originals = [json.loads(line) for line in captions.read_text().splitlines()[:6]]
    assert [r["caption"] for r in rows] == [r["caption"] for r in originals]  # every readable line, in order
    assert all(r["caption_long"] and r["captioner"] == "tiny-llava" for r in rows[:5]) and "caption_long" not in rows[5]
    failures = [json.loads(line) for line in (tmp_path / "long" / "captions.failures.jsonl").read_text().splitlines()]
    assert {f["line"] for f in failures} == {f"{captions}:6", f"{captions}:7"}
    # A rerun skips finished parts; a lost part is redone the same (greedy decoding).
    part0, part1 = (Path(str(out) + ".parts") / f"part-{i:06d}.jsonl" for i in range(2))
    stamp, first = part0.stat().st_mtime_ns, out.read_text()
    part1.unlink()
    run(str(captions), str(out), str(tiny_vlm), frames=2, batch=3, max_new_tokens=6, lines_per_part=3)
    assert part0.stat().st_mtime_ns == stamp and out.read_text() == first
    with pytest.raises(ValueError, match="other frames"):
        run(str(captions), str(out), str(tiny_vlm), frames=3, batch=2, max_new_tokens=6, lines_per_part=3)
    # The encoder embeds both captions (paths in the output are relative to it).
    policy = EncodePolicy(max_pixels=32 * 32, max_frames=4, min_frames=1, caption_keys=("caption", "caption_long"))
    manifest = json.loads(encode(str(out), str(tmp_path / "shards"), {"kind": "pixel"}, None, policy,
                                 progress=False).read_text())
    assert manifest["samples"] == 5 and manifest["failures"] == 1  # the missing clip


def test_sora_caption_refuses_a_wrong_model_or_file_in_one_line_and_writes_nothing(tiny_vlm, tmp_path, capsys):
    """A missing or non-VLM --model and a missing --captions: one line, exit 2, and no settings claimed, so the rerun
    with the right model is not refused as "other model"."""
    from transformers import BertConfig, BertModel

    from data_tools.caption import main
    from data_tools.synthetic import generate

    captions = generate(tmp_path / "raw", 2, seed=6, min_size=32, max_size=48, min_frames=4, max_frames=6)
    text_only = tmp_path / "bert"
    BertModel(BertConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=8)).save_pretrained(text_only)
    capsys.readouterr()  # the save's progress bar
    out = tmp_path / "long.jsonl"
    for captions_arg, model, message in ((captions, tmp_path / "nope", "not a local transformers model directory"),
                                         (captions, text_only, "a 'bert' model, not an image-text-to-text"),
                                         (tmp_path / "none.jsonl", tiny_vlm, "none.jsonl: no such file")):
        with pytest.raises(SystemExit) as e:
            main(["--captions", str(captions_arg), "--out", str(out), "--model", str(model)])
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, err
        assert not Path(str(out) + ".parts").exists()
    main(["--captions", str(captions), "--out", str(out), "--model", str(tiny_vlm), "--frames", "2",
          "--max-new-tokens", "4"])
    assert len(out.read_text().splitlines()) == 2


def test_an_optional_caption_that_is_not_a_string_is_listed_as_a_failure(tmp_path):
    from data_tools.encode import EncodePolicy, run
    from data_tools.synthetic import generate

    captions = generate(tmp_path / "raw", 2, seed=4, min_size=32, max_size=48, min_frames=4, max_frames=6)
    rows = [json.loads(line) for line in captions.read_text().splitlines()]
    rows[0]["caption_long"], rows[1]["caption_long"] = 7, "in detail"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    policy = EncodePolicy(max_pixels=32 * 32, max_frames=4, min_frames=1, caption_keys=("caption", "caption_long"))
    manifest = json.loads(run(str(captions), str(tmp_path / "shards"), {"kind": "pixel"}, None, policy,
                              progress=False).read_text())
    failures = [json.loads(line) for line in (tmp_path / "shards" / "failures.jsonl").read_text().splitlines()]
    assert manifest["samples"] == 2 and [f["line"] for f in failures] == [f"{captions}:1"]
    assert "'caption_long' must be a string, got 7: the clip is encoded without it" in failures[0]["reason"]


def test_sora_sample_upsamples_each_prompt_and_records_both(straight_run, tmp_path):
    """`upsample=<local LLM>`: a tiny random Llama rewrites the prompt (garbage words: the plumbing is tested);
    the rewrite is printed and recorded beside the prompt, the video keeps the prompt's name."""
    import torch
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from sora_train.codecs.text import minilm_path
    from sora_train.config import SampleConfig
    from sora_train.inference.sample import run

    llm = tmp_path / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(minilm_path())
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant:{% endif %}")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                                 eos_token_id=tok.sep_token_id)).save_pretrained(llm)
    tok.save_pretrained(llm)
    cfg = OmegaConf.structured(SampleConfig(checkpoint=str(straight_run / "checkpoints"), out_dir=str(tmp_path / "v"),
                                            prompts=["a red square", "a blue heart"], frames=4, height=32, width=32,
                                            steps=2, upsample=str(llm), upsample_max_new_tokens=8, device="cpu"))
    run(cfg)
    rows = [json.loads(line) for line in (tmp_path / "v" / "prompts.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["a red square", "a blue heart"] and all(r["upsampled"] for r in rows)
    assert rows[0]["upsampled"] != "a red square" and rows[0]["upsampler"] == "tiny-llama"
    assert (tmp_path / "v" / "00_a_red_square.mp4").stat().st_size > 0
