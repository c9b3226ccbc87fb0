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


def poisoned(batches, steps: set[int], trainer):
    """The trainer's own batches; those of the listed steps get NaN inputs (past the decoder's checks, as a
    numerically unstable step would)."""
    for b in batches:
        if trainer.step + 1 in steps:
            b.tokens[0, 0, 0] = float("nan")
        yield b


def train_poisoned(poison: set[int], overrides: list[str]):
    """The real trainer from `overrides`, trained on its loader's batches poisoned at the given steps."""
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    trainer = build(cfg)
    try:
        trainer.train(poisoned(iter(trainer.loader), poison, trainer))
    finally:
        trainer.logger.close()
    return trainer


def main():
    trainer = train_poisoned({int(s) for s in sys.argv[1].split(",") if s}, sys.argv[2:])
    finite = all(torch.isfinite(p).all() for p in trainer.engine.module.parameters())
    print(f"FINAL step={trainer.step} params_finite={finite} nonfinite_steps={trainer.state.nonfinite_steps}")
    trainer.close()


if __name__ == "__main__":
    main()
