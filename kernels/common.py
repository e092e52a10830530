"""Small Triton helpers shared by the kernels: dots, and the one definition of the LoRA dropout mask.

Dropout mask
  Element (m, k) of the 2-D view [M, K] of the dropped input is kept iff word `k mod 4` of
  Philox4x32-10 (key = seed, counter = (m * 2*ceil(K/8) + k div 4, 0, 0, 0)) is at least
  `t = fp32(p) * 2**32` (an exact integer), so P(dropped) = fp32(p) up to 2**-32. One Philox call
  gives four elements (`tl.randint4x`), and two calls give one byte of the bit-packed mask: byte
  `(m, b)` holds elements `8b .. 8b+7`, bit i for element `8b + i`.

  `mask_bytes` draws whole bytes (two Philox calls per 8 elements); `keep_mask` draws single
  elements of the same mask for kernels without the packed bytes; `keep_bits` unpacks loaded
  bytes. SASS instructions per element on sm_90a (tests/kernels/test_lora.py::
  test_packed_mask_is_cheaper_than_redrawing_philox prints them): drawing bytes 18, `keep_mask`
  20 (the compiler shares one Philox call among the 4 aligned elements a thread holds), one
  `tl.rand` per element 65, unpacking 4.5. So the LoRA forward draws the mask once, stores it
  packed (M*K/8 bytes) and the backward kernels unpack it; see kernels/lora.py.
"""

import triton
import triton.language as tl


@triton.jit
def dot_acc(acc, a, b, IEEE: tl.constexpr):
    """acc + a @ b; IEEE picks exact fp32 products (fp32 inputs) over TF32."""
    if IEEE:
        acc += tl.dot(a, b, input_precision="ieee")
    else:
        acc += tl.dot(a, b)
    return acc


@triton.jit
def _drop_threshold(p):
    # fp32(p) * 2**32 is exact (a power-of-two scale) and below 2**32 for p < 1, so every kernel
    # that receives p as its fp32 argument derives the same integer threshold.
    return (tl.to_tensor(p).to(tl.float32) * 4294967296.0).to(tl.uint32)


@triton.jit
def _row_counter(rows, n_cols):
    # 64-bit: Philox takes the counter as two 32-bit words, so M*K beyond 2**32 does not wrap.
    return rows.to(tl.int64) * (2 * tl.cdiv(n_cols, 8))


@triton.jit
def mask_bytes(seed, rows, byte_cols, n_cols, p):
    """The packed keep-mask bytes [len(rows), len(byte_cols)] (int32 holding 0..255) of a
    row-major [*, n_cols] tensor; byte b covers columns 8b .. 8b+7 (bit i = column 8b + i)."""
    t = _drop_threshold(p)
    counter = _row_counter(rows, n_cols)[:, None] + 2 * byte_cols.to(tl.int64)[None, :]
    a0, a1, a2, a3 = tl.randint4x(seed, counter)
    b0, b1, b2, b3 = tl.randint4x(seed, counter + 1)
    low = (
        (a0 >= t).to(tl.int32)
        | ((a1 >= t).to(tl.int32) << 1)
        | ((a2 >= t).to(tl.int32) << 2)
        | ((a3 >= t).to(tl.int32) << 3)
    )
    high = (
        (b0 >= t).to(tl.int32)
        | ((b1 >= t).to(tl.int32) << 1)
        | ((b2 >= t).to(tl.int32) << 2)
        | ((b3 >= t).to(tl.int32) << 3)
    )
    return low | (high << 4)


@triton.jit
def keep_bits(packed):
    """Bytes [R, C] -> keep-mask [R, C, 8] (element 8c + i of row r at [r, c, i]).

    Callers load their data as [R, C, 8] tiles too (8 contiguous elements = one 128-bit bf16
    load), so the unpacking stays inside each thread's registers, then `tl.reshape` to [R, 8C].
    """
    return ((packed.to(tl.int32)[:, :, None] >> tl.arange(0, 8)[None, None, :]) & 1) != 0


@triton.jit
def keep_mask(seed, rows, cols, n_cols, p):
    """The keep-mask of the tile (rows x cols) of a row-major [*, n_cols] tensor, element by element.

    The same mask as `mask_bytes`, for kernels without the packed mask (one full Philox call per
    element: prefer loading the packed bytes and `keep_bits`).
    """
    t = _drop_threshold(p)
    cols64 = cols.to(tl.int64)[None, :]
    counter = _row_counter(rows, n_cols)[:, None] + cols64 // 4
    w0, w1, w2, w3 = tl.randint4x(seed, counter)
    word = cols64 % 4
    picked = tl.where(word == 0, w0, tl.where(word == 1, w1, tl.where(word == 2, w2, w3)))
    return picked >= t


# --- per-arch autotune lists (checked by the compile gate, bench/static.py) --------------------
#
# A config that fails an arch in `python -m pefomed.bench.static` (spills, shared memory over the
# per-block limit, ...) is excluded on that arch by its `config_id`:
#
#     EXCLUDE = {86: {"BLOCK_M=128,BLOCK_N=256,BLOCK_K=64,GROUP_M=8,w8,s3"}}
#     _tuned = triton.autotune(configs=CONFIGS, key=[...],
#                              prune_configs_by={"early_config_prune": prune_for_device(EXCLUDE)})
#
# The gate reads EXCLUDE back from the autotuner, checks that every config left on an arch passes
# and that each arch keeps at least one.

GATE_ARCHS = (80, 86, 90)


def config_id(cfg: triton.Config) -> str:
    """Stable name of a config: its meta-parameters, then w<num_warps>, s<num_stages>."""
    parts = [f"{k}={v}" for k, v in sorted(cfg.kwargs.items())]
    parts += [f"w{cfg.num_warps}", f"s{cfg.num_stages}"]
    if getattr(cfg, "num_ctas", 1) not in (None, 1):
        parts.append(f"c{cfg.num_ctas}")
    if getattr(cfg, "maxnreg", None):
        parts.append(f"r{cfg.maxnreg}")
    return ",".join(parts)


def gate_arch(capability: tuple[int, int]) -> int:
    """The gate arch whose limits a device of this compute capability has.

    sm_80 / sm_87: 163 KB shared memory per block; sm_86 / sm_89 (A40, L40, RTX): 99 KB;
    sm_90 and newer: 227 KB.
    """
    major, minor = capability
    if major >= 9:
        return 90
    if major == 8 and minor in (6, 9):
        return 86
    return 80


def configs_for(configs, arch: int, exclude=None) -> list:
    """`configs` without those `exclude[arch]` names; at least one must stay."""
    dropped = set((exclude or {}).get(arch, ()))
    kept = [c for c in configs if config_id(c) not in dropped]
    if not kept:
        raise RuntimeError(
            f"every autotune config is excluded on sm_{arch}; the compile gate (python -m pefomed.bench.static) "
            "requires at least one valid config per arch"
        )
    return kept


class prune_for_device:
    """`early_config_prune` for triton.autotune: drops the configs EXCLUDE names for the device's arch.

    The device is the one of the first tensor argument; `exclude` stays readable (`.exclude`) so
    that the compile gate checks the same table.
    """

    def __init__(self, exclude):
        self.exclude = {int(a): frozenset(v) for a, v in exclude.items()}

    def __call__(self, configs, named_args, **kwargs):
        import torch

        device = next((v.device for v in named_args.values() if isinstance(v, torch.Tensor)), None)
        if device is None or device.type != "cuda":
            return list(configs)
        return configs_for(configs, gate_arch(torch.cuda.get_device_capability(device)), self.exclude)
