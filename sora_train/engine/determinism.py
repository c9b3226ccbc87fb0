"""`deterministic=true`: the same inputs give bit-identical steps, on CUDA too, so a resumed run can be checked
against an uninterrupted one exactly (launch/gpu_check.sh does). Off by default: it costs speed.

Without it, two CUDA runs from the same seed part at the rounding level within a few steps (an H200, the tiny
model: losses 3e-6 apart at step 5, 9e-4 by step 20): flash attention's backward accumulates dQ with atomics
in whatever order its blocks finish, and cuBLAS may split reductions by its workspace."""

from __future__ import annotations

import os

import torch


def use_deterministic_kernels() -> None:
    """Deterministic kernels for the rest of the process. Called before any CUDA work: cuBLAS reads its workspace
    setting when it creates its first handle. Not warn_only: torch then only warns for flash attention's backward
    and keeps it non-deterministic; an op without a deterministic kernel should stop the run, naming itself."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
