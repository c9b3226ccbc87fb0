"""sora-bench: how fast a preset goes on this device, how well the loader packs, what a layout needs (the commands:
cli.py). One module per bench: model (the training step), attention, packing, memory (what a block keeps for
backward), layouts (sora_train/plan.py); common (synthetic rows, timing) and breakdown (where a step's time goes)
serve them."""

from .cli import main

__all__ = ["main"]
