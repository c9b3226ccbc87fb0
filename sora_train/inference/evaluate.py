"""sora-eval: prompt adherence on the synthetic world, scored by a deterministic analyser.

The synthetic captions are ground truth (colour, shape, motion), so a generated video can be
checked without a learned metric:
- background = the median colour of the frame border; foreground = pixels far from it;
- colour = the named colour nearest to the foreground's median RGB;
- motion = the foreground centroid's displacement (left/right/up/down), or "beating" when the
  centroid stays and the foreground area oscillates;
- shape = from the mask's fill ratio of its bounding box and its top/bottom width profile.

task=metrics scores real video instead: FVD, FID and CLIPScore against held-out clips (inference/metrics.py).

  sora-eval checkpoint=runs/quickstart/checkpoints out_dir=runs/quickstart/eval
"""

from __future__ import annotations

import itertools
import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..synthetic_world import (BACKGROUNDS, COLOURS, HELDOUT_PAIRS, MOTIONS, PLACES, SHAPES, SIZES, SPEEDS, ClipSpec,
                               centred_start, render)

COLOUR_NAMES = tuple(COLOURS)


def _palette():
    return {n: np.array(COLOURS[n], np.float32) for n in COLOUR_NAMES}


@dataclass
class Analysis:
    colour: str | None
    motion: str | None
    shape: str | None
    foreground_fraction: float
    # What only detailed captions say (synthetic_world: SIZES, SPEEDS, PLACES); speed None for a beating shape.
    size: str | None = None
    speed: str | None = None
    place: str | None = None


def foreground_masks(frames: np.ndarray) -> np.ndarray:
    """frames uint8 [T,H,W,3] -> bool [T,H,W]: pixels far from the border's median colour."""
    f = frames.astype(np.float32)
    border = np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], 1).reshape(-1, 3)
    bg = np.median(border, 0)
    return np.linalg.norm(f - bg, axis=-1) > 60.0


