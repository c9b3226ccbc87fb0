"""sora-train: the Hydra entry. `build()` makes the pieces of a run in order; `Trainer` is the loop and the step.
Each piece decides its own timing (checkpoints, validation, samples, logging) and lives in engine/."""

from __future__ import annotations

import faulthandler
import re
import sys
import time
import warnings
from pathlib import Path

import hydra
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from . import CONF_DIR
from .config import model_args, register, to_container
from .data import DataQualityError, PackedLoader, StreamSpec
from .data.mixture import sources_of
from .data.stream import NoUsableSamples
from .diffusion import build_objective, draw_given, noise, packed_loss, per_token, step_generator
from .engine.checkpoint import CheckpointManager, DataPosition, EngineState, RNGState, prefixed
from .engine.determinism import use_deterministic_kernels
from .engine.ema import EMA
from .engine.metrics import MetricLogger, SampleIds, Throughput, describe_run
from .engine.init_from import (check_architecture, check_optimizer_source, find_parent, lineage, load_weights,
                               start_stage)
from .engine.nonfinite import NonFiniteSteps
from .engine.optim import learning_rates, optimizer_step
from .engine.preemption import StopRequested, exit_after_save
from .engine.resume import prepare_resume
from .engine.run_dir import RunDirInUse, RunLock
from .engine.quality import QualityMetrics
from .engine.samples import TrainingSamples
from .engine.source_losses import SourceLosses
from .engine.validate import Validator
from .inference import Pipeline
from .models import DiT
from .models.flops import device_peak_tflops, train_flops
from .models.routing import RouteLayout, route_layout
from .parallel import full_rows, init_distributed, parallelize, shard_sequence
from .parallel import env as dist_env
from .parallel.collectives import all_reduce_values
from .preflight import ConfigError, preflight

warnings.filterwarnings("ignore", message=".*is deprecated.*", category=FutureWarning)  # torch 2.14 on ZeRO-3 collectives
register()


