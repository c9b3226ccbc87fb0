"""sora-train: the Hydra entry. Builds the pieces, then runs the loop (Trainer.train)."""

from __future__ import annotations

import faulthandler
import json
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import hydra
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from . import CONF_DIR
from .codecs import codec_from_manifest_name
from .config import model_args, register, saved_model_config, to_container
from .data import DataQualityError, PackedLoader, StreamPosition, StreamSpec
from .data.stream import NoUsableSamples
from .diffusion import build_objective, masked_mse_sum, per_token
from .engine.checkpoint import CheckpointManager, find_latest
from .engine.ema import EMA
from .engine.run_dir import RunDirInUse, RunLock
from .engine.metrics import MetricLogger, Throughput
from .generate import generate_latents, latent_grid, to_frames, write_videos
from .models import DiT
from .models.flops import device_peak_tflops, train_flops
from .parallel import gather_sequence, init_distributed, parallelize, shard_sequence
from .parallel import env as dist_env
from .parallel.collectives import all_reduce_values
from .preflight import ConfigError, preflight

warnings.filterwarnings("ignore", message=".*is deprecated.*", category=FutureWarning)  # torch 2.14 on ZeRO-3 collectives
register()
EXIT_REQUEUE = 75  # EX_TEMPFAIL: checkpointed on a signal, resume me (slurm/train.sbatch requeues)


def every(n: int, step: int) -> bool:
    return n > 0 and step % n == 0


def learning_rates(groups: list[dict]) -> dict[str, float]:
    """lr: AdamW's (optim.lr through the schedule); with Muon also lr_muon, its hidden matrices' (optim.muon_lr).
    DeepSpeed's get_lr() gives the first group's, which under Muon is the Muon half."""
    muon = [g["lr"] for g in groups if g.get("use_muon")]
    adam = [g["lr"] for g in groups if not g.get("use_muon")]
    return {"lr": (adam or muon)[0], **({"lr_muon": muon[0]} if muon and adam else {})}


def grads_norm(module: torch.nn.Module) -> float:
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0


