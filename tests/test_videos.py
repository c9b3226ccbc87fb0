"""Real-world video files into shards: orientation, pixel aspect, bounded memory, clips cut from long videos, and
captions files with bad rows. Every video here is a real encoded file made in the test (PyAV, H.264)."""

import fractions
import io
import json
import tarfile
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from data_tools.encode import Clip, EncodePolicy, encode_clip, run
from sora_train.codecs import PixelCodec
from sora_train.video_io import probe_video

PIXEL = {"kind": "pixel", "factors": (1, 4, 4)}


def write_video(path: Path, frames: np.ndarray, fps: int = 10, rotation: int = 0, sar=None) -> Path:
    """frames uint8 [T,H,W,3] as stored; `rotation` (degrees counterclockwise) is the display matrix a phone writes,
    `sar` the pixel aspect of an anamorphic video. Near-lossless (crf 4): the tests compare pixels."""
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt, stream.options = "yuv444p", {"crf": "4"}
        if rotation:
            stream.set_display_rotation(rotation)
        if sar:
            stream.codec_context.sample_aspect_ratio = fractions.Fraction(*sar)
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def decoded(latent, factors=(1, 4, 4)) -> np.ndarray:
    """A pixel-codec latent back to uint8 frames [T,H,W,3]."""
    video = PixelCodec(factors).decode(latent[None].float())[0].clamp(-1, 1)
    return ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().numpy().astype(np.uint8)