class Trainer:
    def __init__(self, cfg, dims, engine, ema, objective, ckpt: CheckpointManager, logger, loader,
                 validator: Validator, samples: TrainingSamples, device: torch.device, quality: QualityMetrics):
        self.cfg, self.dims, self.engine, self.ema, self.objective = cfg, dims, engine, ema, objective
        self.ckpt, self.logger, self.loader, self.validator, self.samples = ckpt, logger, loader, validator, samples
        self.quality = quality
        self.device, self.state = device, ckpt.train_state  # step, skipped steps, W&B id: checkpointed
        self.dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        self.args = model_args(cfg.model)
        self.meter = Throughput(device_peak_tflops(cfg.logging.peak_tflops), dims.world_size, device)
        self.nonfinite = NonFiniteSteps(cfg.optim.max_bad_steps, ckpt, logger)
        self.stop = StopRequested()
        self.condition = OmegaConf.to_object(cfg.diffusion.condition)  # the typed node: draws given frames
        self.source_losses = SourceLosses([s.name for s in loader.mixture] if getattr(loader, "mixture", None)
                                          else None, device)
        self.sample_ids = SampleIds(cfg.out_dir, dims.dp_rank, cfg.logging.sample_ids and dims.sp_rank == 0)
        self.lock = None  # the out_dir's RunLock (rank 0), held for the trainer's life
        self.losses: list[float] = []

    @property
    def step(self) -> int:
        return self.state.step

    @step.setter
    def step(self, value: int) -> None:
        self.state.step = value

    # -- one micro-batch ------------------------------------------------------------------------
    def forward_backward(self, batch, micro: int) -> tuple[torch.Tensor, bool, RouteLayout | None]:
        """Returns (loss, finite, the routed span's layout or None). The generator key is the micro-batch's index
        in the global batch, so DP=2 and one process accumulating 2 micro-batches draw the same noise for the same
        data."""
        d, o, condition = self.dims, self.cfg.optim, self.condition
        gen = step_generator(self.cfg.seed, self.step, d.dp_rank * o.grad_accum + micro)
        t = self.objective.sample_t(batch.grids.prod(-1), gen)  # [R,M] on the host
        tokens = batch.tokens.to(self.device)  # the row's noise and mix on the device: no host work the GPU waits for
        x_t, target = self.objective.corrupt(tokens, noise(tokens.shape, gen, self.device),
                                             per_token(t, batch.seg).to(self.device))
        given = draw_given(condition, batch.pos, batch.seg, batch.grids, gen) if condition.enabled else None
        if given is not None:  # conditioning frames: clean, at t = 0 in the model, no loss
            x_t = torch.where(given.to(self.device)[..., None], tokens, x_t)
        # drawn last, and only when routing is on: the step's noise, t and given frames are the same either way
        route = route_layout(self.args.route, batch.tokens, batch.pos, batch.seg, gen, d.sp)
        loss, errors, loss_seg = self.loss(x_t, t, target, batch, given=given, route=route)
        finite = all_reduce_values(torch.isfinite(loss.detach()), self.device, "min")[0]  # every rank: one branch
        if finite:
            self.source_losses.add(errors, loss_seg, batch)
        else:
            # Drop this micro-batch but keep every rank's collectives in lockstep: backward a zero
            # multiple of the loss on sanitised inputs (finite weights -> exactly zero gradients).
            clean = lambda v: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)  # noqa: E731
            loss = self.loss(clean(x_t), t, clean(target), batch, clean(batch.text), given, route)[0] * 0.0
        self.engine.backward(loss)
        return loss.detach(), bool(finite), route

    def loss(self, x_t, t, target, batch, text=None, given=None, route=None):
        """This SP rank's part of the micro-batch's loss (the parts sum to the full rows' mean over the tokens
        that carry loss: given ones do not), its tokens' errors, and which of its tokens carry loss."""
        shard = lambda x: shard_sequence(x, self.dims.sp_rank, self.dims.sp).to(self.device)  # noqa: E731
        seg, x_local = shard(batch.seg), shard(x_t)
        text = batch.text if text is None else text
        kw = {} if given is None else {"given": shard(given)}
        if route is not None:  # this rank's chunk of the span's tokens
            kw["route"] = route.chunk(self.dims.sp_rank).to(self.device)
        pred = self.engine(x_local.to(self.dtype), t.to(self.device, self.dtype), shard(batch.pos), seg,
                           text.to(self.device, self.dtype), batch.text_seg.to(self.device), extent=shard(batch.extent),
                           **kw)
        tokens = batch.real_tokens - (0 if given is None else int(given.sum()))  # given tokens are real ones
        loss_seg = seg if given is None else seg * ~kw["given"]
        loss, errors = packed_loss(self.objective, pred, x_local, shard(per_token(t, batch.seg)), shard(target),
                                   loss_seg, max(tokens, 1))
        return loss, errors, loss_seg

    # -- one optimizer step -----------------------------------------------------------------------
    def train_step(self, batches) -> dict:
        losses, all_finite, routed, tokens = [], True, 0, 0
        clock = self.meter.clock
        for micro in range(self.cfg.optim.grad_accum):
            t0 = clock.now()
            batch = next(batches)
            t1 = clock.now()
            loss, finite, route = self.forward_backward(batch, micro)
            t2 = clock.now()
            grad_norm = self.engine_step(micro)
            self.meter.add_phases(t0, t1, t2, clock.now())
            all_finite &= finite
            losses.append(loss.float())
            tokens += batch.real_tokens
            self.sample_ids.record(self.step + 1, batch)
            # FLOPs: the span's blocks on the tokens that ran them (MFU is work done); tokens: every real one
            flops = train_flops(self.args, batch.seg, batch.text_seg, None if route is None else route.seg)
            self.meter.add(batch.real_tokens, sum(len(k) for k in batch.keys), flops / self.dims.sp)
            if route is not None:
                routed += batch.real_tokens - int((route.seg > 0).sum())
        if self.ema is not None:
            self.ema.update(self.step)
        loss = all_reduce_values(torch.stack(losses).mean(), self.device)[0]  # SP: parts of one mean; DP: averaged
        return {"loss": loss / self.dims.dp, **learning_rates(self.engine.optimizer.param_groups), "finite": all_finite,
                "grad_norm": float(grad_norm or 0.0), **({"routed": routed / max(tokens, 1)} if routed else {})}

    def engine_step(self, micro: int) -> float | None:
        """The gradient norm before clipping at the accumulation boundary, else None."""
        return optimizer_step(self.engine, micro == self.cfg.optim.grad_accum - 1,
                              self.cfg.parallel.zero_stage == 0 and self.dtype == torch.float32)

    # -- the loop ---------------------------------------------------------------------------------
    def train(self, batches=None) -> list[float]:
        """batches: the loader's by default (a test may hand another iterator; the checkpointed position stays the
        loader's)."""
        batches = iter(self.loader) if batches is None else batches
        total, start, t_start = self.cfg.optim.steps, self.step, time.time()
        while self.step < total:
            faulthandler.dump_traceback_later(self.cfg.watchdog_s, exit=True)  # a hung collective: stacks, exit
            metrics = self.train_step(batches)
            self.step += 1
            self.nonfinite.after_step(self.step, metrics.pop("finite"), self.engine.module, self.device)
            self.losses.append(metrics["loss"])
            if self.logger.should_log(self.step, total):
                eta = (time.time() - t_start) / (self.step - start) * (total - self.step) / 60
                self.logger.log(self.step, {**metrics, **self.meter.summary(), **self.loader.stats.as_metrics(),
                                            **self.source_losses.summary(), "eta_min": eta})
                self.meter.reset()
            if self.validator.should_validate(self.step, total):
                self.logger.log(self.step, self.validator.validate())
            if self.samples.should_sample(self.step):
                self.samples.write(self.step)
            if self.quality.should_measure(self.step):
                self.logger.log(self.step, self.quality.measure(self.step))
            stop = self.stop.agreed(self.device)
            if self.ckpt.should_save(self.step, total) or stop:
                self.ckpt.save(self.step)
            if stop:
                exit_after_save(stop, self.step, self.cfg.out_dir, self.dims.is_main, self.logger)
        faulthandler.cancel_dump_traceback_later()
        if self.step == start and self.validator.enabled:  # resumed at the last step: the final model's figures
            self.logger.log(self.step, self.validator.validate())
        return self.losses

    def close(self, keep_process_group: bool = False) -> None:
        """After the last step on every rank: the logger, then the process group once every rank is here (else at
        exit: parallel.dims.destroy_at_exit), then the run directory's lock."""
        self.logger.close()
        self.sample_ids.close()
        if dist.is_initialized():
            dist.barrier()
            if not keep_process_group:
                dist.destroy_process_group()
        if self.lock is not None:
            self.lock.release()


