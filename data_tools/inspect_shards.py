"""sora-inspect: what is in a shard set: manifest summary, and decoded samples as a PNG to look at; how redundant
its spacetime patches are (what model.route could skip); or what a mixture of shard sets packs into rows: each
source's realised share of the tokens, and the packing efficiency.

  sora-inspect data/shards --show 8 --png /tmp/samples.png
  sora-inspect data/shards --redundancy 200
  sora-inspect --mix images=data/recipe/images:0.25 clips=data/recipe/video_low:0.75 --rows 200 --seq-len 1024
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from sora_train.codecs import codec_from_manifest_name
from sora_train.data import list_shards, load_manifest
from sora_train.data.decode import BadSample, decode_clip


def mix_report(mix: list[str], rows: int, seq_len: int, text_len: int, patch: tuple[int, int, int],
               lookahead: int, max_per_row: int) -> dict:
    """The rows a data.sources mixture packs (name=shards:weight each), read as the trainer's loader reads them."""
    from collections import Counter

    from omegaconf import OmegaConf

    from sora_train.data import PackedLoader, StreamSpec
    from sora_train.data.mixture import sources_of

    nodes = {}
    for item in mix:
        name, eq, rest = item.partition("=")
        path, _, weight = rest.rpartition(":")
        try:
            if not (eq and name and path):
                raise ValueError
            nodes[name] = {"train": path, "weight": float(weight)}
        except ValueError:
            raise ValueError(f"--mix {item}: give NAME=SHARDS:WEIGHT, e.g. clips=data/clips:0.7") from None
    sources = sources_of(OmegaConf.create(nodes))  # missing shards, negative or all-zero weights: ValueError
    m = load_manifest(sources[0].urls[0].rsplit("/", 1)[0])
    spec = StreamSpec(seq_len, text_len, 1, max_per_row, lookahead, 0, None, 0.0, "crop_time", patch,
                      m["codec"]["latent_channels"], m["text_encoder"]["width"])
    tokens, real = Counter(), 0
    for _, b in zip(range(rows), PackedLoader(sources, spec)):
        ids = iter(b.consumed)  # the packed samples' ids first, row by row; a mixture's carry the source first
        for r, row in enumerate(b.keys):
            for j in range(len(row)):
                tokens[sources[next(ids)[0]].name] += int(b.grids[r, j].prod())
        real += b.real_tokens
    total = sum(tokens.values())
    return {"rows": rows, "packing_efficiency": real / (rows * seq_len),
            "token_share": {s.name: tokens[s.name] / total for s in sources},
            "weight_share": {s.name: s.weight / sum(x.weight for x in sources) for s in sources}}


