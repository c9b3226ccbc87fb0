"""The DeepSpeed config, generated from ours (never a hand-kept JSON)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ParallelConfig:
    sp: int = 1  # sequence-parallel degree: ulysses x ring
    ring: int = 1  # of which context-parallel (keys and values all-gathered); sp / ring is Ulysses (splits heads)
    zero_stage: int = 3
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    # none | selective (each block's MLP recomputed: the widest activations, the MLP's hidden ones, dropped) |
    # elementwise (each block's norms, modulation, activations and RoPE recomputed; GEMM and attention outputs kept) |
    # attention (each block recomputed but its attention kernels, whose outputs are kept) | full (each block
    # recomputed in backward)
    activation_checkpointing: str = "none"
    checkpoint_blocks: int = -1  # the policy applies to this many blocks from the first (-1: all); the rest keep all
    compile: bool = False  # torch.compile each block (after activation checkpointing, before the engine)
    # torch.compile's backend: inductor (generated kernels: the speed) | aot_eager (the same graphs, forward and
    # backward, run by eager kernels: tells a fault of inductor's code from one of the traced graph) | any other
    # registered one
    compile_backend: str = "inductor"
    # none | tensorwise | rowwise: the blocks' token-wide linear layers in float8 (torchao; Hopper and later;
    # parallel/float8.py says which layers). tensorwise is the faster, rowwise the closer to bf16.
    float8: str = "none"
    # ZeRO-3 gathers each block's parameters at once (block) or each layer's (module, DeepSpeed's default): a
    # block's bf16 weights are ~100 MB for the 1B preset, ~1.7 GB for the 30B
    zero3_gather: str = "block"
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000  # (with zero3_gather=block both grow to fit blocks: parallelize)
    timeout_s: float = 600.0  # collective timeout: a dead rank fails the job instead of hanging it


def use_bf16(precision: str, cuda: bool) -> bool:
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"parallel.precision={precision!r}: use auto, bf16 or fp32")
    return precision == "bf16" or (precision == "auto" and cuda)


def deepspeed_config(p: ParallelConfig, micro_rows: int, grad_accum: int, dp: int, grad_clip: float,
                     bf16: bool, optimizer: dict | None = None) -> dict:
    """optimizer: a DeepSpeed "optimizer" section (DeepSpeed builds it), or None for a client optimizer."""
    muon = optimizer is not None and optimizer["type"] == "Muon"
    zero = {"stage": p.zero_stage, "overlap_comm": p.overlap_comm, "contiguous_gradients": p.contiguous_gradients,
            "reduce_bucket_size": p.reduce_bucket_size, "allgather_bucket_size": p.allgather_bucket_size}
    if p.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=p.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=p.stage3_param_persistence_threshold,
                    stage3_max_live_parameters=p.stage3_max_live_parameters,
                    # Otherwise zero.Init replaces torch.nn.functional.linear for the whole process, for good,
                    # with an autograd.Function whose backward reads each weight's ds_id: torch 2.11's dynamo
                    # guards on that integer and recompiled each compiled block until its limit of 8, the
                    # blocks after it eager (the 1B preset on an H200: 49 graphs, 27 breaks). The function exists for
                    # autocast, which nothing here uses; ZeRO-3's module hooks gather weights for backward anyway.
                    memory_efficient_linear=False,
                    # reduce_scatter averages gradients over SP ranks as well (measured: half the SP=1
                    # norm); the all-reduce path sums over SP and divides by dp, which is what we need.
                    # Muon orthogonalises whole gradient matrices, which DeepSpeed refuses to do after a
                    # reduce-scatter; its all-reduce path is the one it supports.
                    reduce_scatter=p.sp == 1 and not muon)
    return {
        "train_micro_batch_size_per_gpu": micro_rows,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_rows * grad_accum * dp,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bf16},
        "zero_optimization": zero,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "Warn"},
        **({"optimizer": optimizer} if optimizer else {}),
    }
