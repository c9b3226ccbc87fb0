"""Runs the real trainer under torchrun on fixed global batches and writes what tests compare.

usage: torchrun --nproc_per_node N tests/dist/driver.py RUNS_JSON
RUNS_JSON maps an output file to the Hydra overrides of one run; the runs go one after another in the
same processes (a launch costs ~10 s of imports per process on 2 cores, a tiny run ~1 s).
Global micro-batch g of step s is batch[s * n_micro + g] of one shared list; rank r takes the
micro-batches g = dp_rank * grad_accum + m. Writes per-step losses and grad norms, the full
gradients after step 1 (tests compare them across layouts), and final parameters.
"""

import json
import os
import sys
import warnings

import torch

warnings.filterwarnings("ignore")
from hydra import compose, initialize_config_dir  # noqa: E402

from sora_train import CONF_DIR  # noqa: E402
from sora_train.config import register  # noqa: E402
from sora_train.data import PackedLoader  # noqa: E402
from sora_train.parallel.collectives import all_reduce_values  # noqa: E402
from sora_train.data import StreamSpec  # noqa: E402
from sora_train.train import build  # noqa: E402


class FixedBatches:
    """Stands in for PackedLoader: this rank's share of a fixed list of global batches."""

    def __init__(self, batches, dp_rank, dp, grad_accum):
        self.batches, self.dp_rank, self.dp, self.ga = batches, dp_rank, dp, grad_accum
        self.stats = type("S", (), {"as_metrics": staticmethod(lambda: {})})()

    def __iter__(self):
        per_step = self.dp * self.ga
        for s in range(len(self.batches) // per_step):
            for m in range(self.ga):
                yield self.batches[s * per_step + self.dp_rank * self.ga + m]

    def state_dict(self):
        return None


def main():
    import deepspeed.utils.groups

    register()
    for out, overrides in json.loads(open(sys.argv[1]).read()).items():
        run(out, overrides)
        deepspeed.utils.groups.mpu = None  # DeepSpeed keeps the last engine's mpu (SP groups) for the next one
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()  # not left to interpreter exit (Trainer.close says why)


def run(out, overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    world = int(os.environ["WORLD_SIZE"])
    steps, ga = cfg.optim.steps, cfg.optim.grad_accum
    n_global = steps * ga * world // cfg.parallel.sp
    spec = StreamSpec.of(cfg.data, cfg.model, caption_dropout=0.0)
    batches = []
    for b in PackedLoader(cfg.data.train, spec):
        batches.append(b)
        if len(batches) == n_global:
            break
    trainer = build(cfg, loader=None)
    dims = trainer.dims
    trainer.loader = FixedBatches(batches, dims.dp_rank, dims.dp, ga)
    it = iter(trainer.loader)
    from deepspeed.utils import safe_get_full_grad, safe_get_full_fp32_param

    record = {"loss": [], "grad_norm": []}
    for step in range(steps):
        losses = []
        for m in range(ga):
            loss, _ = trainer.forward_backward(next(it), m)
            losses.append(loss)
            if step == 0 and m == ga - 1:
                grads = {n: safe_get_full_grad(p) for n, p in trainer.engine.module.named_parameters()}
            norm = trainer.engine_step(m)
        trainer.step += 1
        record["loss"].append(all_reduce_values(torch.stack(losses).mean(), trainer.device)[0] / dims.dp)
        record["grad_norm"].append(float(norm))
    # ZeRO stage 0 keeps no fp32 master copy for safe_get_full_fp32_param: the module holds fp32 weights.
    params = {n: safe_get_full_fp32_param(p) if trainer.cfg.parallel.zero_stage else p.detach()
              for n, p in trainer.engine.module.named_parameters()}
    if dims.is_main:
        record["grads_step1"] = {n: g.flatten()[:2000].tolist() for n, g in grads.items() if g is not None}
        record["params"] = {n: p.flatten()[:2000].tolist() for n, p in params.items()}
        with open(out, "w") as f:
            json.dump(record, f)
    trainer.logger.close()


if __name__ == "__main__":
    main()
