"""4-bit NF4 weights in bitsandbytes' format: quantize, dequantize (Triton), fused dequant-matmul.

Format (bitsandbytes `quantize_4bit(..., quant_type="nf4")`): the weight is flattened row-major
and cut into blocks of 64; each block is scaled by its absmax into [-1, 1] and each value is
rounded to the nearest of the 16 NF4 code values; two 4-bit codes share a byte, the first
(even) element in the high nibble. With double quantization the fp32 absmax vector is stored
as `absmax - mean` quantized blockwise (blocks of 256) to 8 bits with bitsandbytes' signed
dynamic map, plus the mean (`offset`) and the per-256-block absmax (`nested_absmax`).

Dequantization is `code[q] * absmax` in fp32, then a cast: the same operations bitsandbytes
runs, so `dequantize_nf4` is bit-identical to `bitsandbytes.functional.dequantize_4bit` for the
same quantized state. Quantization matches bitsandbytes exactly for the 4-bit codes and the
absmax; the 8-bit nested absmax codes use exact nearest rounding, while bitsandbytes' CPU
library rounds a few values lying within ~1e-5 of a midpoint the other way (about 0.2% of the
absmax codes), so after double quantization those blocks differ by one 8-bit step of absmax.

`nf4_matmul(x, q, bias, lora_xa=None, lora_b=None, scaling)` is a tiled GEMM whose W-tile
loads unpack and dequantize the 4-bit codes in registers (the weight is read once, as 4 bits),
with the bias and an optional LoRA term `scaling * lora_xa @ lora_b^T` added in the epilogue;
`nf4_matmul_t(dy, q)` is `dy @ W` for the backward. Small M (decode, evaluation) and large M
(training) get different tile shapes. `nf4_linear(x, q, bias)` is the autograd wrapper.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.common import dot_acc

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230731010437, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
], dtype=torch.float32)


def dynamic_map_signed() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map: 7 decades of means of linear fractions, +-, 0, 1."""
    data: list[float] = []
    for i in range(7):
        boundaries = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        data += ((10 ** (-6 + i)) * means).tolist()
        data += (-(10 ** (-6 + i)) * means).tolist()
    data += [0.0, 1.0]
    data.sort()
    return torch.tensor(data, dtype=torch.float32)


