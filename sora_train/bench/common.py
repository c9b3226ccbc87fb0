"""What the benches share: presets from the Hydra config, synthetic packed rows, timing on a device."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from .. import CONF_DIR


def train_config(name: str, overrides: list[str] = ()):
    from hydra import compose, initialize_config_dir

    from ..config import register

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train", overrides=[f"model={name}", *overrides])


def load_preset(name: str, overrides: list[str] = ()) -> "DiTArgs":  # noqa: F821
    from ..config import model_args

    return model_args(train_config(name, overrides).model)


class SyntheticPackedLoader:
    """Stands in for the shard loader: the same packed rows (random latents and captions, a realistic mix of
    sample lengths from synthetic_packed_batch) again and again, built once, so the bench times the step."""

    def __init__(self, args, seq_len: int, rows: int, text_len: int = 64, seed: int = 0):
        from ..data import PackedBatch

        seg, tseg, _ = synthetic_packed_batch(args, seq_len, rows, (seq_len // 16, seq_len // 3), text_len, seed)
        g = torch.Generator().manual_seed(seed)
        pos = torch.zeros(rows, seq_len, 3, dtype=torch.long)
        grids = torch.zeros(rows, args.max_segments, 3, dtype=torch.long)
        for r in range(rows):  # each sample laid out as a 1 x 1 x n grid: positions and extents agree
            for j in range(1, int(seg[r].max()) + 1):
                idx = (seg[r] == j).nonzero().squeeze(1)
                pos[r, idx, 2] = torch.arange(len(idx))
                grids[r, j - 1] = torch.tensor([1, 1, len(idx)])
        self.batch = PackedBatch(
            tokens=torch.randn(rows, seq_len, args.patch_dim, generator=g), pos=pos, seg=seg,
            text=torch.randn(rows, tseg.shape[1], args.text_dim, generator=g), text_seg=tseg, grids=grids,
            keys=[[f"synthetic-{j}" for j in range(int(s.max()))] for s in seg])

    def __iter__(self):
        while True:
            yield self.batch


def synthetic_packed_batch(args, seq_len: int, rows: int, sample_tokens: tuple[int, int], text_len: int, seed=0):
    """Rows filled with whole samples of random size (a realistic mix of segment lengths)."""
    g = np.random.default_rng(seed)
    seg = torch.zeros(rows, seq_len, dtype=torch.long)
    tseg = torch.zeros(rows, args.max_segments * text_len // 4, dtype=torch.long)
    for r in range(rows):
        at, tat, j = 0, 0, 0
        while j < args.max_segments - 1:
            n = int(g.integers(*sample_tokens))
            if at + n > seq_len:
                n = seq_len - at  # fill the row: the packer reaches ~99% on real mixes
            seg[r, at : at + n] = j + 1
            L = min(int(g.integers(8, text_len)), tseg.shape[1] - tat)
            tseg[r, tat : tat + L] = j + 1
            at, tat, j = at + n, tat + L, j + 1
            if at >= seq_len or tat >= tseg.shape[1]:
                break
    i = torch.arange(seq_len)
    pos = torch.stack([i // 256, (i // 16) % 16, i % 16], -1)
    return seg, tseg, pos[None].expand(rows, -1, -1)


def timed(step, steps: int, warmup: int, device) -> float:
    """Median seconds of `step` over `steps` calls after `warmup` untimed ones."""
    times = []
    for i in range(warmup + steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def device_name(device) -> str:
    return torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads"


def release(device) -> None:
    import gc

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def kernel_name(backend, name: str, device, dtype, seg, head_dim: int) -> str:
    """Which kernel a backend runs here on these rows: varlen picks one by what is installed, by the
    samples' lengths and by the head dim; the others are their name."""
    if not hasattr(backend, "kernel_for"):
        return name
    return backend.kernel_for(device, dtype, backend.prepare(seg, seg), head_dim)
