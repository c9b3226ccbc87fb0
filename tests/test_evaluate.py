"""The prompt-adherence analyser: ~100% on ground-truth clips, chance on noise."""

import random

import numpy as np

from data_tools.synthetic import random_spec, render
from sora_train.inference.evaluate import analyse, eval_prompts, score


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


def test_synthetic_travel_and_aspect_options_shape_the_clips():
    from sora_train.synthetic_world import motion_centre

    rng = random.Random(0)
    specs = [random_spec(rng, max_aspect=1.0, travel=0.7) for _ in range(40)]
    assert all(s.height == s.width for s in specs)
    right = next(s for s in specs if s.motion == "right")
    (x0, y0), (x1, _) = motion_centre(right, 0), motion_centre(right, right.frames - 1)
    assert abs(x0 / right.width - 0.15) < 1e-6 and abs(x1 / right.width - 0.85) < 1e-6 and y0 == right.height / 2
    frames = render(right)  # the shape is drawn where motion_centre says: its foreground centroid travels right
    bg = frames[0, 0, 0]
    xs = [np.nonzero((f != bg).any(-1))[1].mean() for f in frames[[0, -1]]]
    assert xs[1] - xs[0] > 0.5 * right.width, xs


def test_analyser_reads_what_only_detailed_captions_say_on_ground_truth_clips():
    """Size, speed and place (sora-synth --detailed): read back from the drawn clips, and named in the detailed
    caption the clip is trained on."""
    rng = random.Random(3)
    items, videos = [], []
    for _ in range(120):
        spec = random_spec(rng, min_size=32, max_size=64, min_frames=24, max_frames=48, detailed=True)
        full = render(spec)
        videos.append(full[np.linspace(0, len(full) - 1, 8).round().astype(int)])
        items.append({"colour": spec.colour, "shape": spec.shape, "motion": spec.motion, "heldout_pair": False,
                      "size": spec.size_word, "speed": spec.speed_word, "place": spec.place_word})
        assert all(w in spec.detailed_caption for w in (spec.size_word, spec.place_word, spec.speed_word or ""))
    s = score(items, [analyse(v) for v in videos])
    assert s["size"] >= 0.9 and s["speed"] >= 0.9 and s["place"] >= 0.9 and s["motion"] >= 0.95, s


def test_eval_prompt_styles_word_the_same_items():
    short, detailed, upsampled = (eval_prompts(0, 2, style) for style in ("short", "detailed", "upsampled"))
    assert [i["prompt"] for i in short] == [i["prompt"] for i in eval_prompts(0, 2)]
    assert [{k: v for k, v in i.items() if k != "prompt"} for i in short] == \
        [{k: v for k, v in i.items() if k != "prompt"} for i in detailed]
    first = detailed[0]
    assert first["size"] in first["prompt"] and first["place"] in first["prompt"]
    assert all(i["size"] not in u["prompt"] for i, u in zip(short, upsampled))
