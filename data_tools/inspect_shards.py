"""sora-inspect: what is in a shard set: manifest summary, and decoded samples as a PNG to look at.

  sora-inspect data/shards --show 8 --png /tmp/samples.png
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from sora_train.codecs import codec_from_manifest_name
from sora_train.data import list_shards, load_manifest
from sora_train.data.decode import BadSample, decode_clip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("source", help="shard directory, brace pattern or pipe: command")
    p.add_argument("--show", type=int, default=0, help="decode this many samples")
    p.add_argument("--png", default=None, help="write the decoded samples' frames to this PNG")
    a = p.parse_args(argv)
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
