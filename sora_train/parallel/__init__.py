"""Parallelism applied to a plain DiT from outside, in one ordered function (Ulysses -> checkpointing);
ZeRO-3 comes last, from deepspeed.initialize."""

from __future__ import annotations

from torch import nn
from torch.utils.checkpoint import checkpoint

from .dims import ParallelConfigError, ParallelDims, SequenceParallelMPU, check_degrees, init_distributed
from .ulysses import UlyssesAttention, gather_sequence, shard_sequence


def checkpoint_module(module: nn.Module) -> None:
    """Recompute the module in backward. Replaces only the instance's forward, so parameter names
    (and checkpoints) are the same with checkpointing on or off. Non-reentrant: works with ZeRO-3 hooks."""
    inner = module.forward
    module.forward = lambda *args: checkpoint(inner, *args, use_reentrant=False)


def parallelize_dit(model: nn.Module, dims: ParallelDims, activation_checkpointing: bool) -> nn.Module:
    if dims.sp > 1:
        model.attention = UlyssesAttention(model.attention, dims.sp_group)
    if activation_checkpointing:
        for block in model.blocks:
            checkpoint_module(block)
    return model


__all__ = ["ParallelConfigError", "ParallelDims", "SequenceParallelMPU", "check_degrees", "init_distributed",
           "UlyssesAttention", "gather_sequence", "shard_sequence", "parallelize_dit", "checkpoint_module"]