def upright_picture(h=48, w=32) -> np.ndarray:
    """A portrait picture whose orientation is unmistakable: red top band, blue bottom-left block."""
    img = np.full((h, w, 3), 200, np.uint8)
    img[: h // 4] = (220, 30, 30)
    img[-h // 4 :, : w // 2] = (30, 30, 220)
    return img


def samples(shards: Path) -> list[dict]:
    out = []
    for tar in sorted(shards.glob("shard-*.tar")):
        with tarfile.open(tar) as t:
            files = {m.name: t.extractfile(m).read() for m in t.getmembers()}
        for name in sorted(n for n in files if n.endswith(".json")):
            key = name[: -len(".json")]
            out.append({"key": key, "json": json.loads(files[name]),
                        "latent": np.load(io.BytesIO(files[key + ".latent.npy"]), allow_pickle=False),
                        "text": np.load(io.BytesIO(files[key + ".text.npy"]), allow_pickle=False)})
    return out


def encode(tmp_path, rows, policy=None, lines=None, **kw):
    captions = tmp_path / "captions.jsonl"
    captions.write_text(lines if lines is not None else "".join(json.dumps(r) + "\n" for r in rows))
    policy = policy or EncodePolicy(max_pixels=64 * 128, max_frames=8, min_frames=1)
    manifest = run(str(captions), str(tmp_path / "shards"), PIXEL, None, policy, progress=False, **kw)
    return json.loads(Path(manifest).read_text()), samples(tmp_path / "shards")


@pytest.mark.parametrize("rotation", [90, -90, 180])
def test_a_rotated_phone_video_is_encoded_upright(tmp_path, rotation):
    upright = upright_picture()
    stored = np.rot90(upright, k=-rotation // 90)  # what the phone wrote; its display matrix turns it back
    write_video(tmp_path / "phone.mp4", np.stack([stored] * 4), rotation=rotation)
    assert probe_video(tmp_path / "phone.mp4").display_size == upright.shape[:2]
    _, (sample,) = encode(tmp_path, [{"path": "phone.mp4", "caption": "a phone video"}])
    frames = decoded(torch.from_numpy(sample["latent"]))
    assert frames.shape[1:3] == upright.shape[:2]
    assert np.abs(frames[0].astype(int) - upright).mean() < 4


def test_an_anamorphic_video_keeps_its_display_aspect(tmp_path):
    stored = np.full((64, 64, 3), 30, np.uint8)
    stored[:, 16:32] = 230  # a bar a quarter of the width in: shown at 32..64 of 128
    write_video(tmp_path / "anamorphic.mp4", np.stack([stored] * 4), sar=(2, 1))
    _, (sample,) = encode(tmp_path, [{"path": "anamorphic.mp4", "caption": "wide"}])
    frames = decoded(torch.from_numpy(sample["latent"]))
    assert frames.shape[1:3] == (64, 128) and sample["json"]["source_width"] == 128
    bright = np.nonzero(frames[0, 32, :, 0] > 128)[0]
    assert abs(bright.min() - 32) <= 2 and abs(bright.max() - 63) <= 2


def test_encoding_memory_is_bounded_by_the_frames_kept_not_by_the_file(tmp_path):
    """A long clip keeps 8 frames: decoding 3000 frames must not hold 3000 frames (before: all of them)."""
    policy, codec = EncodePolicy(max_pixels=64 * 64, max_frames=8), PixelCodec((1, 4, 4))
    peaks = {}
    for n in (300, 3000):
        frames = np.zeros((n, 48, 64, 3), np.uint8)
        frames[np.arange(n), :, np.arange(n) % 64] = 255  # a moving bar: every frame differs
        path = write_video(tmp_path / f"long{n}.mp4", frames, fps=30)
        del frames
        tracemalloc.start()
        info = probe_video(path)
        latent = encode_clip(str(path), info, Clip(), policy, codec)
        peaks[n] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert info.frames == n and latent.shape[1] == 8
    frame = 48 * 64 * 3  # bytes of one decoded frame
    assert peaks[300] < 40 * frame and peaks[3000] < 40 * frame, peaks  # 8 kept (+ their float copies)


def clock_video(path: Path, seconds: float, fps: int = 10) -> Path:
    """Frame i is grey level 4*i (a clock readable from any frame)."""
    n = int(seconds * fps)
    frames = np.repeat((np.arange(n) * 4).astype(np.uint8)[:, None, None, None], 32 * 32 * 3).reshape(n, 32, 32, 3)
    return write_video(path, frames, fps)


def first_frame_time(sample, fps=10) -> float:
    return decoded(torch.from_numpy(sample["latent"]))[0].mean() / 4 / fps


def test_a_long_video_is_cut_into_windows_and_given_time_ranges(tmp_path):
    clock_video(tmp_path / "long.mp4", 4.0)
    policy = EncodePolicy(max_pixels=32 * 32, max_frames=4, min_frames=1, clip_seconds=1.0)
    manifest, got = encode(tmp_path, [{"path": "long.mp4", "caption": "a clock"}], policy)
    assert [s["key"] for s in got] == [f"c000000_0000_{k:04d}" for k in range(4)]
    assert [(s["json"]["start"], s["json"]["end"]) for s in got] == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert [round(first_frame_time(s), 1) for s in got] == [0.0, 1.0, 2.0, 3.0]
    assert all(s["latent"].shape[1] == 4 for s in got) and manifest["samples"] == 4

    ranges = tmp_path / "ranges"
    ranges.mkdir()
    clock_video(ranges / "long.mp4", 4.0)
    rows = [{"path": "long.mp4", "caption": "first", "start": 0.5, "end": 1.5},
            {"path": "long.mp4", "caption": "later", "start": 2.2, "end": 3.9}]
    _, got = encode(ranges, rows, EncodePolicy(max_pixels=32 * 32, max_frames=4, min_frames=1))
    assert [(s["key"], s["json"]["start"], s["json"]["end"]) for s in got] == [
        ("c000000_0000", 0.5, 1.5), ("c000000_0001", 2.2, 3.9)]
    assert [round(first_frame_time(s), 1) for s in got] == [0.5, 2.2]


def test_a_video_is_cut_at_its_planted_shot_changes(tmp_path):
    shots = []
    colours = [((20, 20, 20), (230, 40, 40)), ((230, 230, 230), (40, 40, 230)), ((30, 190, 30), (250, 250, 250)),
               ((200, 30, 200), (20, 20, 20))]
    for bg, fg in colours:  # four 1-second shots, each its own colours with a moving block
        for i in range(10):
            f = np.empty((32, 48, 3), np.uint8)
            f[:] = bg
            f[8:24, 2 * i : 2 * i + 16] = fg
            shots.append(f)
    write_video(tmp_path / "cuts.mp4", np.stack(shots))
    policy = EncodePolicy(max_pixels=32 * 48, max_frames=4, min_frames=1, scenes=True)
    _, got = encode(tmp_path, [{"path": "cuts.mp4", "caption": "four shots"}], policy)
    assert [(s["json"]["start"], s["json"]["end"]) for s in got] == [(0, 1), (1, 2), (2, 3), (3, 4)]


def test_bad_rows_are_listed_with_file_line_and_reason_and_the_rest_encoded(tmp_path):
    clip = np.stack([upright_picture(32, 32)] * 4)
    write_video(tmp_path / "ok.mp4", clip)
    write_video(tmp_path / "thin.mp4", np.zeros((4, 16, 512, 3), np.uint8))
    lines = "\ufeff" + "\n".join([
        json.dumps({"path": "ok.mp4", "caption": "first line after a byte-order mark"}),
        "{not json",
        json.dumps({"path": "ok.mp4", "caption": None}),
        json.dumps({"path": None, "caption": "no file"}),
        json.dumps({"path": "ok.mp4", "caption": ""}),
        json.dumps({"path": "ok.mp4", "caption": "backwards", "start": 2.0, "end": 1.0}),
        json.dumps({"path": "thin.mp4", "caption": "a sliver"}),
        json.dumps({"path": "ok.mp4", "caption": "last"}),
    ]) + "\n"
    policy = EncodePolicy(max_pixels=32 * 32, max_frames=4, min_frames=1)
    manifest, got = encode(tmp_path, None, policy, lines=lines)
    captions = str(tmp_path / "captions.jsonl")
    failures = {f["line"]: f["reason"] for f in map(json.loads, open(tmp_path / "shards" / "failures.jsonl"))}
    assert set(failures) == {f"{captions}:{n}" for n in (2, 3, 4, 6, 7)}
    assert failures[f"{captions}:2"].startswith("not JSON")
    assert "'caption' must be a string" in failures[f"{captions}:3"]
    assert "'path' must be a file name" in failures[f"{captions}:4"]
    assert "must be before 'end'" in failures[f"{captions}:6"]
    assert "aspect 32.0:1 is too extreme for --max-pixels 1024" in failures[f"{captions}:7"]
    assert [s["json"]["caption"] for s in got] == ["first line after a byte-order mark", "", "last"]
    assert manifest["samples"] == 3 and manifest["failures"] == 5
    empty = got[1]["text"]  # the unconditional caption the trainer drops to: one zero vector
    assert empty.shape == (1, 384) and not empty.any()
    assert not list((tmp_path / "shards").glob("*.tmp"))


def test_long_captions_are_cut_at_the_encoders_option_counted_and_refused_by_a_small_text_budget(tmp_path):
    from hydra import compose, initialize_config_dir

    from sora_train import CONF_DIR
    from sora_train.config import register
    from sora_train.preflight import ConfigError, preflight

    write_video(tmp_path / "ok.mp4", np.stack([upright_picture(32, 32)] * 4))
    long = "a red square " + " ".join(["slowly"] * 40) + " moving left"
    rows = [{"path": "ok.mp4", "caption": "short"}, {"path": "ok.mp4", "caption": long}]
    manifest, got = encode(tmp_path, rows, EncodePolicy(max_pixels=32 * 32, max_frames=4, min_frames=1),
                           text_max_length=16)
    assert manifest["text_encoder"]["max_length"] == 16 and manifest["truncated_captions"] == 1
    assert manifest["max_text_tokens"] == 16
    assert [s["json"]["caption_truncated"] for s in got] == [False, True] and got[1]["text"].shape[0] == 16
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["experiment=quickstart", f"data.train={tmp_path / 'shards'}", "data.val=",
                                          "data.text_len=12", f"out_dir={tmp_path / 'run'}", "data.num_workers=0"])
    with pytest.raises(ConfigError, match=r"the longest has 16 tokens, data.text_len=12 .*data.text_len>=16"):
        preflight(cfg)