@dataclass
class NF4Weight:
    """A frozen weight stored as NF4; not a tensor, so it sits in a module as a plain attribute."""

    packed: torch.Tensor  # uint8 [ceil(n/2), 1], high nibble first
    absmax: torch.Tensor  # fp32 [n_blocks], or uint8 codes when nested
    shape: tuple[int, ...]
    dtype: torch.dtype
    blocksize: int = 64
    offset: torch.Tensor | None = None  # fp32 scalar (nested)
    nested_absmax: torch.Tensor | None = None  # fp32 [ceil(n_blocks/256)]
    nested_code: torch.Tensor | None = None  # fp32 [256]
    nested_blocksize: int = 256

    @property
    def nested(self) -> bool:
        return self.offset is not None

    @property
    def device(self) -> torch.device:
        return self.packed.device

    def to(self, device) -> NF4Weight:
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return NF4Weight(self.packed.to(device), self.absmax.to(device), self.shape, self.dtype, self.blocksize,
                         move(self.offset), move(self.nested_absmax), move(self.nested_code), self.nested_blocksize)

    def block_absmax(self) -> torch.Tensor:
        """The fp32 absmax per 64-block, as bitsandbytes rebuilds it (code8[q] * absmax2 + offset)."""
        if not self.nested:
            return self.absmax.float()
        scale = self.nested_absmax.repeat_interleave(self.nested_blocksize)[: self.absmax.numel()]
        absmax = self.nested_code[self.absmax.long()] * scale
        return absmax + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return dequantize_nf4(self, dtype)

    # --- bitsandbytes Linear4bit state dicts --------------------------------------------------

    def to_bnb_state_dict(self, prefix: str = "weight") -> dict[str, torch.Tensor]:
        state = {
            prefix: self.packed,
            f"{prefix}.absmax": self.absmax,
            f"{prefix}.quant_map": NF4_CODE.to(self.device),
        }
        meta = {"quant_type": "nf4", "blocksize": self.blocksize, "dtype": str(self.dtype).removeprefix("torch."),
                "shape": list(self.shape)}
        if self.nested:
            state[f"{prefix}.nested_absmax"] = self.nested_absmax
            state[f"{prefix}.nested_quant_map"] = self.nested_code
            meta.update(nested_blocksize=self.nested_blocksize, nested_dtype="float32", nested_offset=float(self.offset))
        packed_json = torch.tensor(list(json.dumps(meta).encode("utf-8")), dtype=torch.uint8)
        state[f"{prefix}.quant_state.bitsandbytes__nf4"] = packed_json
        return state

    @classmethod
    def from_bnb_state_dict(cls, state: dict[str, torch.Tensor], prefix: str = "weight") -> NF4Weight:
        key = f"{prefix}.quant_state.bitsandbytes__nf4"
        if key not in state:
            raise ValueError(f"{key} missing: not a bitsandbytes NF4 state dict (fp4 or 8-bit weights are not supported)")
        meta = json.loads(bytes(state[key].tolist()).decode("utf-8"))
        nested = "nested_absmax" in meta or f"{prefix}.nested_absmax" in state
        return cls(
            packed=state[prefix].view(torch.uint8),
            absmax=state[f"{prefix}.absmax"],
            shape=tuple(meta["shape"]),
            dtype=getattr(torch, meta["dtype"]),
            blocksize=int(meta["blocksize"]),
            offset=torch.tensor(meta["nested_offset"], dtype=torch.float32) if nested else None,
            nested_absmax=state[f"{prefix}.nested_absmax"] if nested else None,
            nested_code=state[f"{prefix}.nested_quant_map"] if nested else None,
            nested_blocksize=int(meta.get("nested_blocksize", 256)),
        )


# --- quantization (torch; runs once per weight at load time) ---------------------------------

def _blockwise_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    n = flat.numel()
    full = n - n % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().max(dim=-1)[0]
    if n % blocksize:
        absmax = torch.cat([absmax, flat[full:].abs().max()[None]])
    return absmax


