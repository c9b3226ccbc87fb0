"""Runs the real trainer (Trainer.train_step) under torchrun on fixed global batches and writes what tests compare.

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
from sora_train.data import PackedLoader, StreamSpec  # noqa: E402
from sora_train.train import build  # noqa: E402


def fixed_batches(batches, dp_rank: int, dp: int, grad_accum: int):
    """Stands in for the shard loader in Trainer.train_step: this rank's share of a fixed list of global batches."""
    per_step = dp * grad_accum
    for s in range(len(batches) // per_step):
        for m in range(grad_accum):
            yield batches[s * per_step + dp_rank * grad_accum + m]


def main():
    import deepspeed.utils.groups

    register()
    for out, overrides in json.loads(open(sys.argv[1]).read()).items():
        run(out, overrides)
        deepspeed.utils.groups.mpu = None  # DeepSpeed keeps the last engine's mpu (SP groups) for the next one
        torch.use_deterministic_algorithms(False)  # deterministic=true holds for the process: not for the next run
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
    torch._dynamo.reset()  # each compiled run compiles afresh: its graph counts are its own
    trainer = build(cfg, loader=None)
    dims = trainer.dims
    from deepspeed.utils import safe_get_full_grad, safe_get_full_fp32_param

    grads, engine_step = {}, trainer.engine_step

    def keep_first_gradients(micro):  # the full gradients of step 1, after the last backward, before the update
        if trainer.step == 0 and micro == ga - 1:
            grads.update({n: safe_get_full_grad(p) for n, p in trainer.engine.module.named_parameters()})
        return engine_step(micro)

    trainer.engine_step = keep_first_gradients
    it = fixed_batches(batches, dims.dp_rank, dims.dp, ga)
    record = {"loss": [], "grad_norm": []}
    for _ in range(steps):  # the trainer's own step: the equivalence tests exercise what a run does
        metrics = trainer.train_step(it)
        trainer.step += 1
        record["loss"].append(metrics["loss"])
        record["grad_norm"].append(metrics["grad_norm"])
    if trainer.quality.enabled:  # logging.metrics (a collective): FVD/FID/CLIPScore of the final weights
        record["quality"] = {k: v for k, v in trainer.quality.measure(trainer.step).items() if "seconds" not in k
                             and "time_share" not in k}
    # ZeRO stage 0 keeps no fp32 master copy for safe_get_full_fp32_param: the module holds fp32 weights.
    params = {n: safe_get_full_fp32_param(p) if trainer.cfg.parallel.zero_stage else p.detach()
              for n, p in trainer.engine.module.named_parameters()}
    if dims.is_main:
        from torch._dynamo.utils import counters  # what the compiled runs compiled (empty when dynamo is off)

        engine = trainer.engine
        block = engine.module.blocks[0]
        record["zero3"] = {"block_params": sum(getattr(p, "ds_numel", p.numel()) for p in block.parameters()),
                           "prefetch": engine.zero_prefetch_bucket_size(),
                           "max_live": engine.zero_max_live_parameters()}
        record["functional_linear"] = getattr(torch.nn.functional.linear, "__module__", None)
        record["deterministic"] = torch.are_deterministic_algorithms_enabled()
        record["graphs"] = counters["stats"]["unique_graphs"]
        record["graph_breaks"] = sorted({why.strip().split("\n")[0] + " " + why.split("function ")[-1][:60]
                                         for why in counters["graph_break"]})
        counters.clear()
        record["grads_step1"] = {n: g.flatten()[:2000].tolist() for n, g in grads.items() if g is not None}
        record["params"] = {n: p.flatten()[:2000].tolist() for n, p in params.items()}
        with open(out, "w") as f:
            json.dump(record, f)
    trainer.logger.close()


if __name__ == "__main__":
    main()
