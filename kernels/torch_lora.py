"""The LoRA linear of the `kernels: torch` path: autograd functions that keep only small state.

`lora_linear_eager(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training)` computes
`x W^T + b + scaling * dropout(x) A^T B^T` (the signature of `kernels.reference.lora_linear_reference`,
which stays the tests' oracle); `grouped_lora_linear(x, W, b, adapters)` does the same for several
frozen projections of one input concatenated into W (q/k/v, gate/up: one GEMM forward, one dX GEMM
backward), each adapter adding its term on its slice of the output (`models.llama.fused_projections`).

Plain autograd of the LoRA expression keeps, per adapted projection, `dropout(x)` `[N, in]` (for
lora_A's gradient), the dropout noise `[N, in]` (for x's gradient) and `dropout(x) A^T` `[N, r]`.
These functions keep:

- `x` once for all the adapters that read it, and nothing of it when no adapter does (k_proj,
  gate/up without LoRA). When x carries a `recompute_from` recipe (RMSNorm's output in
  `models.llama`: its input, weight and rstd, which the norm keeps for its own backward) the recipe's
  tensors are kept instead and x is made again, bit for bit, in backward: the shared input of q/k/v
  then costs no bytes of its own;
- `h = dropout(x) A^T` `[N, r]` per adapter (r is 8-64, against in = 576-4096);
- the RNG state the dropout drew from (16 bytes on CUDA, 5 KiB on the CPU), from which backward
  draws the same noise again with a private generator: no `[N, in]` mask lives between forward
  and backward, and the global RNG stream is left as forward left it. The replay costs one more
  `bernoulli_` per adapter in backward.

The noise is drawn as `F.dropout` draws it on the CPU (`bernoulli_(1 - p)` on a tensor like x,
then `div_(1 - p)`, then `x * noise`), so on the CPU the masks equal today's torch path for the same
seed, and the values equal it to fp32 rounding (the LoRA term is added with one `addmm_`, without
`[N, out]` temporaries for `scaling * lora` and the sum). On CUDA `F.dropout` runs the fused
`native_dropout` kernel, which draws differently: there the masks are other draws of the same
distribution. Under `torch.compile` the noise is saved as an ordinary tensor instead of the RNG
state (a traced graph cannot read or replay the generator), and inductor's partitioner decides
what to keep.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pefomed.kernels.nf4 import NF4Tensor


def _dense(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The frozen weight in `dtype` (an NF4 weight dequantized now; its dense copy is never kept)."""
    if isinstance(weight, NF4Tensor):
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)


