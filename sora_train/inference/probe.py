"""Which prompt words does a trained DiT read? Two figures per checkpoint, for debugging prompt adherence:

- cross-attention mass per word: for one prompt, each block's attention from the video tokens of a
  noisy clip to each text token, averaged over heads and video tokens (the heads' maximum alongside);
- conditioning distance: how far apart two prompts put block 0's adaLN modulation (the per-sample
  scale/shift/gate vectors), i.e. how strongly the global conditioning tells them apart.

  sora-probe runs/quickstart/checkpoints "a red square moving left on a black background" \
      --pair "a red square moving right on a black background" --pair "a blue square moving left on a black background"
"""

from __future__ import annotations

import argparse

import torch

from ..models.dit import pool_segments
from .pipeline import load_pipeline


def cross_attention_probs(module, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    """The softmax a CrossAttention computes inside its backend (which does not expose it), for one
    unpacked sample: x [B,S,D] (its normed input), text [B,L,D] -> [B,H,S,L]."""
    q = module.q_norm(module.q(x).unflatten(-1, (module.heads, module.head_dim)))
    k = module.k_norm(module.kv(text).unflatten(-1, (2, module.heads, module.head_dim))[..., 0, :, :])
    return (torch.einsum("bshd,blhd->bhsl", q, k) / module.head_dim**0.5).softmax(-1)


@torch.no_grad()
def cross_attention_mass(model, text: torch.Tensor, grid=(8, 4, 4), t: float = 0.9, seed: int = 0) -> torch.Tensor:
    """text [L,Dt] one prompt's states -> [depth, heads, L]: attention mass per block, head and text token."""
    if not model.args.cross_attention:
        raise ValueError("the model has no cross-attention (model.cross_attention=false)")
    pos = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1).reshape(1, -1, 3)
    n, length = pos.shape[1], text.shape[0]
    noise = torch.randn(1, n, model.args.patch_dim, generator=torch.Generator().manual_seed(seed))
    probs = []

    def record(module, inputs, _out):
        probs.append(cross_attention_probs(module, inputs[0], inputs[1])[0].mean(1))  # [H,L]

    hooks = [b.cross_attn.register_forward_hook(record) for b in model.blocks]
    try:
        model(noise, torch.full((1, 1), t), pos, torch.ones(1, n, dtype=torch.long), text[None],
              torch.ones(1, length, dtype=torch.long), torch.tensor(grid).expand(1, n, 3))
    finally:
        for h in hooks:
            h.remove()
    return torch.stack(probs)


@torch.no_grad()
def modulation(model, text: torch.Tensor, t: float = 0.9) -> torch.Tensor:
    """Block 0's adaLN modulation [6*dim] for one prompt's states at time t."""
    c = model.t_embedder(torch.full((1, 1), t))
    if model.args.cross_attention and model.args.pooled_text:
        c = c + model.pooled_embedder(pool_segments(text[None], torch.ones(1, text.shape[0], dtype=torch.long), 1))
    return model.blocks[0].adaLN_modulation(c)[0, 0]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="export dir, checkpoint dir or a step dir in it")
    p.add_argument("prompt")
    p.add_argument("--pair", action="append", default=[], help="another prompt to compare conditioning with")
    p.add_argument("--t", type=float, default=0.9, help="diffusion time of the probe (1 = pure noise)")
    p.add_argument("--no-ema", action="store_true")
    a = p.parse_args(argv)
    pipe = load_pipeline(a.checkpoint, not a.no_ema, "cpu")
    model, encoder = pipe.model, pipe.encoder
    words = encoder.tokenizer.convert_ids_to_tokens(encoder.tokenizer(a.prompt).input_ids)
    states = [torch.from_numpy(s).float() for s in encoder.encode([a.prompt, *a.pair])]
    mass = cross_attention_mass(model, states[0], t=a.t)  # [depth, H, L]
    print("cross-attention mass per word (mean over heads; max head in brackets)")
    print("block " + " ".join(f"{w[:11]:>16s}" for w in words))
    for i, m in enumerate(mass):
        print(f"{i:5d} " + " ".join(f"{mean:7.2f} [{mx:5.2f}] " for mean, mx in zip(m.mean(0).tolist(), m.amax(0).tolist())))
    if a.pair:
        base = modulation(model, states[0], a.t)
        print(f"block-0 adaLN modulation: norm {base.norm():.3f}; distance from the first prompt:")
        for prompt, s in zip(a.pair, states[1:]):
            print(f"  {(modulation(model, s, a.t) - base).norm():.3f}  {prompt}")


if __name__ == "__main__":
    main()
