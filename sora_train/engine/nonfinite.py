"""The non-finite policy. A micro-batch whose loss is not finite on any rank is dropped by every rank alike
(Trainer.forward_backward backwards a zero multiple of it, so collectives stay in lockstep and the weights stay
finite); such steps are counted (train/nonfinite_steps, kept across resumes in the TrainState), and after
`patience` of them in a row the run saves its last good state and stops."""

from __future__ import annotations

import torch

from ..parallel.collectives import all_reduce_values
from .checkpoint import CheckpointManager, find_latest


class NonFiniteSteps:
    def __init__(self, patience: int, ckpt: CheckpointManager, logger):
        self.patience, self.ckpt, self.logger = patience, ckpt, logger
        self.in_a_row = 0

    def after_step(self, step: int, finite: bool, module: torch.nn.Module, device: torch.device) -> None:
        if finite:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.ckpt.train_state.nonfinite_steps += 1
        self.logger.log(step, {"train/nonfinite_steps": self.ckpt.train_state.nonfinite_steps})
        if self.in_a_row >= self.patience:
            self.stop(step, module, device)

    def stop(self, step: int, module: torch.nn.Module, device: torch.device) -> None:
        finite = all(bool(torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p).all())
                     for p in module.parameters())
        saved = self.ckpt.save(step) if all_reduce_values([finite], device, "min")[0] else find_latest(self.ckpt.root)
        raise FloatingPointError(
            f"{self.in_a_row} consecutive steps had a non-finite loss (step {step}); the run stopped. Last good "
            f"state: {saved}. Check the data (data/skipped in the logs) or lower optim.lr; optim.max_bad_steps "
            f"sets the patience.")
