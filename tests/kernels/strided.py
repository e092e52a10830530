"""Non-contiguous, transposed and misaligned versions of a tensor with the same values.

Usage in a kernel test:

    from .strided import LAYOUTS, as_layout, layouts_for, guarded_empty, assert_gaps_untouched, ODD_SIZES

    @pytest.mark.parametrize("layout", LAYOUTS)
    def test_bias_any_layout(layout):
        bias = torch.randn(67, dtype=torch.bfloat16)
        if layout not in layouts_for(bias):
            pytest.skip(f"{layout} does not apply to a {bias.dim()}-D tensor")
        y = kernel(x, w, as_layout(bias, layout))            # an input in that layout
        ...
        out = guarded_empty((m, n), torch.bfloat16, "transposed")   # an output in that layout
        kernel(x, w, out=out)
        assert_gaps_untouched(out)                           # nothing written outside the view

Layouts (each keeps shape, dtype, device, values and requires_grad):
- "contiguous": a contiguous copy.
- "padded": rows longer than the last dim (row stride > size): contiguous rows, non-contiguous tensor.
- "strided": every stride doubled (last-dim stride 2, e.g. `x[..., ::2]`): no unit stride at all.
- "transposed": the last two dims stored column-major (`t.mT.contiguous().mT`), 2-D and up.
- "permuted": all dims stored in reverse order, 3-D and up (a transposed view of a [B, T, D] tensor).
- "offset": contiguous, but starting one element into its storage: the data pointer is not
  16-byte aligned, so a kernel that assumes aligned vector loads shows it.
Kernels under test must give the same values for every layout of every tensor argument (inputs,
outputs, bias, index tensors).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LAYOUTS = ("contiguous", "padded", "strided", "transposed", "permuted", "offset")

# Sizes that are not multiples of any block size a kernel uses (16, 32, 64, 128, ...), and 1.
ODD_SIZES = (1, 3, 17, 33, 67, 129)


def layouts_for(t: torch.Tensor | Sequence[int]) -> tuple[str, ...]:
    """The layouts that make sense for a tensor (or shape) of this many dims."""
    ndim = t.dim() if isinstance(t, torch.Tensor) else len(t)
    out = ["contiguous", "strided", "offset"]
    if ndim >= 2:
        out += ["padded", "transposed"]
    if ndim >= 3:
        out.append("permuted")
    if ndim == 0:
        out = ["contiguous", "offset"]
    return tuple(x for x in LAYOUTS if x in out)


def _fill_value(dtype: torch.dtype, fill: float | int | None):
    if fill is not None:
        return fill
    if dtype.is_floating_point or dtype.is_complex:
        return float("nan")
    if dtype == torch.bool:
        return True
    return torch.iinfo(dtype).max  # an index no kernel may produce


def _storage(shape: Sequence[int], dtype: torch.dtype, layout: str, device, fill) -> torch.Tensor:
    """An empty (fill-poisoned) tensor of `shape` with `layout`'s strides."""
    shape = tuple(int(s) for s in shape)
    fill = _fill_value(dtype, fill)
    ndim = len(shape)
    if layout not in LAYOUTS:
        raise ValueError(f"layout {layout!r}: expected one of {LAYOUTS}")
    if layout not in layouts_for(shape):
        raise ValueError(f"layout {layout!r} does not apply to a {ndim}-D tensor; use layouts_for()")
    if layout == "contiguous":
        return torch.full(shape, fill, dtype=dtype, device=device)
    if layout == "offset":
        base = torch.full((math.prod(shape) + 1,), fill, dtype=dtype, device=device)
        return base[1:].view(shape)
    if layout == "padded":
        base = torch.full((*shape[:-1], shape[-1] + 3), fill, dtype=dtype, device=device)
        return base[..., : shape[-1]]
    if layout == "strided":
        base = torch.full(tuple(2 * s for s in shape), fill, dtype=dtype, device=device)
        return base[tuple(slice(None, None, 2) for _ in shape)]
    if layout == "transposed":
        base = torch.full((*shape[:-2], shape[-1], shape[-2]), fill, dtype=dtype, device=device)
        return base.transpose(-1, -2)
    # permuted
    base = torch.full(shape[::-1], fill, dtype=dtype, device=device)
    return base.permute(*reversed(range(ndim)))


def as_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """`t`'s values in `layout` (a new tensor; a leaf with t's requires_grad if t is a leaf)."""
    out = _storage(t.shape, t.dtype, layout, t.device, None)
    with torch.no_grad():
        out.copy_(t)
    assert torch.equal(out, t) or (t.dtype.is_floating_point and torch.equal(torch.isnan(out), torch.isnan(t)))
    if layout != "contiguous":
        # a size-1 or empty tensor can be contiguous in any layout; everything else must not be
        assert t.numel() <= 1 or not out.is_contiguous() or layout == "offset", (layout, out.stride())
    return out.requires_grad_(t.requires_grad) if t.is_leaf else out


def guarded_empty(shape: Sequence[int], dtype: torch.dtype, layout: str, device=None, fill=None) -> torch.Tensor:
    """An output buffer in `layout`: the view and the storage gaps around it are poisoned (NaN,
    or the dtype's max for ints), so a kernel that skips an element or writes outside the view
    is caught by `assert_gaps_untouched` and by comparing the view with the reference."""
    return _storage(shape, dtype, layout, device, fill)


def _gap_mask(view: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the whole storage as a flat tensor, bool mask of the elements the view does not cover)."""
    n = view.untyped_storage().nbytes() // view.element_size()
    flat = torch.empty(0, dtype=view.dtype, device=view.device).set_(view.untyped_storage(), 0, (n,), (1,))
    covered = torch.zeros(n, dtype=torch.bool, device=view.device)
    torch.as_strided(covered, view.shape, view.stride(), view.storage_offset()).fill_(True)
    return flat, ~covered


def assert_gaps_untouched(view: torch.Tensor, fill=None) -> None:
    """Every storage element outside `view` still holds the poison `guarded_empty` put there."""
    flat, gaps = _gap_mask(view)
    outside = flat[gaps]
    fill = _fill_value(view.dtype, fill)
    if isinstance(fill, float) and math.isnan(fill):
        ok = torch.isnan(outside.float()) if outside.is_floating_point() else torch.zeros_like(outside, dtype=torch.bool)
    else:
        ok = outside == fill
    if not bool(ok.all()):
        bad = int((~ok).sum())
        raise AssertionError(f"{bad} storage element(s) outside the view were written (layout strides {view.stride()})")
