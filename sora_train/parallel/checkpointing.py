"""Activation checkpointing policies (`parallel.activation_checkpointing`), applied to a block from outside."""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn
from torch.utils.checkpoint import checkpoint


def checkpoint_module(module: nn.Module, keep: str | None = None) -> None:
    """Recompute the module in backward. Replaces only the instance's forward, so parameter names
    (and checkpoints) are the same with checkpointing on or off. Non-reentrant: works with ZeRO-3 hooks.
    keep: an op policy (OP_POLICIES) whose ops' outputs torch's selective checkpointing keeps; None: keep none."""
    inner = module.forward

    def forward(*args):
        # The policy by name, read here: dynamo guards on the name, so a block compiled under one policy is not
        # reused under another in the same process (it does not guard on a context_fn handed to checkpoint,
        # measured: `attention` after `elementwise` ran elementwise's graph).
        if keep is None:
            return checkpoint(inner, *args, use_reentrant=False)
        return checkpoint(inner, *args, use_reentrant=False, context_fn=KEEP_OUTPUTS[keep])

    module.forward = forward


@functools.cache  # asked for every op of a block in forward and again in the recompute
def attention_kernel(op) -> bool:
    """An attention kernel's forward among aten and extension ops: SDPA's (cuDNN, flash, efficient, CPU flash),
    torch's varlen custom op (`torch_attn._varlen_attn`: a dispatch mode sees it whole, not the flash kernel
    inside), this project's (`sora_train.packed_attention`, compiled blocks' per-sequence path) and flash-attn's
    custom ops (`flash_attn._flash_attn_varlen_forward`)."""
    name = str(op)
    return ("attention" in name or "attn" in name) and "backward" not in name


@functools.cache
def matrix_product(op) -> bool:
    """The linear layers' GEMMs (bf16 and torchao's float8), whose outputs are worth keeping. Not bmm (the one-hot
    GEMM of to_tokens' CUDA backward, models/dit.py)."""
    return str(op).split(".")[1] in ("mm", "addmm", "_scaled_mm")


def keep_outputs_of(keep: Callable) -> Callable:
    """torch's selective checkpointing (a context_fn for checkpoint_module): the outputs of ops for which
    keep(op) holds are saved in forward, every other op is recomputed in backward."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if keep(op) else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


# Each op policy's ops whose outputs are kept (the rest is recomputed).
# attention: at 64k tokens attention is ~54% of the 1B block's FLOPs (docs/performance.md): recomputing the rest
# costs under half of full checkpointing's extra forward, for a few [tokens, dim] tensors per block. (SDPA's math
# fallback, which CUDA may take for head dims that are not multiples of 8, is matmuls and a softmax, not a kernel
# this policy can see: recomputed. Every preset's head dim is a multiple of 8.)
# elementwise: the GEMMs and attention kernels run once; only norms, modulation, activations, RoPE and casts are
# recomputed, for ~13 [tokens, dim] tensors per block (35 without checkpointing).
KEEP_OUTPUTS = {"attention": keep_outputs_of(attention_kernel),
                "elementwise": keep_outputs_of(lambda op: attention_kernel(op) or matrix_product(op))}

# parallel.activation_checkpointing: none | selective (each block's MLP recomputed) | elementwise (each block's
# elementwise work recomputed; GEMM and attention outputs kept) | attention (each block recomputed but its
# attention kernels, whose outputs are kept) | full (each block recomputed)
AC_POLICIES = ("none", "selective", "elementwise", "attention", "full")
OP_POLICIES = tuple(KEEP_OUTPUTS)  # torch's selective checkpointing, op by op