def step_generator(*key: int) -> torch.Generator:
    """Noise and timesteps are a pure function of (seed, step, micro, dp_rank): resume needs no RNG
    state for them, and all SP ranks of a group draw the same noise for the same row."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([abs(k) for k in key]).generate_state(1)[0]))


class StopRequested:
    """SIGUSR1 (SLURM's warning before the time limit / preemption) or SIGTERM: checkpoint, then exit for a requeue.
    Ctrl-C (SIGINT): checkpoint, then exit; a second Ctrl-C quits at once without saving."""

    def __init__(self):
        self.signum = 0
        for s in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._handle)

    def _handle(self, signum, frame):
        if signum == signal.SIGINT:
            if self.signum == signal.SIGINT:
                raise KeyboardInterrupt  # the second Ctrl-C
            print("Ctrl-C: saving a checkpoint after this step, then stopping (Ctrl-C again: quit without saving)",
                  file=sys.stderr, flush=True)
        self.signum = self.signum or signum

    def agreed(self, device: torch.device) -> int:
        return int(all_reduce_values([self.signum], device, "max")[0])


class Trainer:
    def __init__(self, cfg, dims, engine, ema, objective, ckpt, logger, loader, manifest, step: int, device):
        self.cfg, self.dims, self.engine, self.ema, self.objective = cfg, dims, engine, ema, objective
        self.ckpt, self.logger, self.loader, self.manifest, self.step = ckpt, logger, loader, manifest, step
        self.device = device
        self.dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
        self.args = model_args(cfg.model)
        self.meter = Throughput(device_peak_tflops(cfg.logging.peak_tflops), dims.world_size)
        self.stop = StopRequested()
        self.bad_steps, self.skipped_steps = 0, 0
        self.ids_file = None
        self.lock = None  # the out_dir's RunLock (rank 0), held for the trainer's life
        self._sampling = None  # (text encoder, codec), built at the first sample
        self.losses: list[float] = []

    # -- one micro-batch ------------------------------------------------------------------------
    def forward_backward(self, batch, micro: int) -> tuple[torch.Tensor, bool]:
        """Returns (loss, finite). The generator key is the micro-batch's index in the global batch, so
        DP=2 and one process accumulating 2 micro-batches draw the same noise for the same data."""
        d, o = self.dims, self.cfg.optim
        gen = step_generator(self.cfg.seed, self.step, d.dp_rank * o.grad_accum + micro)
        t = self.objective.sample_t(batch.grids.prod(-1), gen)  # [R,M]
        noise = torch.randn(batch.tokens.shape, generator=gen)
        x_t, target = self.objective.corrupt(batch.tokens, noise, per_token(t, batch.seg))
        loss = self.loss(x_t, t, target, batch)
        finite = all_reduce_values(torch.isfinite(loss.detach()), self.device, "min")[0]  # every rank: one branch
        if not finite:
            # Drop this micro-batch but keep every rank's collectives in lockstep: backward a zero
            # multiple of the loss on sanitised inputs (finite weights -> exactly zero gradients).
            clean = lambda v: torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0)  # noqa: E731
            loss = self.loss(clean(x_t), t, clean(target), batch, clean(batch.text)) * 0.0
        self.engine.backward(loss)
        return loss.detach(), bool(finite)

    def loss(self, x_t, t, target, batch, text=None) -> torch.Tensor:
        d = self.dims
        shard = lambda x: shard_sequence(x, d.sp_rank, d.sp).to(self.device)  # noqa: E731
        seg = shard(batch.seg)
        text = batch.text if text is None else text
        x_local = shard(x_t)
        pred = self.engine(x_local.to(self.dtype), t.to(self.device, self.dtype), shard(batch.pos), seg,
                           text.to(self.device, self.dtype), batch.text_seg.to(self.device), extent=shard(batch.extent))
        t_tok = shard(per_token(t, batch.seg))
        pred = self.objective.velocity(pred.float(), x_local, t_tok)
        # Normalised by the real tokens of the full rows: the SP ranks' losses sum to the full mean.
        return masked_mse_sum(pred, shard(target), seg, self.objective.loss_weight(t_tok)) / batch.real_tokens

    # -- one optimizer step -----------------------------------------------------------------------
    def train_step(self, batches) -> dict:
        losses, all_finite = [], True
        for micro in range(self.cfg.optim.grad_accum):
            t0 = time.perf_counter()
            batch = next(batches)
            t1 = time.perf_counter()
            loss, finite = self.forward_backward(batch, micro)
            t2 = time.perf_counter()
            grad_norm = self.engine_step(micro)
            self.meter.data_s, self.meter.compute_s = self.meter.data_s + t1 - t0, self.meter.compute_s + t2 - t1
            self.meter.optim_s += time.perf_counter() - t2
            all_finite &= finite
            losses.append(loss.float())
            self.record_ids(batch)
            self.meter.add(batch.real_tokens, sum(len(k) for k in batch.keys),
                           train_flops(self.args, batch.seg, batch.text_seg) / self.dims.sp)
        if self.ema is not None:
            self.ema.update(self.step)
        loss = all_reduce_values(torch.stack(losses).mean(), self.device)[0]  # SP: parts of one mean; DP: averaged
        return {"loss": loss / self.dims.dp, **learning_rates(self.engine.optimizer.param_groups), "finite": all_finite,
                "grad_norm": float(grad_norm or 0.0)}

    def engine_step(self, micro: int) -> float | None:
        """DeepSpeed steps the optimizer only at the accumulation boundary; returns the global
        gradient norm (before clipping) there."""
        if micro < self.cfg.optim.grad_accum - 1:
            self.engine.step()
            return None
        # Stage 0 in fp32 (DeepSpeed's plain optimizer step) clips but keeps no norm: take it before.
        plain = self.cfg.parallel.zero_stage == 0 and self.dtype == torch.float32
        norm = grads_norm(self.engine.module) if plain else None
        self.engine.step()
        return norm if plain else self.engine.get_global_grad_norm()

    def record_ids(self, batch) -> None:
        """Audit trail of the data order: (epoch, shard, index) and key of each trained sample."""
        if not self.cfg.logging.sample_ids or self.dims.sp_rank != 0:
            return
        if self.ids_file is None:
            path = Path(self.cfg.out_dir) / "sample_ids" / f"dp{self.dims.dp_rank:05d}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            self.ids_file = open(path, "a")
        keys = [k for row in batch.keys for k in row]
        self.ids_file.write(json.dumps({"step": self.step + 1, "ids": batch.consumed[: len(keys)], "keys": keys}) + "\n")
        self.ids_file.flush()

    def train(self) -> list[float]:
        batches, total, t_start, start_step = iter(self.loader), self.cfg.optim.steps, time.time(), self.step
        while self.step < total:
            faulthandler.dump_traceback_later(self.cfg.watchdog_s, exit=True)  # a hung collective: stacks, exit
            metrics = self.train_step(batches)
            self.step += 1
            self.bad_steps = 0 if metrics.pop("finite") else self.bad_steps + 1
            self.skipped_steps += self.bad_steps > 0
            if self.bad_steps:
                self.logger.log(self.step, {"train/nonfinite_steps": self.skipped_steps})
            if self.bad_steps >= self.cfg.optim.max_bad_steps:
                self.stop_on_nonfinite()
            self.losses.append(metrics["loss"])
            if every(self.cfg.logging.every, self.step) or self.step == total:
                eta = (time.time() - t_start) / (self.step - start_step) * (total - self.step) / 60
                self.logger.log(self.step, {**metrics, **self.meter.summary(), **self.loader.stats.as_metrics(),
                                            "eta_min": eta})
                self.meter.reset()
            if every(self.cfg.logging.val_every, self.step) and self.cfg.data.val:
                self.logger.log(self.step, self.validate())
            if every(self.cfg.logging.sample_every, self.step):
                self.sample()
            stop = self.stop.agreed(self.device)
            if every(self.cfg.checkpoint.every, self.step) or self.step == total or stop:
                self.save()
            if stop == signal.SIGINT:
                print(f"stopped by Ctrl-C after saving step {self.step}; the same command continues the run",
                      flush=True)
                raise SystemExit(130)
            if stop:
                self.logger.log(self.step, {"preempted_by_signal": stop})
                if self.dims.is_main:  # srun's exit code mixes tasks' codes; the marker is unambiguous
                    (Path(self.cfg.out_dir) / "requeue").write_text(str(self.step))
                print(f"stopped by signal {stop} after saving step {self.step}; exit {EXIT_REQUEUE} = requeue me",
                      flush=True)
                raise SystemExit(EXIT_REQUEUE)
        faulthandler.cancel_dump_traceback_later()
        if self.cfg.data.val and not (self.step > start_step and every(self.cfg.logging.val_every, self.step)):
            self.logger.log(self.step, self.validate())  # the final model's, unless the loop just measured it
        return self.losses

    def close(self, keep_process_group: bool = False) -> None:
        """After the last step on every rank: the logger, then the process group once every rank is here (else at
        exit: parallel.dims.destroy_at_exit), then the run directory's lock."""
        self.logger.close()
        if self.ids_file is not None:
            self.ids_file.close()
        if dist.is_initialized():
            dist.barrier()
            if not keep_process_group:
                dist.destroy_process_group()
        if self.lock is not None:
            self.lock.release()

    def stop_on_nonfinite(self) -> None:
        finite = all(bool(torch.isfinite(p.ds_tensor if hasattr(p, "ds_tensor") else p).all())
                     for p in self.engine.module.parameters())
        saved = self.save() if all_reduce_values([finite], self.device, "min")[0] else find_latest(self.ckpt.root)
        raise FloatingPointError(
            f"{self.bad_steps} consecutive steps had a non-finite loss (step {self.step}); the run stopped. Last good "
            f"state: {saved}. Check the data (data/skipped in the logs) or lower optim.lr; optim.max_bad_steps "
            f"sets the patience.")

    # -- checkpoint, validation, samples ----------------------------------------------------------
    def save(self) -> Path:
        parts = [None] * self.dims.world_size
        dist.all_gather_object(parts, self.loader.state_dict() if self.dims.sp_rank == 0 else None)
        position = StreamPosition.merge([StreamPosition.from_state_dict(p) for p in parts if p is not None],
                                        base=self.loader.start)
        meta = {"wandb_id": self.logger.run_id, "config": to_container(self.cfg),
                "manifest": manifest_header(self.manifest),
                "nonfinite_steps": self.skipped_steps}  # a resumed run keeps counting from here
        return self.ckpt.save(self.engine, self.step, self.ema, position.state_dict(), meta)

    def full_forward(self, x, t, pos, seg, text, text_seg, extent):
        """Full rows in, full rows out (shards for SP and gathers back); for validation and sampling."""
        d = self.dims
        sh = lambda v: shard_sequence(v, d.sp_rank, d.sp)  # noqa: E731
        out = self.engine.module(sh(x).to(self.dtype), t.to(self.dtype), sh(pos), sh(seg), text.to(self.dtype), text_seg,
                                 extent=sh(extent))
        return gather_sequence(out.float(), d.sp_group) if d.sp > 1 else out.float()

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """val/loss at the training distribution of t, and val/loss_t<v> at each fixed t in
        logging.val_timesteps; the same noise every time, so values are comparable across steps."""
        spec = StreamSpec.of(self.cfg.data, self.cfg.model, caption_dropout=0.0, epochs=1)
        loader = PackedLoader(self.cfg.data.val, spec, self.dims.dp_rank, self.dims.dp, num_workers=0)
        fixed = list(self.cfg.logging.val_timesteps)
        totals, n = [0.0] * (1 + len(fixed)), 0
        for i, batch in zip(range(self.cfg.logging.val_batches), loader):
            gen = step_generator(self.cfg.seed, 10**9, i, self.dims.dp_rank)
            t = self.objective.sample_t(batch.grids.prod(-1), gen)
            noise = torch.randn(batch.tokens.shape, generator=gen).to(self.device)
            batch = batch.to(self.device)
            for j, tj in enumerate([t] + [torch.full_like(t, v) for v in fixed]):
                totals[j] += self.val_loss(batch, noise, tj)
            n += 1
        *sums, rows = all_reduce_values([*totals, n], self.device)  # SP members count the same rows: ratios hold
        means = [s / max(rows, 1.0) for s in sums]
        return {"val/loss": means[0], **{f"val/loss_t{v:g}": m for v, m in zip(fixed, means[1:])}}

    def val_loss(self, batch, noise, t) -> float:
        """batch and noise on the device, t [R,M] on the CPU."""
        t_tok = per_token(t.to(self.device), batch.seg)
        x_t, target = self.objective.corrupt(batch.tokens, noise, t_tok)
        pred = self.full_forward(x_t, t.to(self.device), batch.pos, batch.seg, batch.text, batch.text_seg, batch.extent)
        pred = self.objective.velocity(pred, x_t, t_tok)
        return (masked_mse_sum(pred, target, batch.seg, self.objective.loss_weight(t_tok)) / batch.real_tokens).item()

    @torch.no_grad()
    def sampling_pipeline(self):
        """(text encoder, codec) for samples during training: built on the first call, then kept (a T5-XXL-class
        encoder is ~19 GB to load; it used to be rebuilt on every rank at every logging.sample_every)."""
        if self._sampling is None:
            from .codecs.text import text_encoder_named

            self._sampling = (text_encoder_named(self.manifest["text_encoder"]["name"]),
                              codec_from_manifest_name(self.manifest["codec"]["name"]))
        return self._sampling

    def sample(self) -> list[Path]:
        prompts = list(self.cfg.logging.sample_prompts)
        if not prompts or self.manifest is None:
            return []
        encoder, codec = self.sampling_pipeline()
        grid = latent_grid(codec, self.args.patch_size, 8, 48, 48)
        dc = self.cfg.diffusion
        latents = generate_latents(self.full_forward, self.objective, encoder.encode(prompts), grid,
                                   self.args.patch_size, self.args.in_channels, self.args.text_dim, dc.steps,
                                   dc.guidance, dc.sampler, self.cfg.seed, self.device, self.dims.sp)
        if not self.dims.is_main:
            return []
        out = Path(self.cfg.out_dir) / "samples" / f"step_{self.step:08d}"
        gifs = write_videos(out, prompts, [to_frames(codec, z) for z in latents], fps=8)
        self.logger.log_videos(self.step, gifs, prompts)
        return gifs


def manifest_header(manifest: dict | None) -> dict | None:
    return None if manifest is None else {k: v for k, v in manifest.items() if k != "shards"}


def resume_point(cfg, ckpt_root: Path) -> Path | None:
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        return find_latest(ckpt_root)
    return Path(cfg.checkpoint.resume)


def refuse_incompatible_resume(cfg, meta: dict, src: Path, world: int | None = None) -> None:
    """A run may change its world size, SP degree, schedule or data layout on resume, not its model, optimizer
    or ZeRO stage: say so before DeepSpeed fails deep inside load_checkpoint."""
    old, new = meta["config"], to_container(cfg)
    old_model = to_container(saved_model_config(old["model"]))
    changed = [f"model.{k}: {old_model[k]!r} -> {v!r}" for k, v in new["model"].items() if old_model[k] != v]
    old_optimizer = old["optim"].get("name", "adamw")  # checkpoints from before optim.name: AdamW
    if old_optimizer != new["optim"]["name"]:
        changed.append(f"optim.name: {old_optimizer} -> {new['optim']['name']}")
    if old["parallel"]["zero_stage"] != new["parallel"]["zero_stage"]:
        changed.append(f"parallel.zero_stage: {old['parallel']['zero_stage']} -> {new['parallel']['zero_stage']}")
    saved_world = meta.get("world_size", world)
    if old_optimizer == "muon" and world is not None and saved_world != world:
        # Measured with deepspeed 0.19.8: ds_to_universal stops with KeyError 'exp_avg' on Muon's state.
        raise ConfigError(f"cannot resume {src} on {world} ranks: it was saved on {saved_world} with optim.name=muon, "
                          f"and DeepSpeed's universal checkpoint (which carries optimizer state to another world "
                          f"size) does not hold Muon's momentum; resume on {saved_world} ranks")
    if changed:
        raise ConfigError(f"cannot resume {src} with this config ({'; '.join(changed)}); use the checkpoint's "
                          f"config or start a new out_dir (checkpoint.resume=never starts over in place)")


def describe_run(cfg, engine, dims, device) -> str:
    """One line at start-up: what is being trained, where, and how fast it will have to go."""
    m, d, o = cfg.model, cfg.data, cfg.optim
    params = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in engine.module.parameters())
    dtype = "bf16" if engine.bfloat16_enabled() else "fp32"
    return (f"sora-train: model {m.name} ({params / 1e6:.1f}M parameters: dim {m.dim}, depth {m.depth}, "
            f"{m.heads} heads), attention {m.attention}; {dims.world_size} process(es) = dp {dims.dp} x sp {dims.sp} "
            f"on {device.type}, ZeRO stage {cfg.parallel.zero_stage}, {dtype}; {d.seq_len} tokens x {d.rows} row(s) "
            f"x {o.grad_accum} micro-batch(es) per rank per step; {o.steps} steps of {o.name} -> {cfg.out_dir}")