def build(cfg, loader=None) -> Trainer:
    """Every piece of a run, in order. `loader` replaces the shard loader (the bench feeds synthetic rows); its
    position is then not checkpointed."""
    manifest = preflight(cfg, check_data=loader is None)  # refuses bad config before any process group or data work
    if cfg.deterministic:
        use_deterministic_kernels()
    parent = find_parent(cfg.init_from.path) if cfg.init_from.path else None  # a stage: from another run's weights
    changed = check_architecture(cfg, parent) if parent else []
    if parent:
        check_optimizer_source(cfg, parent, dist_env.detect().world_size)
    # One run per out_dir. The rank from the launcher's variables (torchrun or srun): no process group exists yet.
    lock = RunLock(cfg.out_dir).acquire() if dist_env.detect().rank == 0 else None
    dims = init_distributed(cfg.parallel.sp, cfg.parallel.timeout_s, cfg.parallel.ring)
    device = torch.device(f"cuda:{dims.local_rank}" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    torch.manual_seed(cfg.seed)
    header = None if manifest is None else {k: v for k, v in manifest.items() if k != "shards"}
    ckpt = CheckpointManager(cfg.checkpoint.dir or Path(cfg.out_dir) / "checkpoints", cfg.checkpoint.keep_last,
                             dims.rank, dims.world_size, cfg.checkpoint.every,
                             description={"config": to_container(cfg), "manifest": header})
    src, resharding = prepare_resume(cfg, ckpt, dims)
    parent = parent if src is None else None  # a stage resumes from its own checkpoints
    ckpt.description["lineage"] = lineage(parent) if parent else (ckpt.read_meta(src).get("lineage", []) if src else [])
    args = model_args(cfg.model)
    engine = parallelize(lambda: DiT(args), cfg.parallel, cfg.optim, cfg.data.rows, dims, device,
                         load_universal=resharding,
                         init_weights=(lambda module: load_weights(module, parent, dims.rank)) if parent else None)
    if dims.is_main:
        print(describe_run(cfg, engine, dims, device), flush=True)
    ema = EMA(engine.module, cfg.ema.decay, dims.rank, dims.world_size) if cfg.ema.enabled else None
    if parent:
        start_stage(cfg, parent, engine, ema, changed, dims)
    ckpt.parts = {"engine": EngineState(engine, dims.world_size), **({"ema": ema} if ema else {}),
                  "rng": RNGState(dims.rank, dims.world_size)}
    if loader is None:
        what = "data.sources" if cfg.data.sources else f"data.train={cfg.data.train!r}"
        try:  # no shards there: a config error, not a traceback
            train = sources_of(cfg.data.sources) if cfg.data.sources else cfg.data.train
            loader = PackedLoader(train, StreamSpec.of(cfg.data, cfg.model), dims.dp_rank, dims.dp,
                                  cfg.data.num_workers, None, cfg.data.max_bad_fraction,
                                  cfg.data.min_reads_for_check, pin_memory=device.type == "cuda")
        except ValueError as e:
            raise ConfigError(prefixed(what, str(e))) from e
        ckpt.parts["data_position"] = DataPosition(loader, dims.sp_rank, dims.world_size, what,
                                                   to_container(cfg)["data"])
    if src is not None:
        meta = ckpt.load(src)
        if dims.is_main:
            print(f"resumed from {src} at step {meta['step']} (saved on {meta['world_size']} ranks, now "
                  f"{dims.world_size})", flush=True)
    logger = MetricLogger(cfg.out_dir, dims.is_main, cfg.logging.wandb,  # W&B: the parent runs in its config
                          {**to_container(cfg), "lineage": ckpt.description["lineage"]}, ckpt.train_state.wandb_id,
                          cfg.logging.every)
    ckpt.train_state.wandb_id = logger.run_id
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    forward = full_rows(engine.module, dims, dtype)
    objective = build_objective(cfg.diffusion)
    pipeline = Pipeline(forward, args, cfg.diffusion, manifest, device, sp=dims.sp) \
        if manifest is not None and (cfg.logging.sample_prompts or cfg.logging.metrics_every) else None
    validator, samples = Validator(cfg, dims, objective, forward, device), TrainingSamples(cfg, pipeline, logger,
                                                                                          dims.is_main)
    quality = QualityMetrics(cfg, dims, pipeline, ema, logger, device)
    trainer = Trainer(cfg, dims, engine, ema, objective, ckpt, logger, loader, validator, samples, device, quality)
    trainer.lock = lock
    return trainer


def run(cfg, keep_process_group: bool = False) -> list[float]:
    """keep_process_group: the jobs of a Hydra sweep run one after another in one process, and DeepSpeed keeps
    its groups between them."""
    trainer = build(cfg)
    try:
        losses = trainer.train()
        trainer.samples.write(trainer.step)  # the final model's, when logging.sample_prompts asks for any
        trainer.close(keep_process_group)
    finally:
        trainer.logger.close()
    return losses


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    if sweep:  # each sweep job in its own run directory (conf/train.yaml: hydra.sweep)
        cfg.out_dir = HydraConfig.get().runtime.output_dir
    try:
        run(cfg, keep_process_group=sweep)
    except (ConfigError, RunDirInUse) as e:
        sys.exit(f"config error: {e}")
    except (DataQualityError, NoUsableSamples) as e:
        # From a loader worker the message carries the worker's traceback; its last line is the cause.
        cause = re.sub(rf"^([\w.]+\.)?{type(e).__name__}: ", "", str(e).strip().splitlines()[-1])
        sys.exit(f"data error: {cause}")
    except KeyboardInterrupt:
        print("interrupted twice: stopped without saving", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
