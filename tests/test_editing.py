"""Video-to-video editing (SDEdit: sora-sample video= strength=) and loops (loop=true): the truncated schedule, the
two ends of strength, a loop's wrap on a denoiser that is exact, sora-eval task=edit|loop, and the refusals."""

import numpy as np
import pytest
import torch

from sora_train.diffusion import DDPM, DDPMConfig, FlowConfig, RectifiedFlow
from sora_train.inference.generate import Edit, generate_latents

OBJECTIVES = {
    "flow-euler": (RectifiedFlow(FlowConfig(shift=3.0, resolution_shift=False)), "euler"),
    "flow-heun": (RectifiedFlow(FlowConfig()), "heun"),
    "flow-x0-euler": (RectifiedFlow(FlowConfig(prediction="x0", resolution_shift=False)), "euler"),
    "ddpm-v-ddim": (DDPM(DDPMConfig(prediction="v")), "ddim"),
    "ddpm-eps-ddim": (DDPM(DDPMConfig(prediction="eps", schedule="linear")), "ddim"),
}


def stand_in(x, t, *rest, **kw):
    """A deterministic network: a fixed function of its input and time."""
    return torch.tanh(x * (1.0 + t[:, :1, None])) * 0.7 - 0.1 * x


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
def test_an_edit_runs_the_tail_of_the_full_schedule_for_every_sampler(name):
    """From the state a full run reaches at step `start`, the truncated run visits the same times and ends where
    the full run ends, exactly: the edit's schedule is the full one's tail, not a shorter one."""
    objective, solver = OBJECTIVES[name]
    steps, start = 12, 5
    calls = []

    def predict(x, t):
        calls.append((x.clone(), t))
        return stand_in(x, torch.tensor([[t]]))

    x = torch.randn(2, 16, 4, generator=torch.Generator().manual_seed(0))
    full = objective.sample(predict, x, steps, 16, solver)
    times = objective.timesteps(steps, 16)
    # the first call of step `start` (Heun's corrector of the step before comes at the same time, earlier)
    at = max(i for i, (_, t) in enumerate(calls) if t == times[start])
    tail_calls, x_start = calls[at:], calls[at][0]
    calls.clear()
    tail = objective.sample(predict, x_start, steps, 16, solver, start=start)
    assert [t for _, t in calls] == [t for _, t in tail_calls]
    assert torch.equal(tail, full)


def edit_inputs(objective_name="flow-euler"):
    objective, solver = OBJECTIVES[objective_name]
    grid, patch, channels = (3, 2, 2), (1, 1, 1), 4
    clip = torch.randn(channels, *grid, generator=torch.Generator().manual_seed(1))
    texts = [np.ones((2, 8), np.float32), np.zeros((3, 8), np.float32)]
    return objective, solver, grid, patch, channels, clip, texts


@pytest.mark.parametrize("name", ["flow-euler", "flow-heun", "ddpm-v-ddim"])
def test_strength_one_is_text_to_video_and_a_vanishing_one_returns_the_clip(name):
    objective, solver, grid, patch, channels, clip, texts = edit_inputs(name)

    def sample(edit=None, seed=0):
        return generate_latents(stand_in, objective, texts, grid, patch, channels, 8, 10, 3.0, solver, seed, "cpu",
                                edit=edit)

    t2v = sample()
    for a, b in zip(sample(Edit(clip, 1.0)), t2v):
        assert torch.equal(a, b)
    for v in sample(Edit(clip, 0.04)):  # round(0.4) = 0 of the 10 steps run
        assert torch.equal(v, clip)
    half = sample(Edit(clip, 0.5))
    assert all(0 < (v - clip).abs().mean() < (w - clip).abs().mean() for v, w in zip(half, t2v))
    assert not torch.equal(sample(Edit(clip, 0.5), seed=1)[0], half[0])  # the noise is the seed's


def test_a_loop_wraps_as_smoothly_as_any_frame_step_on_an_exact_denoiser():
    """The exact posterior mean of a Gaussian prior that is smooth in time but not periodic (squared-exponential
    covariance over 8 latent frames): plain sampling draws from that prior, whose last and first frames are far
    apart; loop=true (the clip rolled a frame further at each step) makes the wrap a step like the others."""
    T, channels, ell = 8, 16, 1.5
    idx = torch.arange(T, dtype=torch.float64)
    cov = torch.exp(-0.5 * (idx[:, None] - idx[None]) ** 2 / ell ** 2)
    objective = RectifiedFlow(FlowConfig(prediction="x0", resolution_shift=False))

    def exact(x, t, *rest, **kw):  # E[x0 | x_t] for x_t = (1 - t) x0 + t noise, x0 ~ N(0, cov) along time
        s = float(t[0, 0])
        gain = (1 - s) * cov @ torch.linalg.inv((1 - s) ** 2 * cov + s ** 2 * torch.eye(T, dtype=torch.float64))
        return (x.double().transpose(1, 2) @ gain.T).transpose(1, 2).float()

    ratios = {}
    for loop in (False, True):
        latents = generate_latents(exact, objective, [np.zeros((1, 4), np.float32)] * 8, (T, 1, 1), (1, 1, 1),
                                   channels, 4, 30, 1.0, "euler", 0, "cpu", loop=loop)
        v = torch.stack(latents)[..., 0, 0]  # [B, C, T]
        step = (v[..., 1:] - v[..., :-1]).abs().mean()
        ratios[loop] = float((v[..., -1] - v[..., 0]).abs().mean() / step)
        assert 0.8 < float(v.std()) < 1.2  # samples of the prior's scale, not smoothed away
    assert ratios[False] > 1.7 and ratios[True] < 1.1, ratios


