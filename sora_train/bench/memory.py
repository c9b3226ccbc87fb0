"""sora-bench activations: what a block keeps for backward under each checkpointing policy, measured."""

from __future__ import annotations

import torch

from .common import load_preset, synthetic_packed_batch


def kept_per_block(name: str, seq_len: int, policy: str, compiled: bool, overrides: list[str] = ()) -> float:
    """[tokens, dim] tensors one block keeps for backward (bf16 units; counted through saved-tensor hooks, each
    storage once, weights not): depth 4 less depth 2, halved, on one packed row of seq_len tokens on this device.
    Eager op policies (elementwise, attention) keep theirs in torch's selective-checkpointing storage, which the
    hooks do not see: measure those compiled."""
    import dataclasses

    from ..models import DiT
    from ..parallel import OP_POLICIES, ParallelDims, parallelize_dit

    if policy in OP_POLICIES and not compiled:
        raise ValueError(f"--ac {policy} keeps its tensors where saved-tensor hooks cannot see them: add --compile")
    base = load_preset(name, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    seg, tseg, pos = synthetic_packed_batch(base, seq_len, 1, (seq_len // 4, seq_len // 2), 32)
    kept = []
    for depth in (2, 4):
        torch.manual_seed(0)
        args = dataclasses.replace(base, depth=depth)
        model = parallelize_dit(DiT(args).to(device, torch.bfloat16).train(), ParallelDims(1, 0, 0, 1), policy,
                                compile_blocks=compiled)
        x = torch.randn(1, seq_len, args.patch_dim, device=device, dtype=torch.bfloat16)
        t = torch.rand(1, args.max_segments, device=device, dtype=torch.bfloat16)
        text = torch.randn(1, tseg.shape[1], args.text_dim, device=device, dtype=torch.bfloat16)
        inputs = (x, t, pos.to(device), seg.to(device), text, tseg.to(device))
        forward = lambda: model(*inputs, extent=pos.to(device) + 1)  # noqa: E731
        kept_for_backward(model, forward)  # compiled: the compile
        kept.append(kept_for_backward(model, forward))
    return (kept[1] - kept[0]) / 2 / (seq_len * base.dim * 2)


def kept_for_backward(model, forward) -> int:
    """Bytes that forward() keeps for backward (each storage once, the model's weights not), then the backward."""
    storages = {}

    def pack(x):
        storages[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = forward()
    out.float().pow(2).mean().backward()
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in storages.items() if ptr not in weights)


def bench_activations(models: list[str], seq_len: int, policies: list[str], compiled: bool,
                      overrides: list[str] = ()) -> list[dict]:
    return [{"model": name, "seq_len": seq_len, "activation_checkpointing": policy, "compile": compiled,
             "kept_per_block": round(kept_per_block(name, seq_len, policy, compiled, overrides), 2)}
            for name in models for policy in policies]