def _rng_state(device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return torch.random.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _noise(like: torch.Tensor, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """F.dropout's CPU noise for a tensor shaped like `like` [N, in]: 1/keep where kept, 0 elsewhere."""
    noise = torch.empty(like.shape, dtype=like.dtype, device=like.device)
    return noise.bernoulli_(keep, generator=generator).div_(keep)


class _GroupedLoRALinearFunction(torch.autograd.Function):
    """`x W^T + b` with LoRA terms added on column slices of the output; one adapter per slice.

    `W` may be several frozen weights concatenated along the output (q, k, v): the base is one
    GEMM forward and one GEMM backward (dX), and each adapter adds `s * dropout(x) A^T B^T` into
    its slice. The adapters draw their noise in slice order from one RNG state, as the layers
    called one after another would.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, spec, *adapters):
        # spec: ((start, end, scaling, dropout_p), ...) for the (lora_A, lora_B) pairs in `adapters`
        in_f, out_f = x.shape[-1], weight.shape[0]
        x2 = x.reshape(-1, in_f)
        w = weight.to(x.dtype) if isinstance(weight, NF4Tensor) and weight.dtype != x.dtype else weight
        out = F.linear(x, w, bias)
        if not out.is_contiguous():
            out = out.contiguous()
        out2 = out.view(-1, out_f)
        dropout = any(p > 0 for *_, p in spec)
        compiling = torch.compiler.is_compiling()
        state = _rng_state(x.device) if dropout and not compiling else None
        hs, noises = [], []
        for i, (start, end, scaling, p) in enumerate(spec):
            a = adapters[2 * i].to(x.dtype)
            b = adapters[2 * i + 1].to(x.dtype)
            if p > 0:
                noise = _noise(x2, 1.0 - p)
                h = torch.mm(x2 * noise, a.t())
                if compiling:
                    noises.append(noise)
            else:
                h = torch.mm(x2, a.t())
            out2[:, start:end].addmm_(h, b.t(), alpha=scaling)
            hs.append(h)
        ctx.spec, ctx.n_h, ctx.compiled_noise = spec, len(hs), compiling
        ctx.x_shape = x.shape
        # x is read back only by the adapters' gradients (and a trained base weight's): projections
        # without adapters (k_proj, gate/up) keep nothing of it.
        keep_x = bool(spec) or weight.requires_grad
        kept: tuple = (x,) if keep_x else (None,)
        ctx.recompute = None
        recipe = getattr(x, "recompute_from", None) if keep_x and not compiling else None
        if recipe is not None and recipe[2] == x._version:
            # x is an output that its producer can make again from tensors it keeps itself
            # (models.llama's RMSNorm: its input, weight and rstd): keep those, not a copy of x.
            ctx.recompute, kept = recipe[0], tuple(recipe[1])
        ctx.n_kept = len(kept)
        ctx.save_for_backward(*kept, weight, state, *hs, *adapters, *noises)
        return out

    @staticmethod
    def backward(ctx, grad):
        saved = ctx.saved_tensors
        kept, (weight, state, *rest) = saved[: ctx.n_kept], saved[ctx.n_kept :]
        x = kept[0] if ctx.recompute is None else None
        spec, n = ctx.spec, ctx.n_h
        hs, adapters, saved_noises = rest[:n], rest[n : 3 * n], rest[3 * n :]
        need_x, need_w, need_bias = ctx.needs_input_grad[:3]
        need_ab = ctx.needs_input_grad[4:]
        in_f, out_f = ctx.x_shape[-1], weight.shape[0]
        g2 = grad.reshape(-1, out_f)
        x2 = x.reshape(-1, in_f) if x is not None else None
        dtype = grad.dtype
        like = g2.new_empty(()).expand(g2.shape[0], in_f)  # shape, dtype and device only
        need_any_a = any(need_ab[0::2])
        if ctx.recompute is not None and (need_any_a or need_w):
            x2 = ctx.recompute(*kept).reshape(-1, in_f)
        noises: list[torch.Tensor | None] = [None] * n
        if need_x or need_any_a:
            if ctx.compiled_noise:
                it = iter(saved_noises)
                noises = [next(it) if p > 0 else None for *_, p in spec]
            elif state is not None:
                generator = torch.Generator(device=grad.device)
                generator.set_state(state)
                # every adapter's noise, in forward's order, so that each replays its own draw
                noises = [_noise(like, 1.0 - p, generator) if p > 0 else None for *_, p in spec]
        dx = torch.mm(g2, _dense(weight, dtype)) if need_x else None
        grads_ab: list[torch.Tensor | None] = []
        for i, (start, end, scaling, _) in enumerate(spec):
            lora_A, lora_B = adapters[2 * i], adapters[2 * i + 1]
            need_a, need_b = need_ab[2 * i], need_ab[2 * i + 1]
            gi = g2[:, start:end]
            a = lora_A.to(dtype)
            da = db = None
            if need_b:
                db = torch.mm(gi.t(), hs[i]).mul_(scaling).to(lora_B.dtype)
            if need_x or need_a:
                dh = torch.mm(gi, lora_B.to(dtype)).mul_(scaling)  # [N, r]
                if need_a:
                    dropped = x2 * noises[i] if noises[i] is not None else x2
                    da = torch.mm(dh.t(), dropped).to(lora_A.dtype)
                if need_x:
                    if noises[i] is None:
                        dx.addmm_(dh, a)
                    else:
                        dx.addcmul_(torch.mm(dh, a), noises[i])
            grads_ab += [da, db]
        dw = torch.mm(g2.t(), x2).to(weight.dtype) if need_w else None
        dbias = g2.sum(0) if need_bias else None
        if dx is not None:
            dx = dx.view(ctx.x_shape)
        return (dx, dw, dbias, None, *grads_ab)


def grouped_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    adapters: list[tuple[int, int, torch.Tensor, torch.Tensor, float, float]],
) -> torch.Tensor:
    """`x W^T + b`, plus `scaling * dropout(x) A^T B^T` on output columns `[start, end)` per adapter.

    `adapters`: `(start, end, lora_A, lora_B, scaling, dropout_p)` in increasing `start` (the
    order their dropout noise is drawn in); `dropout_p` is the effective one (0 in eval mode).
    Several frozen projections of the same input concatenated into `weight` run as one GEMM.
    """
    spec = []
    tensors: list[torch.Tensor] = []
    for start, end, lora_A, lora_B, scaling, p in adapters:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"lora_linear_eager: dropout_p must be in [0, 1), got {p}")
        if lora_A.shape[1] != x.shape[-1] or lora_B.shape[1] != lora_A.shape[0] or lora_B.shape[0] != end - start:
            raise ValueError(
                f"lora_linear_eager: x [..., {x.shape[-1]}], output columns [{start}, {end}), lora_A "
                f"{list(lora_A.shape)} and lora_B {list(lora_B.shape)} do not chain (expected lora_A [r, in], lora_B [out, r])"
            )
        spec.append((start, end, float(scaling), float(p)))
        tensors += [lora_A, lora_B]
    return _GroupedLoRALinearFunction.apply(x, weight, bias, tuple(spec), *tensors)


def lora_linear_eager(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """`x W^T + b + scaling * dropout(x) A^T B^T`, saving x, `dropout(x) A^T` and an RNG state.

    `weight` is dense or an `NF4Tensor` (QLoRA, dequantized in the forward and again in the
    backward). Dropout is active when `training` and `dropout_p > 0`; it draws from torch's
    generator of x's device.
    """
    p = dropout_p if training else 0.0
    return grouped_lora_linear(x, weight, bias, [(0, weight.shape[0], lora_A, lora_B, scaling, p)])
