"""Validation during training: val/loss at the training distribution of t, and val/loss_t<v> at each fixed t
in logging.val_timesteps, on the same noise every time, so values are comparable across steps."""

from __future__ import annotations

import torch

from ..data import PackedLoader, StreamSpec
from ..diffusion import noise, packed_loss, per_token, step_generator
from ..parallel.collectives import all_reduce_values

VALIDATION_KEY = 10**9  # the noise key's "step": apart from every training step's


class Validator:
    """`forward` takes full rows (parallel.full_rows: sequence parallelism is inside it)."""

    def __init__(self, cfg, dims, objective, forward, device: torch.device):
        self.cfg, self.dims, self.objective, self.forward, self.device = cfg, dims, objective, forward, device
        self.every, self.fixed_t = cfg.logging.val_every, list(cfg.logging.val_timesteps)

    @property
    def enabled(self) -> bool:
        return bool(self.cfg.data.val)

    def should_validate(self, step: int, last_step: int) -> bool:
        return self.enabled and ((self.every > 0 and step % self.every == 0) or step == last_step)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        spec = StreamSpec.of(self.cfg.data, self.cfg.model, caption_dropout=0.0, epochs=1)
        loader = PackedLoader(self.cfg.data.val, spec, self.dims.dp_rank, self.dims.dp, num_workers=0)
        totals, n = [0.0] * (1 + len(self.fixed_t)), 0
        for i, batch in zip(range(self.cfg.logging.val_batches), loader):
            gen = step_generator(self.cfg.seed, VALIDATION_KEY, i, self.dims.dp_rank)
            t = self.objective.sample_t(batch.grids.prod(-1), gen)
            batch = batch.to(self.device)
            eps = noise(batch.tokens.shape, gen, self.device)
            for j, tj in enumerate([t] + [torch.full_like(t, v) for v in self.fixed_t]):
                totals[j] += self.loss(batch, eps, tj)
            n += 1
        *sums, rows = all_reduce_values([*totals, n], self.device)  # SP members count the same rows: ratios hold
        means = [s / max(rows, 1.0) for s in sums]
        return {"val/loss": means[0], **{f"val/loss_t{v:g}": m for v, m in zip(self.fixed_t, means[1:])}}

    def loss(self, batch, eps, t) -> float:
        """batch and noise (eps) on the device, t [R,M] on the CPU."""
        t_tok = per_token(t.to(self.device), batch.seg)
        x_t, target = self.objective.corrupt(batch.tokens, eps, t_tok)
        pred = self.forward(x_t, t.to(self.device), batch.pos, batch.seg, batch.text, batch.text_seg, batch.extent)
        return packed_loss(self.objective, pred, x_t, t_tok, target, batch.seg, batch.real_tokens)[0].item()
