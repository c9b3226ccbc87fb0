"""The prompt-adherence analyser: ~100% on ground-truth clips, chance on noise."""

import random

import numpy as np

from data_tools.synthetic import random_spec, render
from sora_train.evaluate import analyse, eval_prompts, score


def clip_items(n, seed, size=(32, 32), frames=8):
    rng = random.Random(seed)
    items, videos = [], []
    for _ in range(n):
        spec = random_spec(rng, min_size=32, max_size=64, min_frames=frames * 3, max_frames=frames * 6)
        full = render(spec)
        idx = np.linspace(0, len(full) - 1, frames).round().astype(int)  # like the encoder's span policy
        videos.append(full[idx])
        items.append({"colour": spec.colour, "shape": spec.shape, "motion": spec.motion, "heldout_pair": False})
    return items, videos


def test_analyser_scores_ground_truth_clips_nearly_perfectly():
    items, videos = clip_items(120, seed=0)
    s = score(items, [analyse(v) for v in videos])
    assert s["colour"] >= 0.98 and s["motion"] >= 0.95 and s["shape"] >= 0.8, s


def test_analyser_scores_noise_at_chance():
    items, _ = clip_items(120, seed=1)
    rng = np.random.default_rng(0)
    noise = [rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8) for _ in items]
    s = score(items, [analyse(v) for v in noise])
    assert s["colour"] <= 0.3 and s["motion"] <= 0.35 and s["shape"] <= 0.4, s


def test_eval_prompts_include_pairs_never_seen_in_training():
    from data_tools.synthetic import HELDOUT_PAIRS

    items = eval_prompts()
    held = {(it["colour"], it["shape"]) for it in items if it["heldout_pair"]}
    assert held == set(HELDOUT_PAIRS) and any(not it["heldout_pair"] for it in items)
