"""Builds a model preset the way the trainer does (parallel.build_partitioned) and reports host memory.

usage: torchrun --nproc_per_node N tests/dist/zero_init_build.py OUT_JSON ZERO_STAGE key=value ...
Each rank reports its peak resident memory (ru_maxrss) before and after building, the parameters it holds
and the model's; with ZERO_STAGE=3 rank 0 also checks that the gathered adaLN-Zero and output weights are zero.
"""

import json
import resource
import sys
import warnings

import torch
import torch.distributed as dist

warnings.filterwarnings("ignore")
from hydra import compose, initialize_config_dir  # noqa: E402

from sora_train import CONF_DIR  # noqa: E402
from sora_train.config import register  # noqa: E402
from sora_train.models import DiT  # noqa: E402
from sora_train.parallel import build_partitioned, deepspeed_config, init_distributed  # noqa: E402
from sora_train.config import model_args  # noqa: E402


def peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main():
    out, stage = sys.argv[1], int(sys.argv[2])
    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"parallel.zero_stage={stage}", *sys.argv[3:]])
    dims = init_distributed(1)
    before = peak_bytes()
    torch.manual_seed(0)
    ds_config = deepspeed_config(cfg.parallel, 1, 1, dims.dp, 1.0, False)
    model = build_partitioned(lambda: DiT(model_args(cfg.model)), ds_config)
    after = peak_bytes()
    held = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    total = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())
    closed = None
    if stage == 3:
        import deepspeed

        zero_init = [model.blocks[-1].adaLN_modulation[-1], model.final_layer.linear]
        with deepspeed.zero.GatheredParameters([p for m in zero_init for p in m.parameters()]):
            closed = all(bool((p == 0).all()) for m in zero_init for p in m.parameters())
    report = {"rank": dims.rank, "peak_before": before, "peak_after": after, "held": held, "total": total,
              "closed": closed}
    reports = [None] * dims.world_size
    dist.all_gather_object(reports, report)
    if dims.is_main:
        with open(out, "w") as f:
            json.dump(reports, f)


if __name__ == "__main__":
    main()
