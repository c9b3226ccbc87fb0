"""Activation checkpointing policies (`parallel.activation_checkpointing`), applied to a block from outside."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_module(module: nn.Module, context_fn: Callable | None = None) -> None:
    """Recompute the module in backward. Replaces only the instance's forward, so parameter names
    (and checkpoints) are the same with checkpointing on or off. Non-reentrant: works with ZeRO-3 hooks.
    context_fn: torch's selective checkpointing (which ops' outputs are kept rather than recomputed)."""
    inner = module.forward
    extra = {} if context_fn is None else {"context_fn": context_fn}
    module.forward = lambda *args: checkpoint(inner, *args, use_reentrant=False, **extra)


@functools.cache  # asked for every op of a block in forward and again in the recompute
def attention_kernel(op) -> bool:
    """An attention kernel's forward among aten and extension ops: SDPA's (cuDNN, flash, efficient, CPU flash),
    torch's varlen (`_flash_attention_forward`) and flash-attn's custom ops."""
    name = str(op)
    return ("attention" in name or "flash_attn" in name) and "backward" not in name


def keep_attention_outputs():
    """Selective checkpointing's contexts for one recomputation: attention kernels' outputs are saved, every other
    op is recomputed. At 64k tokens attention is ~54% of the 1B block's FLOPs (docs/performance.md): recomputing
    the rest costs under half of full checkpointing's extra forward, for a few [tokens, dim] tensors per block."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if attention_kernel(op) else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


# parallel.activation_checkpointing: none | selective (each block's MLP recomputed) | attention (each block
# recomputed but its attention kernels, whose outputs are kept) | full (each block recomputed)
AC_POLICIES = ("none", "selective", "attention", "full")
ATTENTION_AC_COMPILED = ("parallel.activation_checkpointing=attention with parallel.compile: selective checkpointing "
                         "chooses among individual ops, which a compiled block hides (torch: 'not found in storage'); "
                         "use activation_checkpointing=full or selective with compile")
