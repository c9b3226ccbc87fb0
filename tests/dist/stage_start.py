"""The real trainer built as a stage (init_from), before any step: writes its full fp32 weights and EMA.

usage: torchrun --nproc_per_node N tests/dist/stage_start.py OUT_PT key=value ...
"""

import sys
import warnings

import torch

warnings.filterwarnings("ignore")
from hydra import compose, initialize_config_dir  # noqa: E402

from sora_train import CONF_DIR  # noqa: E402
from sora_train.config import register  # noqa: E402
from sora_train.train import build  # noqa: E402


def main():
    from deepspeed.utils import safe_get_full_fp32_param

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=sys.argv[2:])
    trainer = build(cfg)
    weights = {n: safe_get_full_fp32_param(p) for n, p in trainer.engine.module.named_parameters()}
    ema = trainer.ema.full_state_dict()
    if trainer.dims.is_main:
        torch.save({"weights": weights, "ema": ema, "step": trainer.step}, sys.argv[1])
    trainer.close()


if __name__ == "__main__":
    main()
