"""Where a training step's time goes: its phases on the device's own clock, and its kernels by kind.

`StepPhases` times forward (with the loss), backward, the optimizer step and the EMA update of `Trainer.train_step`
from outside the trainer (which itself logs data wait, forward with backward, and the optimizer step): for the
bench's run only, each of those methods is wrapped on the instance to read the device's clock (`DeviceClock`: CUDA
events) before and after it. The events cost no synchronisation, so the phases add up to the step the bench
times; what the step spends outside them (the batch, noise, the agreement collectives, launch gaps) is `other`.
Events rather than the profiler: the autograd engine runs backward on threads of its own, whose kernels a profiler
range opened on the main thread does not own.

`kernel_kinds` sums a profiled step's device time (CPU time on a CPU) by kind of kernel, from their names: the
profile's top-op table lists kernels one by one, this says how much went to attention, GEMMs, fused (compiled)
code, norms, copies, the optimizer.
"""

from __future__ import annotations

import re
import statistics
from collections import defaultdict

import torch

from ..engine.metrics import DeviceClock

# (phase, object attribute of the trainer or None for the trainer itself, method)
PHASES = (("forward", None, "loss"), ("backward", "engine", "backward"), ("optimizer", None, "engine_step"),
          ("ema", "ema", "update"))


class StepPhases:
    """Per step: seconds of each phase (summed over micro-batches) and of the whole step; `summary()` gives the
    medians of the last `steps` steps. Use as a context manager around the timed steps (the wrappers come off on
    exit), with `step()` wrapping each train_step call."""

    def __init__(self, trainer, device: torch.device):
        self.trainer, self.clock = trainer, DeviceClock(device)
        self.current: list[tuple[str, object, object]] = []
        self.steps: list[tuple[object, object, list]] = []

    def _wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = self.clock.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.current.append((name, start, self.clock.now()))
        return timed

    def __enter__(self) -> StepPhases:
        self.wrapped = []
        for name, owner, method in PHASES:
            obj = self.trainer if owner is None else getattr(self.trainer, owner)
            if obj is not None:  # no EMA: no phase
                setattr(obj, method, self._wrap(name, getattr(obj, method)))
                self.wrapped.append((obj, method))
        return self

    def __exit__(self, *exc) -> None:
        for obj, method in self.wrapped:
            delattr(obj, method)  # the instance attribute goes: the class's method again

    def step(self, train_step) -> None:
        self.current, start = [], self.clock.now()
        train_step()
        self.steps.append((start, self.clock.now(), self.current))

    def summary(self, steps: int) -> dict[str, float]:
        """Median seconds per phase over the last `steps` steps (call after the device is synchronised)."""
        per_step = []
        for start, end, calls in self.steps[-steps:]:
            phases = defaultdict(float)
            for name, a, b in calls:
                phases[name] += self.clock.seconds(a, b)
            phases["other"] = max(self.clock.seconds(start, end) - sum(phases.values()), 0.0)
            per_step.append(phases)
        names = [n for n, _, _ in PHASES if any(n in p for p in per_step)] + ["other"]
        return {n: statistics.median(p.get(n, 0.0) for p in per_step) for n in names}


# Kernel (or op) name patterns, first match wins: attention before GEMM (cuDNN's attention kernels name sm90 and
# wgmma too), fused compiled code before everything elementwise.
KINDS = (
    ("attention", r"sdpa|fmha|flash|attention"),
    ("gemm", r"gemm|nvjet|cutlass|xmma|cublas|\baten::(mm|addmm|bmm|_scaled_mm)$"),
    ("compiled (fused)", r"triton|CompiledFxGraph"),  # the GPU's Triton kernels; on a CPU, the graph's C++ call
    ("reductions (loss, gradient norm)", r"reduce_kernel|\baten::(sum|mean|linalg_vector_norm)$"),
    ("norm", r"norm"),
    ("optimizer, EMA", r"multi_tensor|adam|foreach|lerp"),
    ("communication", r"nccl|all_reduce|all_gather|reduce_scatter|alltoall|all_to_all"),
    ("copy, fill, cast", r"copy|fill|memcpy|memset|\bcat\b"),
)


def kernel_kind(name: str) -> str:
    for kind, pattern in KINDS:
        if re.search(pattern, name, re.IGNORECASE):
            return kind
    return "other elementwise"


def kernel_kinds(prof, device: torch.device) -> dict[str, float]:
    """Seconds per kind over a finished torch.profiler run: CUDA kernels' device time on a GPU, ops' self CPU time on
    a CPU (self time: an op's children are counted once, as themselves)."""
    totals: dict[str, float] = defaultdict(float)
    for e in prof.key_averages():
        if device.type == "cuda":
            if e.device_type != torch.autograd.DeviceType.CUDA or not e.self_device_time_total:
                continue
            us = e.self_device_time_total
        else:
            us = e.self_cpu_time_total
        totals[kernel_kind(e.key)] += us / 1e6
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))