def test_sora_eval_scores_edits_and_loops(straight_run, tmp_path):
    """task=edit: per strength, the new attribute read back, the other attributes, the motion and the path kept,
    beside the unedited clips' own reading (which shows every attribute as before and none new); task=loop: the
    wrap seam of loop and plain samples."""
    from omegaconf import OmegaConf

    from sora_train.config import EvalConfig
    from sora_train.inference.evaluate import run

    def evaluate(**kw):
        return run(OmegaConf.structured(EvalConfig(checkpoint=str(straight_run / "checkpoints"),
                                                   out_dir=str(tmp_path / kw["task"]), per_pair=1, steps=3,
                                                   guidance=[2.0], device="cpu", **kw)))

    edit = evaluate(task="edit", strength=[0.5, 1.0])
    source = edit["results"]["source"]
    assert source["new"] == 0 and source["kept_others"] == 1 and source["path_error"] == 0
    assert source["colour"] == 1 and source["motion"] == 1
    for strength in (0.5, 1.0):
        got = edit["results"][f"guidance_2.0_strength_{strength}"]
        assert set(got) >= {"new", "new_colour", "new_background", "new_shape", "kept_others", "kept_motion",
                            "path_error", "path_kept"}
        assert all(0 <= v <= 1 for k, v in got.items() if k != "path_error" and v is not None)
        assert (tmp_path / "edit" / f"contact_sheet_edit_guidance_2.0_strength_{strength}.png").is_file()
    edited = edit["per_prompt"]["guidance_2.0_strength_0.5"]
    assert len(edited) == 8 and {e["edited"] for e in edited} == {"colour", "background", "shape"}
    assert all(e[e["edited"]] != e["was"] and e[e["edited"]] in e["prompt"] for e in edited)

    loop = evaluate(task="loop")
    for kind in ("plain", "loop"):
        assert loop["results"][f"guidance_2.0_{kind}"]["wrap_seam"] >= 0
    assert (tmp_path / "loop" / "contact_sheet_loop_guidance_2.0_loop.png").is_file()


def test_edit_and_loop_inputs_that_cannot_be_used_are_refused_in_one_line(straight_run, tmp_path):
    """Each refusal is one line before anything is written; from the command line it is `sample error: ...`, no
    traceback (one subprocess: the rest call the entry's run(), whose ValueError main() prints)."""
    import subprocess
    import sys

    from omegaconf import OmegaConf

    from distributed import ROOT, env
    from sora_train.config import SampleConfig
    from sora_train.inference.sample import run
    from test_videos import write_video

    write_video(tmp_path / "clip.mp4", np.full((5, 32, 32, 3), 90, np.uint8))
    clip, missing = str(tmp_path / "clip.mp4"), str(tmp_path / "nope.mp4")

    def refusal(**kw):
        cfg = OmegaConf.structured(SampleConfig(checkpoint=str(straight_run / "checkpoints"),
                                                out_dir=str(tmp_path / "v"), frames=8, height=32, width=32, steps=2,
                                                device="cpu"))
        with pytest.raises((ValueError, FileNotFoundError)) as e:
            run(OmegaConf.merge(cfg, kw))
        return str(e.value)

    assert refusal(video=clip, strength=0.0).startswith("strength=0.0: use 0 < strength <= 1")
    assert refusal(strength=0.5) == "strength= edits a clip: give it as video="
    assert refusal(video=missing, strength=0.5) == f"video={missing}: no such file"
    assert refusal(video=clip, strength=0.5) == "the clip to edit has 5 frame(s), fewer than frames=8: ask for frames=5"
    assert refusal(image=clip, loop=True).startswith(
        "loop=true with given frames (image=): a loop has no first or last frame to give")
    assert refusal(loop=True, frames=1) == "loop=true: 1 frame(s) make 1 latent frame; a loop needs at least 2"
    assert not (tmp_path / "v").exists()  # nothing written
    r = subprocess.run([sys.executable, "-m", "sora_train.inference.sample", f"checkpoint={straight_run / 'checkpoints'}",
                        f"out_dir={tmp_path / 'v'}", f"video={clip}", "strength=1.5"], cwd=ROOT, env=env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines()[-1] == \
        "sample error: strength=1.5: use 0 < strength <= 1 (1: from noise, text-to-video)"
