"""The NF4 oracles shared by the NF4 tests: the weight from the format's definition, and helpers."""

import torch

from pefomed.kernels.nf4 import NF4_CODE, NF4Tensor

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def reference_dequantize(q: NF4Tensor) -> torch.Tensor:
    """The weight from the format's definition, element by element in float64, rounded to fp32
    where bitsandbytes' arithmetic rounds (code8 * absmax2, + offset, code * absmax)."""
    n = q.numel()
    i = torch.arange(n)
    byte = q.packed.cpu().reshape(-1).long()[i // 2]
    code = torch.where(i % 2 == 0, byte >> 4, byte & 15)
    block = i // q.blocksize
    if q.nested:
        code8 = q.nested_code.cpu().double()[q.absmax.cpu().long()[block]]
        scaled = (code8 * q.nested_absmax.cpu().double()[block // q.nested_blocksize]).float().double()
        absmax = (scaled + q.offset.cpu().double()).float().double()
    else:
        absmax = q.absmax.cpu().double()[block]
    weight = (NF4_CODE.double()[code] * absmax).float().double()
    return weight.reshape(q.shape) if q.is_contiguous() else weight.reshape(q.shape[1], q.shape[0]).t()


def heavy_tailed(shape, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape) * torch.randn(shape).exp()).to(dtype)  # spreads the absmax


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative Frobenius error of `a` against the float64 reference `b`."""
    return float((a.detach().double().cpu() - b.cpu()).norm() / b.cpu().norm())