def build(cfg, loader=None) -> Trainer:
    """Every piece of a run, in order. `loader` replaces the shard loader (tests feed fixed batches)."""
    manifest = preflight(cfg, check_data=loader is None)  # refuses bad config before any process group or data work
    # One run per out_dir. The rank from the launcher's variables (torchrun or srun): no process group exists yet.
    lock = RunLock(cfg.out_dir).acquire() if dist_env.detect().rank == 0 else None
    dims = init_distributed(cfg.parallel.sp, cfg.parallel.timeout_s)
    device = torch.device(f"cuda:{dims.local_rank}" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu")
    torch.manual_seed(cfg.seed)
    ckpt = CheckpointManager(cfg.checkpoint.dir or Path(cfg.out_dir) / "checkpoints", cfg.checkpoint.keep_last,
                             dims.rank, dims.world_size)
    if dims.is_main:  # under the run directory's lock: nothing else writes here
        for d in ckpt.remove_half_written():
            print(f"removed {d}: a half-written checkpoint (a crash or a full disk while saving)", flush=True)
    dist.barrier()
    src = resume_point(cfg, ckpt.root)
    saved = ckpt.read_meta(src) if src is not None else None
    if saved is not None:
        refuse_incompatible_resume(cfg, saved, src, dims.world_size)
    if dims.is_main:  # after the resume check: a refused resume leaves the run's config as it was
        (Path(cfg.out_dir) / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    resharding = saved is not None and saved["world_size"] != dims.world_size
    if resharding:
        ckpt.prepare_resharding(src)
    args = model_args(cfg.model)
    engine = parallelize(lambda: DiT(args), cfg.parallel, cfg.optim, cfg.data.rows, dims, device,
                         load_universal=resharding)
    if dims.is_main:
        print(describe_run(cfg, engine, dims, device), flush=True)
    ema = EMA(engine.module, cfg.ema.decay, dims.rank, dims.world_size) if cfg.ema.enabled else None
    step, position, run_id, skipped = 0, None, None, 0
    if src is not None:
        meta = ckpt.load(engine, src, ema)
        step, position, run_id = meta["step"], meta["data_position"], meta.get("wandb_id")
        skipped = meta.get("nonfinite_steps", 0)
        if dims.is_main:
            print(f"resumed from {src} at step {step} (saved on {meta['world_size']} ranks, now {dims.world_size})",
                  flush=True)
    if loader is None:
        try:  # another dataset or data.seed than the checkpoint's: a config error, not a traceback
            loader = PackedLoader(cfg.data.train, StreamSpec.of(cfg.data, cfg.model), dims.dp_rank, dims.dp,
                                  cfg.data.num_workers, position, cfg.data.max_bad_fraction,
                                  cfg.data.min_reads_for_check, pin_memory=device.type == "cuda")
        except ValueError as e:
            raise ConfigError(f"data.train={cfg.data.train!r}: {e}") from e
    logger = MetricLogger(cfg.out_dir, dims.is_main, cfg.logging.wandb, to_container(cfg), run_id)
    trainer = Trainer(cfg, dims, engine, ema, build_objective(cfg.diffusion), ckpt, logger, loader, manifest, step,
                      device)
    trainer.lock, trainer.skipped_steps = lock, skipped
    return trainer


def run(cfg, keep_process_group: bool = False) -> list[float]:
    """keep_process_group: the jobs of a Hydra sweep run one after another in one process, and DeepSpeed keeps
    its groups between them."""
    trainer = build(cfg)
    try:
        losses = trainer.train()
        if cfg.logging.sample_prompts:
            trainer.sample()
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
