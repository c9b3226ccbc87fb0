"""Fault-injection driver: the real trainer on batches from the shard loader, with NaN poisoned
into chosen global steps. usage: python tests/dist/faults.py POISON_STEPS key=value ..."""

import sys
import warnings

import torch

warnings.filterwarnings("ignore")
from hydra import compose, initialize_config_dir  # noqa: E402

from sora_train import CONF_DIR  # noqa: E402
from sora_train.config import register  # noqa: E402
from sora_train.train import build  # noqa: E402


class Poisoned:
    """Wraps the trainer's loader: batches of the listed steps get NaN inputs (past the decoder's checks,
    as a numerically unstable step would)."""

    def __init__(self, loader, steps: set[int], trainer):
        self.loader, self.steps, self.trainer = loader, steps, trainer
        self.stats, self.state_dict, self.start = loader.stats, loader.state_dict, loader.start

    def __iter__(self):
        for b in self.loader:
            if self.trainer.step + 1 in self.steps:
                b.tokens[0, 0, 0] = float("nan")
            yield b


def poisoned_trainer(poison: set[int], overrides: list[str]):
    """The real trainer from `overrides`, its loader poisoned at the given steps."""
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    trainer = build(cfg)
    trainer.loader = Poisoned(trainer.loader, poison, trainer)
    return trainer


def main():
    trainer = poisoned_trainer({int(s) for s in sys.argv[1].split(",") if s}, sys.argv[2:])
    try:
        trainer.train()
    finally:
        trainer.logger.close()
    finite = all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())
    print(f"FINAL step={trainer.step} params_finite={finite} nonfinite_steps={trainer.skipped_steps}")
    trainer.close()


if __name__ == "__main__":
    main()