def redundancy_report(source: str, samples: int, thresholds: list[float], patch: tuple[int, int, int] | None = None,
                      seed: int = 0) -> dict:
    """The share of a shard set's latent patches that change by less than each threshold from the same place one
    latent frame earlier (models/routing.py: temporal_change, the RMS change over the sample's RMS), over all tokens
    and over the tokens with an earlier frame; and the change of the tokens model.route.select=redundancy would
    route at a few shares (the lowest-changing floor(share * n) of each sample)."""
    import webdataset as wds

    from sora_train.data import patchify
    from sora_train.models.routing import choose_routed, temporal_change

    m = load_manifest(source)
    if not m:
        raise ValueError(f"{source}: no manifest.json (sora-encode writes one)")
    patch = tuple(patch or m["patch_size"])
    changes, read, bad = [], 0, 0
    for raw in wds.tarfile_to_samples()([{"url": u} for u in list_shards(source)]):
        try:
            clip = decode_clip(raw, m["codec"]["latent_channels"], m["text_encoder"]["width"], patch)
        except BadSample:
            bad += 1
            continue
        tokens, pos = patchify(torch.from_numpy(clip.latent.astype(np.float32)), patch)
        changes.append(temporal_change(tokens[None], pos[None], torch.ones(1, len(tokens), dtype=torch.long))[0])
        read += 1
        if read >= samples:
            break
    if not changes:
        raise ValueError(f"{source}: no readable sample ({bad} bad)")
    every = torch.cat(changes)
    later = every[torch.isfinite(every)]
    report = {"samples": read, "bad_samples": bad, "tokens": len(every), "tokens_with_an_earlier_frame": len(later),
              "below": {str(t): {"of_all_tokens": round(float((later < t).sum()) / len(every), 4),
                                 "of_later_frames": round(float((later < t).float().mean()), 4) if len(later) else 0.0}
                        for t in thresholds}}
    routed = {}
    for share in (0.25, 0.5, 0.75):
        picked = torch.cat([c[choose_routed(c[None], torch.ones(1, len(c), dtype=torch.long), share,
                                            torch.Generator().manual_seed(seed))[0]] for c in changes])
        finite = picked[torch.isfinite(picked)]
        routed[str(share)] = {"median_change": round(float(finite.median()), 4) if len(finite) else None,
                              "without_an_earlier_frame": round(1 - len(finite) / max(len(picked), 1), 4)}
    report["route_redundancy_picks"] = routed
    return report


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("source", nargs="?", help="shard directory, brace pattern or pipe: command")
    p.add_argument("--show", type=int, default=0, help="decode this many samples")
    p.add_argument("--png", default=None, help="write the decoded samples' frames to this PNG")
    p.add_argument("--redundancy", type=int, default=0, metavar="N",
                   help="report how many latent patches repeat over time, over the first N samples")
    p.add_argument("--thresholds", default="0.01,0.05,0.1,0.2",
                   help="--redundancy: change thresholds (RMS change over the sample's RMS)")
    p.add_argument("--mix", nargs="+", metavar="NAME=SHARDS:WEIGHT", help="pack a mixture instead (data.sources)")
    p.add_argument("--rows", type=int, default=100, help="--mix: rows to pack")
    p.add_argument("--seq-len", type=int, default=2048, help="--mix: tokens per row (data.seq_len)")
    p.add_argument("--text-len", type=int, default=256, help="--mix: text tokens per row (data.text_len)")
    p.add_argument("--max-per-row", type=int, default=64, help="--mix: samples per row (data.max_per_row)")
    p.add_argument("--lookahead", type=int, default=64, help="--mix: samples the packer chooses from")
    p.add_argument("--patch-size", default="1,2,2",
                   help="--mix, --redundancy: the model's (t,h,w) patch (--redundancy: the manifest's if not given)")
    a = p.parse_args(argv)
    if a.redundancy:
        if not a.source:
            p.error("--redundancy: give a shard source")
        try:
            patch = None if "--patch-size" not in (argv or sys.argv) else tuple(int(v) for v in a.patch_size.split(","))
            report = redundancy_report(a.source, a.redundancy, [float(t) for t in a.thresholds.split(",")], patch)
        except (FileNotFoundError, ValueError) as e:
            p.exit(2, f"sora-inspect: {e}\n")
        print(json.dumps(report, indent=1))
        return
    if a.mix:
        try:
            report = mix_report(a.mix, a.rows, a.seq_len, a.text_len, tuple(int(v) for v in a.patch_size.split(",")),
                                a.lookahead, a.max_per_row)
        except (FileNotFoundError, ValueError) as e:
            p.exit(2, f"sora-inspect: {e}\n")
        print(json.dumps(report, indent=1))
        return
    if not a.source:
        p.error("give a shard source, or --mix")
    m = load_manifest(a.source)
    urls = list_shards(a.source)
    print(f"{len(urls)} shards")
    if m:
        print(json.dumps({k: v for k, v in m.items() if k != "shards"}, indent=1))
        print(f"tokens: {sum(s['tokens'] for s in m['shards'])} in {m['samples']} samples")
    if not a.show:
        return
    import webdataset as wds

    codec = codec_from_manifest_name(m["codec"]["name"]) if m else None
    rows, shown = [], 0
    for raw in wds.tarfile_to_samples()([{"url": u} for u in urls]):
        try:
            clip = decode_clip(raw, m["codec"]["latent_channels"], m["text_encoder"]["width"], tuple(m["patch_size"]))
        except BadSample as e:
            print(f"{raw.get('__key__')}: BAD {e}")
            continue
        print(f"{clip.key}: latent {clip.latent.shape} text {clip.text.shape} | {clip.caption}")
        shown += 1
        if codec is not None and a.png:
            video = codec.decode(torch.from_numpy(clip.latent.astype(np.float32))[None])[0]
            frames = ((video.clamp(-1, 1).permute(1, 2, 3, 0) + 1) * 127.5).round().byte().numpy()
            rows.append(frames)
        if shown >= a.show:
            break
    if rows and a.png:
        from sora_train.inference.evaluate import contact_sheet

        contact_sheet(rows, a.png)
        print(f"wrote {a.png}")


if __name__ == "__main__":
    main()
