"""World = data-parallel x sequence-parallel, and sequence-parallel = Ulysses x ring (USP); the groups, and the
mpu object DeepSpeed reads them from."""

from __future__ import annotations

import atexit
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from . import env as dist_env


class ParallelConfigError(ValueError):
    """A parallelism setting that cannot work; raised before any process group exists."""


def check_degrees(world_size: int, sp: int, heads: int, seq_len: int, ring: int = 1) -> None:
    """sp = ulysses x ring: Ulysses splits heads (its degree must divide them), the ring splits nothing but the
    sequence, so sp can exceed the head count."""
    problems = []
    if sp < 1 or world_size % sp:
        problems.append(f"parallel.sp={sp} does not divide the world size {world_size}")
    if ring < 1 or (sp >= 1 and sp % ring):
        problems.append(f"parallel.ring={ring} does not divide parallel.sp={sp} (sp = ulysses x ring)")
    elif sp >= 1 and heads % (sp // ring):
        ulysses = f"parallel.sp={sp}" if ring == 1 else f"the Ulysses degree parallel.sp/parallel.ring={sp // ring}"
        problems.append(f"{ulysses} does not divide model.heads={heads} (Ulysses splits heads; parallel.ring "
                        f"splits the sequence further)")
    if sp >= 1 and seq_len % sp:
        problems.append(f"data.seq_len={seq_len} is not divisible by parallel.sp={sp}")
    if problems:
        raise ParallelConfigError("; ".join(problems))


@dataclass
class ParallelDims:
    """SP groups are consecutive ranks. Inside one, Ulysses groups are consecutive ranks again (kept inside a
    node, where all-to-all is cheap) and ring groups stride across them (between nodes: the ring moves only
    keys and values). Sequence chunk i of a row lives on SP rank i = ring_rank * ulysses + ulysses_rank, so
    Ulysses' all-to-all leaves each ring rank one contiguous block of the row."""

    world_size: int
    rank: int
    local_rank: int
    sp: int
    ring: int = 1
    sp_group: object = field(default=None, repr=False)
    ulysses_group: object = field(default=None, repr=False)
    ring_group: object = field(default=None, repr=False)
    dp_group: object = field(default=None, repr=False)
    self_group: object = field(default=None, repr=False)  # this rank alone: DeepSpeed's "model-parallel" group

    @property
    def dp(self) -> int:
        return self.world_size // self.sp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.sp

    @property
    def sp_rank(self) -> int:
        return self.rank % self.sp

    @property
    def ulysses(self) -> int:
        return self.sp // self.ring

    @property
    def ulysses_rank(self) -> int:
        return self.sp_rank % self.ulysses

    @property
    def ring_rank(self) -> int:
        return self.sp_rank // self.ulysses

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def build_groups(self) -> None:
        """Every rank creates every group, in the same order (torch.distributed requires it)."""
        for d in range(self.dp):
            g = dist.new_group(list(range(d * self.sp, (d + 1) * self.sp)))
            if d == self.dp_rank:
                self.sp_group = g
            if self.ring == 1 or self.ulysses == 1:  # one kind only: its group is the SP group
                continue
            for j in range(self.ring):  # Ulysses: consecutive ranks of this SP group
                start = d * self.sp + j * self.ulysses
                g = dist.new_group(list(range(start, start + self.ulysses)))
                if d == self.dp_rank and j == self.ring_rank:
                    self.ulysses_group = g
            for u in range(self.ulysses):  # ring: one rank of each Ulysses group, in sequence order
                g = dist.new_group(list(range(d * self.sp + u, (d + 1) * self.sp, self.ulysses)))
                if d == self.dp_rank and u == self.ulysses_rank:
                    self.ring_group = g
        if self.ring == 1:
            self.ulysses_group = self.sp_group
        elif self.ulysses == 1:
            self.ring_group = self.sp_group
        for s in range(self.sp):
            g = dist.new_group(list(range(s, self.world_size, self.sp)))
            if s == self.sp_rank:
                self.dp_group = g
        # Only the member takes part in creating its own one-rank group: no world-sized loop of new_group calls.
        self.self_group = dist.new_group([self.rank], use_local_synchronization=True)


class SequenceParallelMPU:
    """The sequence-parallel mpu protocol of DeepSpeed (as deepspeed.runtime.sequence_parallel.
    parallel_state_sp): ZeRO partitions parameters and reduces gradients over the whole world (the
    "sequence data parallel" group), summing over SP ranks and averaging over DP.

    Deliberately *no* get_data_parallel_group(): given one, ZeRO-3 partitions and reduces over that
    group only, so gradients are not summed across SP ranks (measured: 2x one SP rank's local
    gradient at SP=2). DeepSpeed treats an mpu with `initialize_sequence_parallel` as this kind."""

    initialize_sequence_parallel = None  # DeepSpeed's marker for an SP-only mpu (utils/groups.py)

    def __init__(self, dims: ParallelDims):
        self.d = dims

    def get_sequence_parallel_group(self): return self.d.sp_group
    def get_sequence_parallel_world_size(self): return self.d.sp
    def get_sequence_parallel_rank(self): return self.d.sp_rank
    def get_sequence_data_parallel_group(self): return dist.group.WORLD
    def get_sequence_data_parallel_world_size(self): return self.d.world_size
    def get_sequence_data_parallel_rank(self): return self.d.rank
    # Checkpoint metadata asks for these degrees; there is no tensor or pipeline parallelism.
    def get_tensor_model_parallel_world_size(self): return 1
    def get_tensor_model_parallel_rank(self): return 0
    def get_pipeline_model_parallel_world_size(self): return 1
    def get_pipeline_model_parallel_rank(self): return 0
    def get_model_parallel_world_size(self): return 1
    def get_model_parallel_rank(self): return 0
    # Gradient clipping at ZeRO stage 0 sums the norm over this group: every rank holds whole gradients (reduced
    # over the world), so the group is the rank itself. Without it, any sp>1 run with clipping crashed at step 1.
    def get_model_parallel_group(self): return self.d.self_group


def destroy_at_exit() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(sp: int, timeout_s: float = 600.0, ring: int = 1) -> ParallelDims:
    """Joins (or, alone, creates) the process group and builds DP x SP (Ulysses x ring) groups."""
    import deepspeed

    e = dist_env.detect()
    dist_env.export(e)
    if e.world_size % sp:
        raise ParallelConfigError(f"parallel.sp={sp} does not divide the world size {e.world_size}")
    if torch.cuda.is_available():
        torch.cuda.set_device(e.local_rank)
    if not dist.is_initialized():
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")  # a dead peer fails the job, no hang
        if not torch.cuda.is_available():
            # On CPU DeepSpeed JIT-builds a shared-memory all-reduce (C++) for the ranks of a node (45 s on 2 cores
            # the first time on a machine, measured) and maps every rank's segment at start-up. It serves only
            # DeepSpeed-inference's inference_all_reduce (deepspeed/comm/torch.py); training's collectives go
            # through torch.distributed (gloo). Skipped: one C++ start-up step fewer for every CPU run.
            # DeepSpeed keeps this table per process, edits included (deepspeed/ops/__init__.py).
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                                   timeout=datetime.timedelta(seconds=timeout_s), verbose=False)
        # Left to interpreter exit, a communicator's threads sometimes aborted a rank there ("terminate called
        # without an active exception", 2 runs in 9 of a 2-rank probe): every process that made the group ends it.
        atexit.register(destroy_at_exit)
    if ring < 1 or sp % ring:
        raise ParallelConfigError(f"parallel.ring={ring} does not divide parallel.sp={sp} (sp = ulysses x ring)")
    dims = ParallelDims(e.world_size, e.rank, e.local_rank, sp, ring)
    dims.build_groups()
    return dims
