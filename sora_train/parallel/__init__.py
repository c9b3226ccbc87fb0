"""Parallelism applied to a plain DiT from outside, in one ordered function: sequence parallelism (the ring, then
Ulysses around it) -> float8 linear layers (when asked) -> activation checkpointing -> compile (when asked) -> the
DeepSpeed engine (ZeRO; at stage 3 one gather per block). Under ZeRO-3 the model is built inside
`deepspeed.zero.Init`, so no rank ever holds the whole model on its host."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .checkpointing import AC_POLICIES, KEEP_OUTPUTS, OP_POLICIES, attention_kernel, checkpoint_module, matrix_product
from .context import ContextParallelAttention
from .deepspeed_config import ParallelConfig, deepspeed_config, use_bf16
from .dims import ParallelConfigError, ParallelDims, SequenceParallelMPU, check_degrees, init_distributed
from .float8 import FLOAT8_RECIPES, convert_to_float8, float8_available
from .ulysses import UlyssesAttention, gather_sequence, shard_sequence


def parallelize_dit(model: nn.Module, dims: ParallelDims, activation_checkpointing: str = "none",
                    compile_blocks: bool = False, float8: str = "none", checkpoint_blocks: int = -1,
                    compile_backend: str = "inductor") -> nn.Module:
    """checkpoint_blocks: how many blocks, from the first, the checkpointing policy applies to (-1: all); the rest
    keep every activation. Memory between the policies' steps: on an H200 the 1B preset at 64k tokens used 36.5 GiB
    with every block checkpointed and ran out of 141 GiB with none (docs/performance.md)."""
    # USP (sp = ulysses x ring): Ulysses' all-to-all turns a rank's chunk into its ring rank's block of the row
    # (fewer heads), the ring gathers keys and values across blocks, the backend attends; and back.
    if dims.ring > 1:
        model.attention = ContextParallelAttention(model.attention, dims.ring_group)
    if dims.ulysses > 1:
        model.attention = UlyssesAttention(model.attention, dims.ulysses_group)
    if activation_checkpointing not in AC_POLICIES:
        raise ValueError(f"parallel.activation_checkpointing={activation_checkpointing!r}: use {', '.join(AC_POLICIES)}")
    if not -1 <= checkpoint_blocks <= len(model.blocks):
        raise ValueError(f"parallel.checkpoint_blocks={checkpoint_blocks}: use -1 (all) or 0-{len(model.blocks)}")
    convert_to_float8(model, float8)  # before checkpointing and compile: both then see the float8 layers
    checkpointed = len(model.blocks) if checkpoint_blocks == -1 else checkpoint_blocks
    for i, block in enumerate(model.blocks):
        if i < checkpointed:
            if activation_checkpointing == "full":
                checkpoint_module(block)
            elif activation_checkpointing in OP_POLICIES:
                checkpoint_module(block, keep=activation_checkpointing)
            elif activation_checkpointing == "selective":
                checkpoint_module(block.mlp)
        if compile_blocks:
            # The block's forward (checkpointed or not), not the module's call: ZeRO-3's hooks on the block stay
            # outside the graph. The checkpoint inside it: the compiler then sees the block whole, attention
            # included (one op: models/packed_attention.py), fuses the recompute and keeps what the op policies say.
            block.forward = torch.compile(block.forward, backend=compile_backend)
    return model


def full_rows(module: nn.Module, dims: ParallelDims, dtype: torch.dtype) -> Callable[..., torch.Tensor]:
    """The model on full packed rows, for validation and sampling: each SP rank runs its shard of the rows and the
    output is gathered back, so callers see whole rows (fp32) whatever the SP degree."""

    def forward(x, t, pos, seg, text, text_seg, extent, given=None):
        shard = lambda v: shard_sequence(v, dims.sp_rank, dims.sp)  # noqa: E731
        kw = {} if given is None else {"given": shard(given)}  # conditioning frames (diffusion/conditioning.py)
        out = module(shard(x).to(dtype), t.to(dtype), shard(pos), shard(seg), text.to(dtype), text_seg,
                     extent=shard(extent), **kw)
        return gather_sequence(out.float(), dims.sp_group) if dims.sp > 1 else out.float()

    return forward


def gather_per_block(model: nn.Module, zero: dict) -> None:
    """ZeRO-3 gathers each block's parameters at once (DeepSpeed's leaf modules): it hooks the block, none of its
    layers. Fewer hooks, and compiled blocks hold no hook (each one, called inside the graph, broke it and
    recompiled per layer type to dynamo's limit: 38 graphs and 51 breaks for the tiny model vs 7 and 6, measured).
    The prefetch bucket and the live-parameter limit grow to a block and two (the one computing, the next one
    arriving) where they are smaller, so the next block's gather overlaps this one's compute, as `sora-bench plan`
    assumes: at the 30B preset a block is 831M parameters against DeepSpeed's 50M bucket."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, [type(model.blocks[0])])
    block = sum(getattr(q, "ds_numel", q.numel()) for q in model.blocks[0].parameters())
    zero["stage3_prefetch_bucket_size"] = max(zero["stage3_prefetch_bucket_size"], block)
    zero["stage3_max_live_parameters"] = max(zero["stage3_max_live_parameters"], 2 * block)


def build_partitioned(build_model: Callable[[], nn.Module], ds_config: dict, mpu=None) -> nn.Module:
    """Builds the model; at ZeRO stage 3 inside `deepspeed.zero.Init`, partitioned over the whole world as the
    engine's ZeRO-3 partitions it (the SP mpu's sequence-data-parallel group). Each module initialises its own
    parameters (models/layers.py: Linear) and zero.Init partitions them as that module's __init__ returns: a
    rank's host holds its shard plus one module at a time, never the whole model."""
    import deepspeed
    import torch._dynamo  # noqa: F401  first imported inside zero.Init (its patched Tensor.__new__), it raises

    with deepspeed.zero.Init(config_dict_or_path=ds_config, mpu=mpu,
                             enabled=ds_config["zero_optimization"]["stage"] == 3):
        return build_model()


def parallelize(build_model: Callable[[], nn.Module], p: ParallelConfig, o, micro_rows: int, dims: ParallelDims,
                device: torch.device, load_universal: bool = False,
                init_weights: Callable[[nn.Module], None] | None = None):
    """Builds the model and wraps it, in order, into a DeepSpeed engine. `o` is the optim config (the
    optimizer, its schedule and clipping are part of the engine); micro_rows the packed rows per micro-batch.
    init_weights (a stage's parent weights) runs on the built model before the optimizer takes its masters."""
    import deepspeed

    from ..engine.optim import build_optimizer, deepspeed_optimizer_section

    cuda = device.type == "cuda"
    ds_config = deepspeed_config(p, micro_rows, o.grad_accum, dims.dp, o.grad_clip, use_bf16(p.precision, cuda),
                                 deepspeed_optimizer_section(o, cuda))
    ds_config["checkpoint"]["load_universal"] = load_universal
    mpu = SequenceParallelMPU(dims) if dims.sp > 1 else None
    model = parallelize_dit(build_partitioned(build_model, ds_config, mpu), dims, p.activation_checkpointing,
                            p.compile, p.float8, p.checkpoint_blocks, p.compile_backend)
    if p.zero_stage == 3 and p.zero3_gather == "block":
        gather_per_block(model, ds_config["zero_optimization"])
    if init_weights is not None:
        init_weights(model)
    optimizer, schedule = build_optimizer(o, model, cuda)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=schedule, config=ds_config,
                                      mpu=mpu)
    return engine


__all__ = ["ParallelConfig", "deepspeed_config", "use_bf16", "ParallelConfigError", "ParallelDims",
           "SequenceParallelMPU", "check_degrees", "init_distributed", "UlyssesAttention", "ContextParallelAttention",
           "gather_sequence", "shard_sequence", "full_rows", "AC_POLICIES", "OP_POLICIES",
           "attention_kernel", "matrix_product", "KEEP_OUTPUTS",
           "checkpoint_module", "FLOAT8_RECIPES", "convert_to_float8", "float8_available",
           "parallelize_dit", "parallelize", "build_partitioned", "gather_per_block"]
