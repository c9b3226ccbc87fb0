"""The optimizer and its learning-rate schedule, from `optim.*`: what deepspeed.initialize is handed."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch


def lr_lambda(o) -> Callable[[int], float]:
    """Linear warm-up over optim.warmup_steps, then constant or cosine down to optim.min_lr_ratio at optim.steps."""
    def f(step: int) -> float:
        if step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.decay == "constant":
            return 1.0
        progress = min(1.0, (step - o.warmup_steps) / max(1, o.steps - o.warmup_steps))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def deepspeed_optimizer_section(o, cuda: bool) -> dict | None:
    """The optimizers DeepSpeed must build itself (a DeepSpeed config "optimizer" section), or None."""
    if o.name != "muon":
        return None
    # DeepSpeed's Muon (Jordan et al. 2024): orthogonalised momentum on the blocks' matrices, AdamW on
    # embeddings, biases and norms. DeepSpeed builds it from its config so that ZeRO-3 can gather each
    # matrix's whole gradient for the Newton-Schulz step; a client Muon would see flat partitions.
    return {"type": "Muon", "params": {
        "lr": o.lr, "adam_lr": o.lr, "muon_lr": o.muon_lr, "momentum": o.momentum, "betas": list(o.betas),
        "weight_decay": o.weight_decay,
        # torch's AdamW for the non-matrix half on CPU: DeepSpeed's FusedAdam would be JIT-built there
        # first (~140 s measured in the quickstart on 2 cores).
        "torch_adam": not cuda}}


def build_optimizer(o, model: torch.nn.Module, cuda: bool):
    """Returns (the client optimizer, or None when DeepSpeed builds it; the LR scheduler, or for DeepSpeed's own
    optimizer a factory DeepSpeed calls with it)."""
    if deepspeed_optimizer_section(o, cuda) is not None:
        return None, lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(o))
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay,
                                  fused=cuda)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(o))


def learning_rates(groups: list[dict]) -> dict[str, float]:
    """lr: AdamW's (optim.lr through the schedule); with Muon also lr_muon, its hidden matrices' (optim.muon_lr).
    DeepSpeed's get_lr() gives the first group's, which under Muon is the Muon half."""
    muon = [g["lr"] for g in groups if g.get("use_muon")]
    adam = [g["lr"] for g in groups if not g.get("use_muon")]
    return {"lr": (adam or muon)[0], **({"lr_muon": muon[0]} if muon and adam else {})}


def static_compile_per_shape(groups: list[dict]):
    """A context in which torch.compile gives every matrix shape its own static graph, for DeepSpeed's Muon step.

    DeepSpeed compiles Muon's update (`muon_update`, the Newton-Schulz iteration) and calls it once per matrix, in
    parameter order. By default Dynamo compiles the first shape statically and, on the second, recompiles with
    symbolic sizes (automatic dynamic shapes); later lookups try the newest graphs first, so which kernel a shape
    runs depends on what the process has run before. A straight run's step 3 ran a dynamic graph for the first
    shape where a run resumed at step 2 ran that shape's static one; where the two kernels round differently (they
    did on a 2-core CI machine, not on every CPU) the resumed parameters drifted (5.7e-4 after two steps). One
    static graph per shape is the same graph in every process whatever ran before, so resume is exact; it costs
    one compile per distinct shape (6-10 in our presets), once per process."""
    if not any(g.get("use_muon") for g in groups):
        return contextlib.nullcontext()
    # ZeRO-3 partitions a parameter: its ds_shape is the whole matrix, the shape the update sees.
    shapes = {tuple(getattr(p, "ds_shape", p.shape)) for g in groups if g.get("use_muon") for p in g["params"]}
    # Each shape compiles the update and each of its graph-break continuations once: room for all of them, or
    # the shapes past the limit would run eagerly.
    limit = max(torch._dynamo.config.recompile_limit, 2 * len(shapes) + 2)
    return torch._dynamo.config.patch(automatic_dynamic_shapes=False, recompile_limit=limit)


def optimizer_step(engine, last_micro: bool, plain_norm: bool) -> float | None:
    """engine.step() after every micro-batch (DeepSpeed counts them and steps the optimizer only at the accumulation
    boundary); there, returns the global gradient norm before clipping. plain_norm: stage 0 in fp32 (DeepSpeed's
    plain optimizer step) clips but keeps no norm, so it is taken before the step."""
    if not last_micro:
        engine.step()
        return None
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None] if plain_norm else []
    norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
    with static_compile_per_shape(engine.optimizer.param_groups):
        engine.step()
    return norm if plain_norm else engine.get_global_grad_norm()
