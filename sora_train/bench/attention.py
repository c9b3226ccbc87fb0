"""sora-bench attention: each attention backend against a float32 reference on packed rows, and its speed."""

from __future__ import annotations

import json
import statistics
import time

import torch

from .common import kernel_name, sync, synthetic_packed_batch


def attention_numerics(seq_len: int, heads: int, head_dim: int, text_len: int, backends: list[str], steps: int,
                       device, seed: int = 0, check: bool = True, segment_tokens: int | None = None) -> list[dict]:
    """Each backend against the naive float32 reference on the same packed row, in the dtype training
    uses on this device (bf16 on CUDA): relative error of the output and of dq, dk, dv on real tokens,
    for self-attention (segments vs segments) and cross-attention (segments vs packed text); plus the
    median forward+backward time of self-attention and its TFLOP/s counting real work only (sum n_i^2)."""
    from ..models import DiTArgs, build_attention

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    args = DiTArgs(max_segments=64)
    sizes = (segment_tokens // 2, 3 * segment_tokens // 2) if segment_tokens else (seq_len // 16, seq_len // 3)
    seg, tseg, _ = synthetic_packed_batch(args, seq_len, 1, sizes, text_len, seed)
    seg, tseg = seg.to(device), tseg.to(device)
    g = torch.Generator(device=device).manual_seed(seed)
    real = seg > 0
    n = torch.bincount(seg[real])[1:].double()
    work = 4 * float((n**2).sum()) * heads * head_dim * 3.5  # fwd 4*n^2*d per head; backward 2.5x forward
    cot = torch.randn(1, seq_len, heads, head_dim, device=device, generator=g, dtype=dtype) * real[..., None, None]
    results = []
    for name in backends:
        res = {"attention": name, "seq_len": seq_len, "segments": int(n.numel()), "heads": heads,
               "head_dim": head_dim, "dtype": str(dtype)}
        try:
            be = build_attention(name, max_segments=args.max_segments)
            res["kernel"] = kernel_name(be, name, device, dtype, seg, head_dim)
            for kind, sk in (("self", seg), ("cross", tseg)) if check else ():
                q, k, v = (torch.randn(1, s, heads, head_dim, device=device, generator=g, dtype=dtype)
                           for s in (seq_len, sk.shape[1], sk.shape[1]))
                outs = []
                for impl, dt in ((be, dtype), (build_attention("naive"), torch.float32)):
                    qq, kk, vv = (x.detach().to(dt).requires_grad_() for x in (q, k, v))
                    out = impl(qq, kk, vv, mask=impl.prepare(seg, sk))
                    out.backward(cot.to(dt))
                    outs.append([o.detach().float() for o in (out[real], qq.grad, kk.grad, vv.grad)])
                    res.setdefault(f"{kind}_finite", bool(torch.isfinite(out).all()))  # padding rows too
                for label, a, b in zip(("out", "dq", "dk", "dv"), *outs):
                    res[f"{kind}_{label}_rel_err"] = float((a - b).norm() / b.norm())
            q, k, v = (torch.randn(1, seq_len, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
                       for _ in range(3))
            times = []
            for i in range(2 + steps):
                sync(device)
                t0 = time.perf_counter()
                be(q, k, v, mask=be.prepare(seg, seg)).backward(cot)
                sync(device)
                if i >= 2:
                    times.append(time.perf_counter() - t0)
            res["fwd_bwd_ms"] = statistics.median(times) * 1e3
            res["real_tflops"] = work / statistics.median(times) / 1e12
        except (RuntimeError, NotImplementedError, ValueError) as e:  # OOM, backend unavailable here
            res["error"] = str(e)[:200]
        print(json.dumps(res), flush=True)
        results.append(res)
    return results
