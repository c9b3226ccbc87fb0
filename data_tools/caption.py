"""sora-caption: re-caption clips with a vision-language model from a local directory (the DALL-E 3 / Sora recipe:
a captioner writes detailed captions, the model trains on them).

  sora-caption --captions data/raw/captions.jsonl --out data/raw/captions_long.jsonl --model /models/qwen2-vl \\
      --frames 4 --batch 8 --workers 2

The model is loaded through transformers' image-text-to-text classes and prompted with its own chat template:
N frames of the clip, evenly spread, as images, then a request for subject, motion, background, details, style
and camera, with the original caption as a hint. The output keeps every line and field of the input (paths made
relative to the output's directory) and adds `caption_long` and `captioner` (the model's directory name); encode
both with `sora-encode --caption-keys caption,caption_long`. Lines are captioned in parts of --lines-per-part,
each written whole (`<out>.parts/part-000012.jsonl`), so a rerun skips finished parts and SLURM array tasks own
disjoint parts; a clip that cannot be read is listed in `<out>.failures.jsonl` and keeps only its caption.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from data_tools.encode import DefaultsHelpFormatter, _write_json, file_sha256, read_captions
from sora_train.video_io import VideoReadError, probe_video, read_frames

PROMPT = ("Describe this video in detail, for training a text-to-video model: the main subject and its "
          "appearance, what it does and how it moves, the background, notable details, the visual style and the "
          "camera. Its short title is: {caption}")

_worker: dict = {}


def clip_frames(path: str, n: int) -> list[np.ndarray]:
    """n frames spread evenly from the first to the last (upright, display aspect left to the processor)."""
    info = probe_video(path)
    idx = sorted({int(i) for i in np.linspace(0, info.frames - 1, min(n, info.frames)).round()})
    return list(read_frames(path, idx, info))


def _init_worker(model_dir: str, threads: int) -> None:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(threads)
    processor = AutoProcessor.from_pretrained(model_dir, local_files_only=True)
    if getattr(processor, "tokenizer", None) is not None:
        processor.tokenizer.padding_side = "left"  # decoder-only generation continues the right end of each row
    _worker.update(processor=processor, name=Path(model_dir).name,
                   model=AutoModelForImageTextToText.from_pretrained(model_dir, local_files_only=True).eval())


def check_model(model_dir: str) -> None:
    """A local transformers image-text-to-text model, or one line saying what it is instead."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if not (Path(model_dir) / "config.json").is_file():
        raise FileNotFoundError(f"--model {model_dir}: not a local transformers model directory (no config.json)")
    kind = AutoConfig.from_pretrained(model_dir, local_files_only=True).model_type
    if kind not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        raise ValueError(f"--model {model_dir}: a {kind!r} model, not an image-text-to-text (vision-language) one "
                         f"that transformers' AutoModelForImageTextToText loads, e.g. Qwen2-VL, SmolVLM, LLaVA")


def caption_batch(rows: list[dict], frames: list[list[np.ndarray]], prompt: str, max_new_tokens: int) -> list[str]:
    import torch

    processor, model = _worker["processor"], _worker["model"]
    texts = [processor.apply_chat_template([{"role": "user", "content": [
        *({"type": "image"} for _ in f), {"type": "text", "text": prompt.format(caption=r["caption"])}]}],
        add_generation_prompt=True) for r, f in zip(rows, frames)]
    inputs = processor(text=texts, images=frames, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return [t.strip() for t in processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)]


def caption_part(part: int, rows: list[dict], base: str, parts_dir: str, settings: dict) -> dict:
    """Captions one part of the lines and writes it whole; returns its failures."""
    out, failures, ready = [], [], []
    for row in rows:
        if "error" in row:
            failures.append({"line": row["where"], "reason": row["error"]})
            continue
        src = row["path"] if os.path.isabs(row["path"]) else os.path.join(base, row["path"])
        try:
            ready.append((row, clip_frames(src, settings["frames"])))
        except VideoReadError as e:
            failures.append({"path": src, "line": row["where"], "reason": str(e)})
            out.append(row)
    for i in range(0, len(ready), settings["batch"]):
        chunk = ready[i : i + settings["batch"]]
        new = caption_batch([r for r, _ in chunk], [f for _, f in chunk], settings["prompt"],
                            settings["max_new_tokens"])
        out += [dict(r, caption_long=c, captioner=_worker["name"]) for (r, _), c in zip(chunk, new)]
    order = {r["where"]: k for k, r in enumerate(rows)}
    out.sort(key=lambda r: order[r["where"]])
    path = Path(parts_dir) / f"part-{part:06d}.jsonl"
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps({"row": r}) + "\n" for r in out)
                   + "".join(json.dumps({"failure": f}) + "\n" for f in failures))
    os.replace(tmp, path)  # a part is there whole or not at all: a rerun redoes only missing parts
    return {"part": part, "captioned": sum("caption_long" in r for r in out), "failures": len(failures)}


