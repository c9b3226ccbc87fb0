"""Frame conditioning: given (clean) latent frames read a t = 0 slot, carry no loss, pack beside unconditioned
samples, and the sampler keeps them exactly (image-to-video through the pixel codec)."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sora_train.data import Packer, patchify
from sora_train.data.packing import Item
from sora_train.diffusion import ConditionConfig, FlowConfig, RectifiedFlow, draw_given, per_token
from sora_train.models import DiT, DiTArgs

ARGS = DiTArgs(in_channels=4, patch_size=(1, 2, 2), dim=48, depth=2, heads=4, text_dim=8, attention="sdpa",
               max_segments=4)


def item(key: str, frames: int, seed: int) -> Item:
    g = torch.Generator().manual_seed(seed)
    tokens, pos = patchify(torch.randn(4, frames, 4, 4, generator=g), ARGS.patch_size)
    return Item((0, 0, seed), key, tokens, pos, (frames, 2, 2), torch.randn(3, 8, generator=g), key)


def pack(*items, seq_len=64):
    packer = Packer(seq_len, 32, 1, 4, len(items), ARGS.patch_dim, 8)
    for it in items:
        out = packer.add(it)
    return (out or packer.flush())[0]


def model():
    torch.manual_seed(0)
    m = DiT(ARGS).eval()
    for p in m.parameters():  # adaLN-Zero starts at zero: give every weight a value so that t matters
        torch.nn.init.normal_(p, std=0.2)
    return m


def test_given_tokens_are_drawn_per_kind_and_never_for_images():
    b = pack(item("a", 4, 1), item("b", 1, 2), item("c", 3, 3))
    pos, seg, grids = b.pos, b.seg, b.grids
    first = draw_given(ConditionConfig(first=1.0), pos, seg, grids, torch.Generator().manual_seed(0))
    assert torch.equal(first, (seg > 0) & (pos[..., 0] == 0) & (seg != 2))  # frame 0 of a and c; b is an image
    both = draw_given(ConditionConfig(first_last=1.0), pos, seg, grids, torch.Generator().manual_seed(0))
    last = torch.tensor([0, 3, 0, 2])[seg]  # each sample's last frame (a: 3, c: 2)
    assert torch.equal(both, (seg > 0) & (seg != 2) & ((pos[..., 0] == 0) | (pos[..., 0] == last)))
    none = draw_given(ConditionConfig(), pos, seg, grids, torch.Generator().manual_seed(0))
    assert not none.any()
    with pytest.raises(ValueError, match="sum to <= 1"):
        ConditionConfig(first=0.7, last=0.5).validate()


def test_given_tokens_read_a_clean_slot_whatever_the_samples_t():
    """A sample whose every token is given is the same sample at t = 0: the model reads given tokens at t = 0."""
    m, b = model(), pack(item("a", 3, 1))
    x, text = b.tokens, b.text
    given = b.seg > 0
    with torch.no_grad():
        out = m(x, torch.full((1, 4), 0.8), b.pos, b.seg, text, b.text_seg, given=given)
        at0 = m(x, torch.zeros(1, 4), b.pos, b.seg, text, b.text_seg)
        at8 = m(x, torch.full((1, 4), 0.8), b.pos, b.seg, text, b.text_seg)
    real = b.seg[0] > 0
    torch.testing.assert_close(out[0, real], at0[0, real], rtol=1e-5, atol=1e-6)
    assert (out[0, real] - at8[0, real]).abs().max() > 1e-3


def test_a_conditioned_sample_packs_beside_an_unconditioned_one():
    m, a, c = model(), item("a", 3, 1), item("c", 2, 5)
    alone, both = pack(a), pack(a, c)
    with torch.no_grad():
        out_alone = m(alone.tokens, torch.full((1, 4), 0.6), alone.pos, alone.seg, alone.text, alone.text_seg,
                      given=(alone.seg == 1) & (alone.pos[..., 0] == 0))
        t = torch.tensor([[0.6, 0.3, 0.0, 0.0]])
        out_both = m(both.tokens, t, both.pos, both.seg, both.text, both.text_seg,
                     given=(both.seg == 1) & (both.pos[..., 0] == 0))
    torch.testing.assert_close(out_both[0, both.seg[0] == 1], out_alone[0, alone.seg[0] == 1], rtol=1e-5, atol=1e-6)


def test_given_tokens_carry_no_loss_in_the_trainers_step():
    """Trainer.loss on a conditioned micro-batch: changing the target where tokens are given changes nothing,
    elsewhere it does; the mean is over the tokens that carry loss."""
    from sora_train.train import Trainer

    trainer = object.__new__(Trainer)
    trainer.dims = SimpleNamespace(sp_rank=0, sp=1)
    trainer.device, trainer.dtype, trainer.engine = torch.device("cpu"), torch.float32, model()
    trainer.objective = RectifiedFlow(FlowConfig())
    b = pack(item("a", 4, 1), item("c", 3, 3))
    t = torch.tensor([[0.5, 0.7, 0.0, 0.0]])
    noise = torch.randn(b.tokens.shape, generator=torch.Generator().manual_seed(0))
    x_t, target = trainer.objective.corrupt(b.tokens, noise, per_token(t, b.seg))
    given = draw_given(ConditionConfig(first=1.0), b.pos, b.seg, b.grids, torch.Generator().manual_seed(0))
    x_t = torch.where(given[..., None], b.tokens, x_t)
    with torch.no_grad():
        loss, errors, loss_seg = trainer.loss(x_t, t, target, b, given=given)
        moved = target.clone()
        moved[given] += 10.0
        assert trainer.loss(x_t, t, moved, b, given=given)[0] == loss
        moved = target.clone()
        moved[(b.seg > 0) & ~given] += 10.0
        assert trainer.loss(x_t, t, moved, b, given=given)[0] > loss
    carry = (b.seg > 0) & ~given
    assert torch.equal(loss_seg > 0, carry)
    torch.testing.assert_close(loss, errors[carry].sum() / carry.sum())


def test_the_sampler_keeps_a_given_image_exactly_on_a_trained_model(straight_run, tmp_path):
    """image-to-video on the tiny model trained by the straight run: the first frame is the image, bit for bit
    through the pixel codec; and `sora-sample image=` writes the video."""
    import subprocess
    import sys

    from PIL import Image

    from distributed import ROOT, env
    from sora_train.inference import load_pipeline
    from sora_train.inference.sample import read_frames_of

    image = np.zeros((32, 32, 3), np.uint8)
    image[8:20, 6:18] = (220, 30, 30)
    Image.fromarray(image).save(tmp_path / "red.png")
    pipe = load_pipeline(straight_run / "checkpoints", use_ema=False, device="cpu")
    given = pipe.given_frames(4, 32, 32, first=read_frames_of("image", str(tmp_path / "red.png")))
    (video,) = pipe.generate(["a red square moving right"], 4, 32, 32, steps=3, guidance=2.0, given=given)
    assert video.shape == (4, 32, 32, 3) and np.array_equal(video[0], image)
    assert not np.array_equal(video[-1], image)  # the rest is generated
    r = subprocess.run([sys.executable, "-m", "sora_train.inference.sample", f"checkpoint={straight_run / 'checkpoints'}",
                        f"out_dir={tmp_path / 'videos'}", "frames=4", "height=32", "width=32", "steps=2",
                        f"image={tmp_path / 'red.png'}", "prompts=[a red square]"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "videos" / "00_a_red_square.mp4").stat().st_size > 0
    r = subprocess.run([sys.executable, "-m", "sora_train.inference.sample", f"checkpoint={straight_run / 'checkpoints'}",
                        f"image={tmp_path / 'red.png'}", f"video={tmp_path / 'red.png'}"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "give one of image=, video= or first=/last=" in r.stderr


@pytest.mark.parametrize("task,given", [("i2v", 1), ("extend", 2)])
def test_eval_scores_image_to_video_and_extension_beside_text_only(straight_run, tmp_path, task, given):
    from omegaconf import OmegaConf

    from sora_train.config import EvalConfig
    from sora_train.inference.evaluate import run

    cfg = OmegaConf.structured(EvalConfig(checkpoint=str(straight_run / "checkpoints"), out_dir=str(tmp_path),
                                          frames=4, height=32, width=32, steps=2, guidance=[2.0], per_pair=1,
                                          task=task, device="cpu"))
    report = run(cfg)
    got, text_only = report["results"]["guidance_2.0"], report["results"]["guidance_2.0_text_only"]
    assert report["task"] == task and got["given_frames"] == given and np.isfinite(got["seam"]) and got["seam"] >= 0
    assert set(text_only) >= {"colour", "motion", "shape"} and set(got) >= {"colour", "motion", "shape"}
    assert (tmp_path / f"contact_sheet_{task}_guidance_2.0.png").stat().st_size > 0


def test_a_conditioned_and_routed_run_resumes_exactly(dataset, tmp_path):
    """The given frames and the routed tokens (model.route) are drawn from the step's keyed generator, like the
    noise: a run stopped at step 2 and resumed trains steps 3-4 as a straight run does."""
    from distributed import step_losses, tiny_model, torchrun

    cond = {"diffusion.condition.first": 0.5, "diffusion.condition.last": 0.3, "checkpoint.every": 2,
            "model.route.share": 0.5, "model.route.start": 1, "model.route.end": 2}
    torchrun(1, ["-m", "sora_train.train", *tiny_model(dataset / "shards", tmp_path / "straight",
                                                       **{**cond, "optim.steps": 4})])
    for steps in (2, 4):
        torchrun(1, ["-m", "sora_train.train", *tiny_model(dataset / "shards", tmp_path / "parts",
                                                           **{**cond, "optim.steps": steps})])
    straight, parts = step_losses(tmp_path / "straight"), step_losses(tmp_path / "parts")
    assert [parts[s] for s in (3, 4)] == [straight[s] for s in (3, 4)]


def test_sampling_inputs_that_cannot_be_used_are_refused_and_doubtful_ones_warned(straight_run, tmp_path, capsys):
    """One line for a file that is not an image or a video and a missing upsampler; a warning, once, that a model
    trained without frame conditioning was given frames, and that a video gave fewer frames than context_frames;
    and no NumPy "not writable" warning on the way."""
    import subprocess
    import sys
    import warnings

    from omegaconf import OmegaConf
    from PIL import Image

    from distributed import ROOT, env
    from sora_train.config import SampleConfig
    from sora_train.inference.sample import run
    from test_videos import write_video

    def sample(**kw):
        return run(OmegaConf.structured(SampleConfig(
            checkpoint=str(straight_run / "checkpoints"), out_dir=str(tmp_path / "v"), prompts=["a red square"],
            frames=8, height=32, width=32, steps=2, device="cpu", **kw)))

    (tmp_path / "notes.png").write_text("not an image")
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(ValueError, match=r"^image=.*notes.png: not an image that can be read"):
        sample(image=str(tmp_path / "notes.png"))
    with pytest.raises(ValueError, match=r"^video=.*notes.mp4: not a video that can be read"):
        sample(video=str(tmp_path / "notes.mp4"))
    with pytest.raises(FileNotFoundError, match=r"^upsample=.*nope: not a local transformers model directory"):
        sample(upsample=str(tmp_path / "nope"))
    Image.fromarray(np.full((32, 32, 3), 200, np.uint8)).save(tmp_path / "grey.png")
    write_video(tmp_path / "two.mp4", np.full((2, 32, 32, 3), 90, np.uint8))
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sample(image=str(tmp_path / "grey.png"))
        sample(video=str(tmp_path / "two.mp4"), context_frames=4)
    err = capsys.readouterr().err
    assert err.count("trained without frame conditioning") == 2  # once per sora-sample, not per prompt or frame
    assert "video=" in err and "has 2 frame(s), fewer than context_frames=4: all 2 are given" in err
    assert not [w for w in caught if "not writable" in str(w.message)], [str(w.message) for w in caught]
    r = subprocess.run([sys.executable, "-m", "sora_train.inference.evaluate", f"checkpoint={straight_run / 'checkpoints'}",
                        "task=v2v"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith("eval error: task='v2v': use t2v"), r.stderr
    assert "Traceback" not in r.stderr
