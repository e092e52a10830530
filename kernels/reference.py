"""Plain PyTorch versions of the kernels: the `kernels: torch` path and the tests' oracles.

Each function has the signature of its Triton counterpart in `kernels/<op>.py`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pefomed.kernels.nf4 import NF4Tensor


def lora_linear_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scaling: float,
    bias: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    training: bool = True,
    dropout_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x W^T + b + scaling * dropout(x) A^T B^T`.

    `weight` is dense or an `NF4Tensor` (QLoRA), which F.linear dequantizes in plain PyTorch to x's
    dtype, in the forward and again in the backward (the dense weight is not kept). The dropout
    draws from torch's RNG unless `dropout_mask` (1 = kept) is given; the Triton kernel draws its
    mask from a seed, so parity tests pass the kernel's mask here.
    """
    if isinstance(weight, NF4Tensor) and weight.dtype != x.dtype:
        weight = weight.to(x.dtype)  # only the dtype it dequantizes to: the codes stay 4-bit
    base = F.linear(x, weight, bias)
    dropped = x
    if dropout_mask is not None and dropout_p > 0 and training:
        dropped = x * dropout_mask.to(x.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0 and training:
        dropped = F.dropout(x, dropout_p, training=True)
    lora = F.linear(F.linear(dropped, lora_A.to(x.dtype)), lora_B.to(x.dtype))
    return base + scaling * lora


def group_tokens_reference(feats: torch.Tensor, group: int, layout: str, drop_cls: bool) -> torch.Tensor:
    """`[B, (1+)N, D]` -> `[B, N/group, group*D]` by MiniGPT-v2's or the 2x2 spatial rule."""
    if drop_cls:
        feats = feats[:, 1:]
    b, n, d = feats.shape
    if n % group:
        raise ValueError(f"{n} visual tokens cannot be grouped by {group}")
    if layout == "sequence":
        return feats.reshape(b, n // group, group * d)
    if layout != "spatial":
        raise ValueError(f"layout {layout!r}: expected 'sequence' or 'spatial'")
    side = int(round(n**0.5))
    if side * side != n or side % 2 or group != 4:
        raise ValueError(f"spatial grouping needs an even square grid and group 4, got {n} tokens")
    # Output token (i, j) concatenates patches (2i,2j), (2i,2j+1), (2i+1,2j), (2i+1,2j+1).
    grid = feats.reshape(b, side // 2, 2, side // 2, 2, d).permute(0, 1, 3, 2, 4, 5)
    return grid.reshape(b, n // 4, 4 * d)


def grouped_projection_reference(
    feats: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    group: int = 4,
    layout: str = "sequence",
    drop_cls: bool = True,
    out: torch.Tensor | None = None,
    row_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Group, project; with `out` and `row_index`, place the rows into `out` (returned)."""
    grouped = group_tokens_reference(feats, group, layout, drop_cls)
    projected = F.linear(grouped, weight.to(feats.dtype), None if bias is None else bias.to(feats.dtype))
    if out is None:
        return projected
    if row_index is None:
        raise ValueError("out= needs row_index= (the rows of out that receive the image tokens)")
    flat = projected.reshape(-1, projected.shape[-1]).to(out.dtype)
    if flat.shape[0] != row_index.numel():
        raise ValueError(f"{flat.shape[0]} projected tokens but {row_index.numel()} row indices")
    return out.index_copy(0, row_index, flat)