def finalize(out: Path, parts_dir: Path, num_parts: int, src_base: Path) -> Path | None:
    parts = [parts_dir / f"part-{i:06d}.jsonl" for i in range(num_parts)]
    if not all(p.exists() for p in parts):
        print(f"{sum(p.exists() for p in parts)}/{num_parts} parts done; {out} is written when all are")
        return None
    rows, failures = [], []
    for p in parts:
        for line in p.read_text().splitlines():
            entry = json.loads(line)
            if "row" in entry:
                rows.append(entry["row"])
            else:
                failures.append(entry["failure"])
    with open(out.with_suffix(".tmp"), "w") as f:
        for r in rows:
            r = {k: v for k, v in r.items() if k not in ("where", "index")}
            if not os.path.isabs(r["path"]):  # relative to the output's directory from now on
                r["path"] = os.path.relpath(src_base / r["path"], out.parent.resolve())
            f.write(json.dumps(r) + "\n")
    os.replace(out.with_suffix(".tmp"), out)
    with open(out.with_name(out.stem + ".failures.jsonl"), "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in failures)
    return out


def run(captions: str, out: str, model: str, frames: int = 4, batch: int = 4, max_new_tokens: int = 160,
        prompt: str = PROMPT, workers: int = 1, num_tasks: int = 1, task_index: int = 0,
        lines_per_part: int = 64) -> Path | None:
    if not Path(captions).is_file():
        raise FileNotFoundError(f"--captions {captions}: no such file")
    check_model(model)  # before anything is written: a wrong --model leaves no settings behind
    out_path = Path(out)
    parts_dir = Path(str(out_path) + ".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    settings = {"captions_sha256": file_sha256(Path(captions)), "model": str(Path(model).resolve()),
                "frames": frames, "max_new_tokens": max_new_tokens, "prompt": prompt, "lines_per_part": lines_per_part,
                "batch": batch}
    claimed = parts_dir / "settings.json"
    # A rerun continues only what the same inputs and settings started; with no part written yet there is nothing
    # to mix, and the new settings are claimed instead.
    if claimed.exists() and any(parts_dir.glob("part-*.jsonl")):
        old = json.loads(claimed.read_text())
        changed = [k for k in settings if k != "batch" and old.get(k) != settings[k]]
        if changed:
            raise ValueError(f"{parts_dir} holds captions made with other {', '.join(changed)}; write to another "
                             f"--out or delete it to start over")
    else:
        _write_json(claimed, settings)
    rows = read_captions(captions)
    base = Path(captions).resolve().parent
    parts = [rows[i : i + lines_per_part] for i in range(0, len(rows), lines_per_part)]
    todo = [i for i in range(len(parts)) if i % num_tasks == task_index
            and not (parts_dir / f"part-{i:06d}.jsonl").exists()]
    threads = max(1, (os.cpu_count() or 1) // max(workers, 1))
    t0 = time.time()
    if workers <= 1:
        _init_worker(model, threads)
        results = [caption_part(i, parts[i], str(base), str(parts_dir), settings) for i in todo]
    else:
        import multiprocessing as mp

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(model, threads)) as pool:
            results = list(pool.map(caption_part, todo, [parts[i] for i in todo], [str(base)] * len(todo),
                                    [str(parts_dir)] * len(todo), [settings] * len(todo)))
    done = sum(r["captioned"] for r in results)
    if results:
        print(f"captioned {done} clips in {time.time() - t0:.1f} s ({done / max(time.time() - t0, 1e-9):.2f} clips/s), "
              f"{sum(r['failures'] for r in results)} failures")
    return finalize(out_path, parts_dir, len(parts), base)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()), formatter_class=DefaultsHelpFormatter)
    p.add_argument("--captions", required=True, help="the input captions.jsonl (path and caption per line)")
    p.add_argument("--out", required=True, help="the output captions.jsonl (a rerun continues it)")
    p.add_argument("--model", required=True, help="local directory of a transformers image-text-to-text model")
    p.add_argument("--frames", type=int, default=4, help="frames per clip shown to the model")
    p.add_argument("--batch", type=int, default=4, help="clips per generate call")
    p.add_argument("--max-new-tokens", type=int, default=160, help="longest caption, in the model's tokens")
    p.add_argument("--prompt", default=PROMPT, help="the request; {caption} is the line's caption")
    p.add_argument("--lines-per-part", type=int, default=64, help="lines per part (a unit of work and of resume)")
    p.add_argument("--workers", type=int, default=1, help="captioning processes on this machine")
    p.add_argument("--num-tasks", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 1)),
                   help="array tasks sharing the work (default: SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--task-index", type=int, default=int(os.environ.get("SLURM_ARRAY_TASK_ID", 0))
                   - int(os.environ.get("SLURM_ARRAY_TASK_MIN", 0)), help="this task (default: from SLURM_ARRAY_TASK_ID)")
    a = p.parse_args(argv)
    try:
        path = run(a.captions, a.out, a.model, a.frames, a.batch, a.max_new_tokens, a.prompt, a.workers, a.num_tasks,
                   a.task_index, a.lines_per_part)
    except (FileNotFoundError, ValueError) as e:
        p.exit(2, f"sora-caption: {e}\n")
    if path:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
