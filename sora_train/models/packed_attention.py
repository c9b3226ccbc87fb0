"""Attention over a packed row one sequence at a time, as one opaque op (`sora_train::packed_attention`).

Why an op of its own: `parallel.compile` compiles each block. Traced by dynamo, a Python loop over the row's
sequences specialises the graph on their lengths (a recompile per packed layout); left out of the graph, it split
each block into seven graphs, whose boundaries kept tensors a single graph does not (33 [tokens, dim] tensors per
block against 26, measured on CPU at dim 512) and hid the block from selective checkpointing. As one op,
the graph holds the attention as one node whatever the layout, selective checkpointing sees it by name, and its
backward is the one SDPA's autograd runs, fed the forward's log-sum-exp: nothing is recomputed.

Each sequence runs the kernel `torch.nn.functional.scaled_dot_product_attention` would choose for it
(`torch._fused_sdp_choice`), called as SDPA's own autograd calls it: cuDNN or flash attention on CUDA, the flash
kernel on the CPU. Where SDPA would take another kernel (the memory-efficient one, float32 on CUDA; the math
fallback), the backward computes that sequence's gradients from the formulas, a block of queries at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend

aten = torch.ops.aten


def sequences(lengths: Tensor):
    """Each sequence's query and key slices: lengths [2, N] (CPU) holds their lengths. One of the two may be
    empty (a row's padding queries have no keys)."""
    start_q = start_k = 0
    for n_q, n_k in zip(*lengths.tolist()):
        yield slice(start_q, start_q + n_q), slice(start_k, start_k + n_k)
        start_q, start_k = start_q + n_q, start_k + n_k


def _heads_first(x: Tensor) -> Tensor:
    """[S, H, D] -> the [1, H, S, D] view SDPA's kernels take."""
    return x.transpose(0, 1)[None]


def _kernel(q: Tensor, k: Tensor, v: Tensor) -> str:
    choice = torch._fused_sdp_choice(q, k, v)
    if choice == SDPBackend.CUDNN_ATTENTION.value:
        return "cudnn"
    if choice == SDPBackend.FLASH_ATTENTION.value:
        return "flash" if q.is_cuda else "flash_cpu"
    return "formula"


def _forward_one(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor | None]:
    """[1, H, S, D] views -> out [1, H, Sq, D], log-sum-exp [H, Sq] (None where backward takes the formulas)."""
    kernel = _kernel(q, k, v)
    if kernel == "cudnn":
        out, lse, *_ = aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False)
        return out, lse[0, ..., 0]
    if kernel == "flash":
        out, lse, *_ = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False)
        return out, lse[0]
    if kernel == "flash_cpu":
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False)
        return out, lse[0]
    return F.scaled_dot_product_attention(q, k, v), None


def _backward_one(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor) -> tuple[Tensor, ...]:
    """The gradients of _forward_one's [1, H, S, D] views, given its output and log-sum-exp [H, Sq]. The
    log-sum-exp goes back in the layout each kernel wrote it; the random-number state is unused without dropout."""
    kernel, n_q, n_k = _kernel(q, k, v), q.shape[2], k.shape[2]
    if kernel == "cudnn":
        no_dropout = torch.zeros((), dtype=torch.int64, device=q.device)
        return aten._scaled_dot_product_cudnn_attention_backward(
            grad, q, k, v, out, lse.contiguous()[None, ..., None], no_dropout, no_dropout, None, None, None,
            n_q, n_k, 0.0, False)
    if kernel == "flash":
        return aten._scaled_dot_product_flash_attention_backward(
            grad, q, k, v, out, lse.contiguous()[None], None, None, n_q, n_k, 0.0, False,
            torch.zeros(2, dtype=torch.uint64, device=q.device), torch.empty(0, dtype=torch.uint64, device=q.device))
    if kernel == "flash_cpu":  # its log-sum-exp is [1, H, S] over [S, H] memory
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad, q, k, v, out, lse.t().contiguous().t()[None], 0.0, False)
    return _attention_backward_by_formula(grad, q, k, v)


def _attention_backward_by_formula(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, rows: int = 1024):
    """Attention's gradients from its formulas, the probabilities recomputed in float32 for `rows` queries at a
    time ([H, rows, Sk] at most): autograd does not run inside an op's kernel."""
    scale = q.shape[-1] ** -0.5
    qf, kf, vf, gf = (x[0].float() for x in (q, k, v, grad))  # [H, S, D]
    dq, dk, dv = torch.empty_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
    for start in range(0, qf.shape[1], rows):
        qc, gc = qf[:, start:start + rows], gf[:, start:start + rows]
        p = (qc @ kf.transpose(1, 2) * scale).softmax(-1)
        dp = gc @ vf.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[:, start:start + rows] = ds @ kf * scale
        dk += ds.transpose(1, 2) @ qc * scale
        dv += p.transpose(1, 2) @ gc
    return tuple(x[None].to(q.dtype) for x in (dq, dk, dv))


@torch.library.custom_op("sora_train::packed_attention", mutates_args=())
def packed_attention(q: Tensor, k: Tensor, v: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
    """q [Tq, H, D], k and v [Tk, H, D]: a packed row's sequences one after another. lengths [2, N] int64 on the
    CPU (read without waiting for the GPU): each sequence's query and key lengths; queries with no keys (a row's
    padding) get zeros. -> out [Tq, H, D], log-sum-exp [H, Tq] float32 (for the backward)."""
    if lengths.sum(1).tolist() != [q.shape[0], k.shape[0]]:
        raise ValueError(f"packed_attention: sequence lengths {lengths.sum(1).tolist()} do not cover the "
                         f"{q.shape[0]} queries and {k.shape[0]} keys (more samples in a row than max_segments?)")
    # Written slice by slice, zeroed only where no kernel writes (a full memset would be one more pass over the row)
    out, lse = torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)
    for sq, sk in sequences(lengths):
        if sk.stop == sk.start:
            out[sq], lse[:, sq] = 0, 0
            continue
        o, m = _forward_one(_heads_first(q[sq]), _heads_first(k[sk]), _heads_first(v[sk]))
        out[sq], lse[:, sq] = o[0].transpose(0, 1), 0 if m is None else m
    return out, lse


@packed_attention.register_fake
def _(q, k, v, lengths):
    return torch.empty_like(q), q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32)


@torch.library.custom_op("sora_train::packed_attention_backward", mutates_args=())
def packed_attention_backward(grad: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                              lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    grad = grad.contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    for sq, sk in sequences(lengths):
        if sq.stop == sq.start or sk.stop == sk.start:  # queries without keys, or keys without queries
            dq[sq], dk[sk], dv[sk] = 0, 0, 0
            continue
        grads = _backward_one(*(_heads_first(x) for x in (grad[sq], q[sq], k[sk], v[sk], out[sq])), lse[:, sq])
        for d, g, s in zip((dq, dk, dv), grads, (sq, sk, sk)):
            d[s] = g[0].transpose(0, 1)
    return dq, dk, dv


@packed_attention_backward.register_fake
def _(grad, q, k, v, out, lse, lengths):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, lengths = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, lengths)


def _backward(ctx, grad_out, grad_lse):
    return (*packed_attention_backward(grad_out, *ctx.saved_tensors), None)


packed_attention.register_autograd(_backward, setup_context=_setup_context)