def classify_shape(mask: np.ndarray) -> str | None:
    ys, xs = np.nonzero(mask)
    if len(ys) < 6:
        return None
    box = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    fill = box.mean()
    rows = box.sum(1).astype(np.float32)
    third = max(1, len(rows) // 3)
    top, bottom = rows[:third].mean(), rows[-third:].mean()
    if fill > 0.88:
        return "square"
    if top < 0.6 * bottom:
        return "triangle"
    if bottom < 0.7 * top:
        return "heart"
    return "circle"


def analyse(frames: np.ndarray) -> Analysis:
    masks = foreground_masks(frames)
    area = masks.reshape(len(masks), -1).sum(1).astype(np.float32)
    frac = float(area.mean() / masks[0].size)
    if (area > 3).sum() < max(2, len(area) // 2):  # nothing there to judge
        return Analysis(None, None, None, frac)
    fg = frames[masks].astype(np.float32)
    pal = _palette()
    med = np.median(fg, 0)
    colour = min(pal, key=lambda n: np.linalg.norm(pal[n] - med))
    valid = [i for i in range(len(masks)) if area[i] > 3]
    cent = np.array([np.argwhere(masks[i]).mean(0) for i in valid])  # (y, x) per frame
    dy, dx = cent[-1] - cent[0]
    size = np.sqrt(masks[0].size)
    moved = max(abs(dx), abs(dy)) / size
    osc = area[valid].std() / max(area[valid].mean(), 1.0)
    if moved < 0.08 and osc > 0.12:
        motion = "beating"
    elif abs(dx) >= abs(dy):
        motion = "right" if dx > 0 else "left"
    else:
        motion = "down" if dy > 0 else "up"
    h, w = masks.shape[1:]
    # sqrt(area) / shorter side: ~1.4-1.8 x the radius whatever the shape; the sizes' radii are ~0.14 and ~0.27
    extent = float(np.sqrt(area[valid].mean()) / min(h, w))
    axis = "vertical" if motion in ("up", "down") else "horizontal"
    across = float(cent[:, 1].mean() / w if axis == "vertical" else cent[:, 0].mean() / h)
    travelled = abs(dy) / h if axis == "vertical" else abs(dx) / w
    speed = None if motion == "beating" else ("slowly" if travelled < 0.42 else "quickly")
    place = min(PLACES[axis], key=lambda p: abs(PLACES[axis][p] - across))
    return Analysis(colour, motion, classify_shape(masks[valid[0]]), frac, "small" if extent < 0.31 else "large",
                    speed, place)


PROMPT_STYLES = ("short", "detailed", "upsampled")


def upsample_synthetic(item: dict) -> str:
    """A deterministic template upsampler for the synthetic world: the short prompt in the detailed captions'
    wording, with nothing it does not know (no size, speed or place)."""
    verb = "beating" if item["motion"] == "beating" else f"moving {item['motion']}"
    return f"a {item['colour']} {item['shape']} {verb} in the frame, on a {item['background']} background"


def eval_prompts(seed: int = 0, per_pair: int = 2, style: str = "short") -> list[dict]:
    """Held-out (colour, shape) pairs, each with several motions and backgrounds, plus as many seen pairs. Each
    also gets a size, speed and place (from a generator of their own: the short prompts stay what they were);
    `style` words the prompt: short (what short captions say), detailed (all of it), upsampled (short, reworded)."""
    rng = random.Random(seed)
    seen = [p for p in itertools.product(COLOUR_NAMES, SHAPES) if p not in HELDOUT_PAIRS]
    pairs = [(p, True) for p in sorted(HELDOUT_PAIRS)] + [(p, False) for p in rng.sample(seen, len(HELDOUT_PAIRS))]
    out = []
    for (colour, shape), held in pairs:
        for motion in rng.sample(MOTIONS, per_pair):
            bg = rng.choice(list(BACKGROUNDS))
            verb = "beating" if motion == "beating" else f"moving {motion}"
            out.append({"prompt": f"a {colour} {shape} {verb} on a {bg} background", "colour": colour, "shape": shape,
                        "motion": motion, "background": bg, "heldout_pair": held})
    details = random.Random(seed + 7)
    for it in out:
        axis = "vertical" if it["motion"] in ("up", "down") else "horizontal"
        it.update(size=details.choice(sorted(SIZES)), place=details.choice(sorted(PLACES[axis])),
                  speed=None if it["motion"] == "beating" else details.choice(sorted(SPEEDS)))
        if it["motion"] == "beating":
            it["place"] = "in the middle"
        if style == "detailed":
            verb = "beating" if it["motion"] == "beating" else f"moving {it['motion']} {it['speed']}"
            it["prompt"] = (f"a {it['size']} {it['colour']} {it['shape']} {verb} {it['place']} of the frame, on a "
                            f"{it['background']} background")
        elif style == "upsampled":
            it["prompt"] = upsample_synthetic(it)
    return out


def score(items: list[dict], analyses: list[Analysis]) -> dict:
    out = {}
    for attr in ("colour", "motion", "shape", "size", "speed", "place"):
        pairs = [(it, a) for it, a in zip(items, analyses) if it.get(attr) is not None]
        if not pairs:
            continue
        hits = [getattr(a, attr) == it[attr] for it, a in pairs]
        out[attr] = float(np.mean(hits))
        held = [h for h, (it, _) in zip(hits, pairs) if it["heldout_pair"]]
        out[f"{attr}_heldout"] = float(np.mean(held)) if held else None
    return out


def contact_sheet(videos: list[np.ndarray], path: Path, scale: int = 3) -> None:
    from PIL import Image

    rows = [np.concatenate([np.pad(f, ((1, 1), (1, 1), (0, 0)), constant_values=255) for f in v], 1) for v in videos]
    width = max(r.shape[1] for r in rows)
    sheet = np.concatenate([np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows])
    Image.fromarray(sheet).resize((sheet.shape[1] * scale, sheet.shape[0] * scale), Image.NEAREST).save(path)


TASKS = ("t2v", "i2v", "extend", "edit", "loop", "metrics")
EDITED = ("colour", "background", "shape")  # task=edit changes one of these per prompt, in turn


def reference_clip(item: dict, frames: int, height: int, width: int) -> np.ndarray:
    """The synthetic world's own clip for an eval prompt: its first frame(s) are the given ones of i2v/extend."""
    return render(ClipSpec(item["colour"], item["shape"], item["motion"], item["background"], height, width, frames,
                           8, 0.2, centred_start(item["motion"], 0.45), 0.45))


def seam(video: np.ndarray, real: np.ndarray, given: int) -> float:
    """How far the first generated frame is from the last given one, over how far the real clip moves there
    (~1: continuous; >> 1: a jump at the seam)."""
    step = lambda v: np.abs(v[given].astype(np.float32) - v[given - 1].astype(np.float32)).mean()  # noqa: E731
    return float(step(video) / max(step(real), 1.0))


def background_of(frames: np.ndarray) -> str:
    """The named background nearest to the frame border's median colour."""
    f = frames.astype(np.float32)
    border = np.median(np.concatenate([f[:, 0], f[:, -1], f[:, :, 0], f[:, :, -1]], 1).reshape(-1, 3), 0)
    return min(BACKGROUNDS, key=lambda n: np.linalg.norm(np.array(BACKGROUNDS[n], np.float32) - border))


def centroid_track(frames: np.ndarray) -> np.ndarray:
    """The foreground's centroid (y, x) per frame, as fractions of the frame; nan where a frame has none."""
    masks = foreground_masks(frames)
    size = np.array(masks.shape[1:], np.float32)
    return np.array([np.argwhere(m).mean(0) / size if m.sum() > 3 else (np.nan, np.nan) for m in masks])


def path_error(video: np.ndarray, source: np.ndarray) -> float:
    """How far the edited object's path is from the source's: the mean centroid distance over the frames where
    both have one, in fractions of the frame (1 where either has none)."""
    d = np.linalg.norm(centroid_track(video) - centroid_track(source), axis=1)
    return float(np.nanmean(d)) if np.isfinite(d).any() else 1.0


def edit_source(item: dict, index: int, frames: int, height: int, width: int) -> np.ndarray:
    """The clip task=edit re-prompts: the prompt's synthetic clip with its path moved off the centre line (to 0.3 or
    0.7 of the frame across the motion, in turn), where a model prompted with text alone would not put it, so that a
    kept path is the clip's and not the prompt's."""
    across = 0.3 if index % 2 == 0 else 0.7
    start = (across, 0.5) if item["motion"] == "beating" else centred_start(item["motion"], 0.45, across)
    return render(ClipSpec(item["colour"], item["shape"], item["motion"], item["background"], height, width, frames, 8,
                           0.2, start, 0.45))


def edit_prompts(items: list[dict], seed: int) -> list[dict]:
    """Each eval prompt's source clip re-prompted with one attribute changed (EDITED, in turn), to another value."""
    rng, out = random.Random(seed + 11), []
    options = {"colour": COLOUR_NAMES, "background": tuple(BACKGROUNDS), "shape": SHAPES}
    for i, it in enumerate(items):
        attr = EDITED[i % len(EDITED)]
        new = rng.choice([v for v in options[attr] if v != it[attr] and not (attr == "colour" and v == it["background"])
                          and not (attr == "background" and v == it["colour"])])
        edited = {**it, attr: new, "edited": attr, "was": it[attr]}
        verb = "beating" if it["motion"] == "beating" else f"moving {it['motion']}"
        edited["prompt"] = f"a {edited['colour']} {edited['shape']} {verb} on a {edited['background']} background"
        out.append(edited)
    return out


def edit_scores(edits: list[dict], videos: list[np.ndarray], sources: list[np.ndarray]) -> dict:
    """The new attribute shown (per attribute edited), the path and motion kept, the unchanged attributes kept."""
    read = [analyse(v) for v in videos]
    got = lambda a, attr, v: background_of(v) if attr == "background" else getattr(a, attr)  # noqa: E731
    out = {}
    for attr in EDITED:
        hits = [got(a, attr, v) == e[attr] for e, a, v in zip(edits, read, videos) if e["edited"] == attr]
        out[f"new_{attr}"] = float(np.mean(hits)) if hits else None
    out["new"] = float(np.mean([got(a, e["edited"], v) == e[e["edited"]] for e, a, v in zip(edits, read, videos)]))
    kept = [all(got(a, attr, v) == e[attr] for attr in EDITED if attr != e["edited"])
            for e, a, v in zip(edits, read, videos)]
    out["kept_others"] = float(np.mean(kept))
    out["kept_motion"] = float(np.mean([a.motion == e["motion"] for e, a in zip(edits, read)]))
    errors = [path_error(v, src) for v, src in zip(videos, sources)]
    out["path_error"] = float(np.median(errors))
    out["path_kept"] = float(np.mean([err < 0.1 for err in errors]))  # within a tenth of the frame on average
    # (the sources' paths run 0.2 off the centre line, where text alone puts them: a path within 0.1 is the clip's)
    return out


def wrap_seam(video: np.ndarray) -> float:
    """The last-to-first frame change over the clip's median frame-to-frame change (~1: seamless when looped)."""
    f = video.astype(np.float32)
    steps = np.abs(np.diff(f, axis=0)).mean(axis=(1, 2, 3))
    return float(np.abs(f[0] - f[-1]).mean() / max(np.median(steps), 1.0))


def run_edit(cfg, pipe, items, sampler, out: Path) -> dict:
    """task=edit: each prompt's own synthetic clip re-prompted with one attribute changed, at each strength."""
    edits = edit_prompts(items, cfg.seed)
    sources = [edit_source(it, i, cfg.frames, cfg.height, cfg.width) for i, it in enumerate(items)]
    results = {"source": {**score(items, [analyse(v) for v in sources]),  # the unedited clips, read back
                          **edit_scores(edits, sources, sources)}}
    per_prompt = {}
    for g in cfg.guidance:
        for strength in cfg.strength:
            name = f"guidance_{g}_strength_{strength}"
            videos = [pipe.generate([e["prompt"]], cfg.frames, cfg.height, cfg.width, cfg.steps, g, sampler, cfg.seed,
                                    edit=pipe.edit(src, cfg.frames, cfg.height, cfg.width, strength))[0]
                      for e, src in zip(edits, sources)]
            results[name] = edit_scores(edits, videos, sources)
            contact_sheet([np.concatenate([src, v]) for src, v in zip(sources[:12], videos[:12])],
                          out / f"contact_sheet_edit_{name}.png")
            per_prompt[name] = [{**e, "got": analyse(v).__dict__, "got_background": background_of(v),
                                 "path_error": path_error(v, src)} for e, v, src in zip(edits, videos, sources)]
    return {"results": results, "per_prompt": per_prompt}


def run_loop(cfg, pipe, items, sampler, out: Path) -> dict:
    """task=loop: the wrap seam of loop=true samples next to plain text-to-video samples', and both's scores."""
    results, per_prompt = {}, {}
    prompts = [it["prompt"] for it in items]
    for g in cfg.guidance:
        for kind, loop in (("plain", False), ("loop", True)):
            name = f"guidance_{g}_{kind}"
            videos = pipe.generate(prompts, cfg.frames, cfg.height, cfg.width, cfg.steps, g, sampler, cfg.seed,
                                   loop=loop)
            seams = [wrap_seam(v) for v in videos]
            results[name] = {**score(items, [analyse(v) for v in videos]), "wrap_seam": float(np.median(seams))}
            contact_sheet([np.concatenate([v, v[:2]]) for v in videos], out / f"contact_sheet_loop_{name}.png")
            per_prompt[name] = [{**it, "wrap_seam": sm} for it, sm in zip(items, seams)]
    return {"results": results, "per_prompt": per_prompt}


def run_metrics(cfg, pipe, metrics, sampler, out: Path) -> dict:
    """task=metrics: FVD/FID/CLIPScore of one sample per held-out caption against the real clips, per guidance,
    with the real set's halves as the floor (inference/metrics.py)."""
    from .metrics import batches, bias_note, gathered, generate_rows, held_out, real_rows, share

    m = cfg.metrics
    items, skipped = held_out(m.real, m.clips, pipe.codec, m.size, "metrics.real")
    mine = share(batches(items, m.batch), 0, 1)
    real = gathered(real_rows(pipe.codec, metrics, mine), pipe.device, 1)  # in clip order
    results, per_clip = {"real_halves": metrics.floor(real)}, {}
    for g in cfg.guidance:
        rows, kept = generate_rows(pipe, metrics, mine, cfg.steps, g, sampler, cfg.seed, keep=12)
        rows = gathered(rows, pipe.device, 1)
        name = f"guidance_{g}"
        results[name] = {**metrics.scores(real, rows), **metrics.at_half(real, rows)}
        contact_sheet([np.concatenate([it.frames(pipe.codec), v]) for it, v in kept], out / f"contact_sheet_{name}.png")
        if "clipscore" in metrics.nets:
            per_clip[name] = [{"caption": it.caption, "where": it.where, "clipscore": float(r[-1])}
                              for it, r in zip(items, rows)]
    return {"results": results, "per_clip": per_clip, "clips": len(items), "skipped": skipped,
            "sizes": [list(s) for s in sorted({it.size for it in items})], "networks": metrics.describe(),
            "note": bias_note(len(items))}


def run(cfg) -> dict:
    import torch

    from ..models import DiT
    from .generate import Edit
    from .pipeline import load_pipeline

    from ..preflight import check_known_keys

    check_known_keys(cfg)
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r}: use {', '.join(TASKS)}")
    if cfg.task == "edit":
        for strength in cfg.strength:
            Edit(None, strength).start(1)
    if cfg.task == "loop" and cfg.frames < 2:
        raise ValueError(f"task=loop: frames={cfg.frames}; a loop needs at least 2")
    if cfg.prompts not in PROMPT_STYLES:
        raise ValueError(f"prompts={cfg.prompts!r}: use {', '.join(PROMPT_STYLES)}")
    metrics = None
    if cfg.task == "metrics":  # the networks refused before any weights are loaded or samples generated
        from .metrics import Metrics
        from .pipeline import resolve_device

        if cfg.metrics.size is not None and len(cfg.metrics.size) != 3:
            raise ValueError(f"metrics.size={list(cfg.metrics.size)}: use [frames, height, width] or null")
        metrics = Metrics(cfg.metrics, resolve_device(cfg.device))
    pipe = load_pipeline(cfg.checkpoint, cfg.use_ema, cfg.device)
    sampler = pipe.sampler(cfg.sampler)  # refused before any work
    if cfg.untrained:  # the same architecture at initialisation: the floor to compare against
        torch.manual_seed(0)
        pipe.forward = DiT(pipe.args).eval().to(pipe.device)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {"checkpoint": str(cfg.checkpoint), "untrained": cfg.untrained, "step": pipe.meta.get("step"),
              "task": cfg.task, "sampler": sampler, "steps": cfg.steps}
    if metrics is not None:
        report.update(run_metrics(cfg, pipe, metrics, sampler, out))
        (out / "report.json").write_text(json.dumps(report, indent=1))
        return report
    items = eval_prompts(cfg.seed, cfg.per_pair, cfg.prompts)
    report.update(prompt_style=cfg.prompts, prompts=len(items), results={})
    if cfg.task in ("edit", "loop"):
        report.update((run_edit if cfg.task == "edit" else run_loop)(cfg, pipe, items, sampler, out))
        (out / "report.json").write_text(json.dumps(report, indent=1))
        return report
    given_n = {"t2v": 0, "i2v": 1, "extend": cfg.frames // 2}[cfg.task]
    for g in cfg.guidance:
        name = f"guidance_{g}"
        if given_n == 0:
            videos = pipe.generate([it["prompt"] for it in items], cfg.frames, cfg.height, cfg.width, cfg.steps, g,
                                   sampler, cfg.seed)
        else:  # one prompt at a time: each has its own given frames
            reals = [reference_clip(it, cfg.frames, cfg.height, cfg.width) for it in items]
            videos = [pipe.generate([it["prompt"]], cfg.frames, cfg.height, cfg.width, cfg.steps, g, sampler, cfg.seed,
                                    pipe.given_frames(cfg.frames, cfg.height, cfg.width, first=real[:given_n]))[0]
                      for it, real in zip(items, reals)]
        analyses = [analyse(v[given_n:]) for v in videos]  # the generated frames: the given ones would score themselves
        report["results"][name] = score(items, analyses)
        if given_n:
            seams = [seam(v, real, given_n) for v, real in zip(videos, reals)]
            report["results"][name].update(seam=float(np.median(seams)), given_frames=given_n)
            text_only = pipe.generate([it["prompt"] for it in items], cfg.frames, cfg.height, cfg.width, cfg.steps,
                                      g, sampler, cfg.seed)  # the same prompts without given frames, beside it
            report["results"][f"{name}_text_only"] = score(items, [analyse(v) for v in text_only])
        contact_sheet(videos, out / f"contact_sheet_{cfg.task}_{name}.png" if given_n else out / f"contact_sheet_{name}.png")
        report.setdefault("per_prompt", {})[name] = [
            {**it, "got": analyses[i].__dict__} for i, it in enumerate(items)]
    (out / "report.json").write_text(json.dumps(report, indent=1))
    return report


def main() -> None:
    import hydra

    from .. import CONF_DIR
    from ..config import register

    register()

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="eval")
    def entry(cfg):
        from ..preflight import ConfigError

        try:
            report = run(cfg)
        except (ConfigError, FileNotFoundError, ValueError) as e:
            sys.exit(f"eval error: {e}")
        if report["task"] == "metrics":
            print(f"{report['clips']} held-out clips ({report['skipped']} skipped); networks and protocols in "
                  f"report.json" + (f"; {report['note']}" if report["note"] else ""))
        form = ".4g" if report["task"] == "metrics" else ".2f"  # distances span orders of magnitude
        for k, v in report["results"].items():
            print(k, "  ".join(f"{a}={x:{form}}" for a, x in v.items() if isinstance(x, float)))
        print(f"report and contact sheets in {cfg.out_dir}")

    entry()


if __name__ == "__main__":
    main()
