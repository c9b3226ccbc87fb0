"""sora-bench plan: sora_train/plan.py's layouts for presets, row budgets and cluster sizes."""

from __future__ import annotations

from .common import load_preset


def bench_plan(models: list[str], seq_lens: list[int], gpus: list[int], top: int, sample_tokens: int | None,
               max_comm: float, ac: str = "full", checkpoint_blocks: int = -1, compiled: bool = False,
               **cluster) -> list[dict]:
    """sora_train/plan.py for each preset, row budget and cluster size: the `top` fastest layouts (those that fit
    first), then the one needing the least memory among those that fit with communication at most `max_comm` of
    the step (marked "leanest"), when it is not among them."""
    from ..plan import Cluster, plan

    out = []
    for name in models:
        args = load_preset(name)
        for s in seq_lens:
            for g in gpus:
                rows = [{**r, "activation_checkpointing": ac, "checkpoint_blocks": checkpoint_blocks,
                         "compile": compiled}
                        for r in plan(args, s, Cluster(gpus=g, **cluster), sample_tokens, ac=ac,
                                      checkpoint_blocks=checkpoint_blocks, compiled=compiled)]
                lean = [r for r in rows if r["fits"] and r["comm_share"] <= max_comm]
                leanest = min(lean, key=lambda r: r["memory_gib"]) if lean else None
                out += [{"model": name, "seq_len": s, "gpus": g, **r, "leanest": r is leanest} for r in rows[:top]]
                if leanest is not None and leanest not in rows[:top]:
                    out.append({"model": name, "seq_len": s, "gpus": g, **leanest, "leanest": True})
    return out
