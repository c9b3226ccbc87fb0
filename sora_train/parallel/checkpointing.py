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
    torch's varlen custom op (`torch_attn._varlen_attn`: a dispatch mode sees it whole, not the flash kernel
    inside) and flash-attn's custom ops (`flash_attn._flash_attn_varlen_forward`)."""
    name = str(op)
    return ("attention" in name or "attn" in name) and "backward" not in name


@functools.cache
def matrix_product(op) -> bool:
    """The linear layers' GEMMs (bf16 and torchao's float8). Not bmm: on CUDA the per-sample modulation reaches
    its tokens by a one-hot bmm (models/dit.py: to_tokens) whose [tokens, 6 dim] output is cheap to recompute and
    six tensors wide to keep."""
    return str(op).split(".")[1] in ("mm", "addmm", "_scaled_mm")


def keep_outputs_of(keep: Callable) -> Callable:
    """torch's selective checkpointing (a context_fn for checkpoint_module): the outputs of ops for which
    keep(op) holds are saved in forward, every other op is recomputed in backward."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if keep(op) else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


# attention: at 64k tokens attention is ~54% of the 1B block's FLOPs (docs/performance.md): recomputing the rest
# costs under half of full checkpointing's extra forward, for a few [tokens, dim] tensors per block. (SDPA's math
# fallback, which CUDA may take for head dims that are not multiples of 8, is matmuls and a softmax, not a kernel
# this policy can see: recomputed. Every preset's head dim is a multiple of 8.)
keep_attention_outputs = keep_outputs_of(attention_kernel)
# elementwise: the GEMMs and attention kernels run once; only norms, modulation, activations, RoPE and casts are
# recomputed, for ~13 [tokens, dim] tensors per block (35 without checkpointing).
keep_products = keep_outputs_of(lambda op: attention_kernel(op) or matrix_product(op))

# parallel.activation_checkpointing: none | selective (each block's MLP recomputed) | elementwise (each block's
# elementwise work recomputed; GEMM and attention outputs kept) | attention (each block recomputed but its
# attention kernels, whose outputs are kept) | full (each block recomputed)
AC_POLICIES = ("none", "selective", "elementwise", "attention", "full")
OP_POLICIES = ("elementwise", "attention")  # torch's selective checkpointing, op by op: eager blocks only
ATTENTION_AC_COMPILED = ("parallel.activation_checkpointing=attention or elementwise with parallel.compile: selective "
                         "checkpointing chooses among individual ops, which a compiled block hides (torch: 'not found "
                         "in storage'); use activation_checkpointing=full or selective with compile (and "
                         "parallel.checkpoint_blocks to checkpoint fewer blocks)")