def _scaled(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int) -> torch.Tensor:
    """Each value times 1/absmax of its block, clamped to [-1, 1] (bitsandbytes' order of ops)."""
    n = flat.numel()
    full = n - n % blocksize
    scaled = torch.clamp(flat[:full].reshape(-1, blocksize) * (1.0 / absmax[: full // blocksize].clamp(min=1e-38).view(-1, 1)), -1, 1).reshape(-1)
    if n % blocksize:
        tail = absmax[-1].clamp(min=1e-38)
        scaled = torch.cat([scaled, torch.clamp(flat[full:] / tail, -1, 1)])
    return scaled


def quantize_nf4(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    flat = w.detach().reshape(-1).float()
    code = NF4_CODE.to(flat.device)
    absmax = _blockwise_absmax(flat, blocksize)
    scaled = _scaled(flat, absmax, blocksize)
    if scaled.numel() % 2:
        scaled = torch.nn.functional.pad(scaled, (0, 1))
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2, out_int32=True).to(torch.uint8)
    packed = ((q[::2] << 4) | q[1::2]).unsqueeze(1)
    if not double_quant:
        return NF4Weight(packed, absmax, tuple(w.shape), w.dtype, blocksize)
    offset = absmax.mean()
    centred = absmax - offset
    nested_code = dynamic_map_signed().to(flat.device)
    nested_absmax = _blockwise_absmax(centred, 256)
    scaled2 = (centred * (1.0 / nested_absmax.repeat_interleave(256)[: centred.numel()])).clamp(-1, 1)
    q2 = torch.bucketize(scaled2, (nested_code[:-1] + nested_code[1:]) / 2, out_int32=True).to(torch.uint8)
    return NF4Weight(packed, q2, tuple(w.shape), w.dtype, blocksize, offset, nested_absmax, nested_code)


# --- dequantization -----------------------------------------------------------------------------

@triton.jit
def _dequant_kernel(packed, absmax, code, out, n, BLOCKSIZE: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    byte = tl.load(packed + offs // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(offs % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(code + nibble, mask=mask, other=0.0) * tl.load(absmax + offs // BLOCKSIZE, mask=mask, other=0.0)
    tl.store(out + offs, value.to(out.dtype.element_ty), mask=mask)


def dequantize_nf4_reference(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    n = 1
    for s in q.shape:
        n *= s
    codes = torch.empty(q.packed.numel() * 2, dtype=torch.long, device=q.device)
    codes[::2] = (q.packed.reshape(-1) >> 4).long()
    codes[1::2] = (q.packed.reshape(-1) & 15).long()
    values = NF4_CODE.to(q.device)[codes[:n]]
    absmax = q.block_absmax().repeat_interleave(q.blocksize)[:n]
    return (values * absmax).reshape(q.shape).to(dtype or q.dtype)


def dequantize_nf4(q: NF4Weight, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The full-precision weight, bit-identical to bitsandbytes' dequantize_4bit."""
    out = torch.empty(q.shape, dtype=dtype or q.dtype, device=q.device)
    n = out.numel()
    block = 256 if INTERPRET else 1024
    _dequant_kernel[(triton.cdiv(n, block),)](
        q.packed, q.block_absmax().contiguous(), NF4_CODE.to(q.device), out, n, BLOCKSIZE=q.blocksize, BLOCK=block,
    )
    return out


# --- fused dequant + matmul ---------------------------------------------------------------------

@triton.jit
def _nf4_tile(packed, absmax, code, rows, cols, K, N_ROWS, BLOCKSIZE: tl.constexpr):
    """Dequantized W[rows, cols] (W is [N_ROWS, K] row-major), fp32, zero outside."""
    flat = rows[:, None] * K + cols[None, :]
    mask = (rows[:, None] < N_ROWS) & (cols[None, :] < K)
    byte = tl.load(packed + flat // 2, mask=mask, other=0).to(tl.int32)
    nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)
    value = tl.load(code + nibble, mask=mask, other=0.0) * tl.load(absmax + flat // BLOCKSIZE, mask=mask, other=0.0)
    return tl.where(mask, value, 0.0)


@triton.jit
def _nf4_matmul_kernel(x, packed, absmax, code, bias, xa, lora_b, out, M, N, K, R, scaling,
                       stride_xm, stride_am, stride_bn, stride_om,
                       HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCKSIZE: tl.constexpr, IEEE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BR: tl.constexpr):
    """out = x @ W^T (+ bias) (+ scaling * xa @ lora_b^T); W dequantized in the K-loop."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        ks = k0 + tl.arange(0, BK)
        a = tl.load(x + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        w = _nf4_tile(packed, absmax, code, cols, ks, K, N, BLOCKSIZE)  # [BN, BK]
        w = w.to(x.dtype.element_ty).to(tl.float32)  # the weight as bitsandbytes hands it to F.linear
        acc = dot_acc(acc, a.to(tl.float32), tl.trans(w), IEEE)
    if HAS_BIAS:
        acc += tl.load(bias + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    if HAS_LORA:
        rs = tl.arange(0, BR)
        xa_t = tl.load(xa + rows[:, None] * stride_am + rs[None, :], mask=(rows[:, None] < M) & (rs[None, :] < R), other=0.0)
        b_t = tl.load(lora_b + cols[None, :] * stride_bn + rs[:, None], mask=(cols[None, :] < N) & (rs[:, None] < R), other=0.0)
        acc += scaling * tl.dot(xa_t.to(tl.float32), b_t.to(tl.float32))
    tl.store(out + rows[:, None] * stride_om + cols[None, :], acc.to(out.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))


@triton.jit
def _nf4_matmul_t_kernel(dy, packed, absmax, code, out, M, N, K, stride_dm, stride_om,
                         BLOCKSIZE: tl.constexpr, IEEE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """out[M, K] = dy[M, N] @ W[N, K]."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    ks = pid_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BM, BK), dtype=tl.float32)
    for n0 in range(0, N, BN):
        ns = n0 + tl.arange(0, BN)
        g = tl.load(dy + rows[:, None] * stride_dm + ns[None, :], mask=(rows[:, None] < M) & (ns[None, :] < N), other=0.0)
        w = _nf4_tile(packed, absmax, code, ns, ks, K, N, BLOCKSIZE)  # [BN, BK]
        w = w.to(dy.dtype.element_ty).to(tl.float32)
        acc = dot_acc(acc, g.to(tl.float32), w, IEEE)
    tl.store(out + rows[:, None] * stride_om + ks[None, :], acc.to(out.dtype.element_ty),
             mask=(rows[:, None] < M) & (ks[None, :] < K))


def _tiles(m: int) -> tuple[int, int, int]:
    if INTERPRET:
        return 16, 16, 16
    return (16, 64, 128) if m <= 16 else (64, 128, 64)  # decode-sized M gets tall-K tiles


def nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None, *,
               lora_xa: torch.Tensor | None = None, lora_b: torch.Tensor | None = None, scaling: float = 1.0) -> torch.Tensor:
    n_out, k = q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    out = torch.empty(m, n_out, device=x.device, dtype=x.dtype)
    bm, bn, bk = _tiles(m)
    has_lora = lora_xa is not None
    r = lora_xa.shape[-1] if has_lora else 1
    xa = lora_xa.reshape(m, r).contiguous() if has_lora else x2
    b = lora_b.contiguous() if has_lora else x2
    _nf4_matmul_kernel[(triton.cdiv(m, bm), triton.cdiv(n_out, bn))](
        x2, q.packed, q.block_absmax().contiguous(), NF4_CODE.to(x.device), bias if bias is not None else x2, xa, b, out,
        m, n_out, k, r, float(scaling), x2.stride(0), xa.stride(0), b.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, BLOCKSIZE=q.blocksize, IEEE=x.dtype == torch.float32,
        BM=bm, BN=bn, BK=bk, BR=max(16, triton.next_power_of_2(r)),
    )
    return out.reshape(*lead, n_out)


def nf4_matmul_t(dy: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    n_out, k = q.shape
    lead = dy.shape[:-1]
    g = dy.reshape(-1, n_out).contiguous()
    m = g.shape[0]
    out = torch.empty(m, k, device=dy.device, dtype=dy.dtype)
    bm, bn, bk = _tiles(m)
    _nf4_matmul_t_kernel[(triton.cdiv(m, bm), triton.cdiv(k, bk))](
        g, q.packed, q.block_absmax().contiguous(), NF4_CODE.to(dy.device), out, m, n_out, k, g.stride(0), out.stride(0),
        BLOCKSIZE=q.blocksize, IEEE=dy.dtype == torch.float32, BM=bm, BN=bn, BK=bk,
    )
    return out.reshape(*lead, k)


class NF4LinearFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bias, q):
        ctx.q = q
        ctx.has_bias = bias is not None
        return nf4_matmul(x, q, bias)

    @staticmethod
    def backward(ctx, grad):
        dx = nf4_matmul_t(grad, ctx.q) if ctx.needs_input_grad[0] else None
        db = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, db, None


def nf4_linear(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`x @ dequant(q)^T + bias` with backward to x (and bias); the NF4 weight gets no grad."""
    return NF4LinearFunction.apply(x, bias, q)
