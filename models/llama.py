"""LLaMA-2 (MHA), LLaMA-3 (GQA, llama3 RoPE scaling) and Mistral-7B in one implementation.

Modules are named exactly as in the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, ...) and RoPE is HF's rotate-half form, so a checkpoint
loads with no rename and no q/k permutation. Every projection is made through a
`linear_factory(name, in, out, bias)`: the caller decides what each projection is (the engine
builds its adapters and quantized layers there, see engine/lora.py); the default is `nn.Linear`.
The elementwise ops (RMSNorm, SwiGLU, RoPE) come from `LlamaOps`: lean autograd functions that
save only their inputs (the default), or the engine's Triton kernels.

The hot path of a training step (`LlamaForCausalLM.loss`):
- no attention mask: right-padded rows run causal attention (`is_causal`, the fused kernels),
  since padding after a row's last real token reaches no real token; packed rows (`Packing`)
  run block-diagonal causal attention: flash-attn's varlen kernel, xformers'
  `BlockDiagonalCausalMask`, or SDPA segment by segment;
- GQA through SDPA's `enable_gqa` (flash-attn and xformers take grouped heads too): k and v are
  never repeated;
- `lm_head` only on the rows whose next token is a target, in chunks, gradients computed in the
  same pass (`LMHead`), so the `[tokens, vocab]` logits never exist;
- no host sync, when the data pipeline hands over the target rows (`TargetRows`).

Decoding keeps a static KV cache (gpt-fast's): the slot mask and the RoPE table are made once
per prompt and looked up at each step. Attention runs through `F.scaled_dot_product_attention`
by default; flash-attn or xformers run when `attn_implementation` asks for them, where the mask
is causal, absent or packed; left padding goes through SDPA with an explicit boolean mask.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pefomed.models.loading import (
    CheckpointError,
    iter_state_dict,
    load_into,
    meta_tensor_names,
)

LinearFactory = Callable[[str, int, int, bool], nn.Module]

REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
MODEL_TYPES = ("llama", "mistral")
ATTENTION_PACKAGES = {"sdpa": None, "flash_attention_2": "flash_attn", "xformers": "xformers.ops"}
ROPE_TYPES = ("default", "linear", "llama3")
IGNORE_INDEX = -100  # labels that carry no loss (prompt, image and padding positions)
LLAMA3_ROPE_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# transformers' defaults when config.json omits a key; they depend on the model type.
HF_DEFAULTS = {
    "llama": {"max_position_embeddings": 2048},
    "mistral": {"max_position_embeddings": 4096 * 32, "sliding_window": 4096},
}


def default_linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


# ---------------------------------------------------------------- config


@dataclass
class LlamaConfig:
    """The fields of a HF LLaMA / Mistral config.json that change the computation."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: MHA (LLaMA-2)
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3", factor, ...}
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral
    model_type: str = "llama"
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    pad_token_id: int | None = None
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads="
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type={self.model_type!r}: expected one of {MODEL_TYPES}")
        if self.attn_implementation not in ATTENTION_PACKAGES:
            raise ValueError(
                f"attn_implementation={self.attn_implementation!r}: expected one of {sorted(ATTENTION_PACKAGES)}"
            )
        self.rope_scaling = _checked_rope_scaling(self.rope_scaling)

    @classmethod
    def from_hf(cls, source: str | Path | dict[str, Any]) -> LlamaConfig:
        """Read a Hugging Face config.json (a model folder, the file, or its parsed dict)."""
        where, raw = _read_config_json(source)
        missing = [k for k in REQUIRED_KEYS if raw.get(k) is None]
        if missing:
            raise CheckpointError(f"{where}: missing required key(s) {missing}")
        model_type = raw.get("model_type", "llama")
        if model_type not in MODEL_TYPES:
            raise CheckpointError(
                f"{where}: model_type={model_type!r} is not supported here (expected one of {MODEL_TYPES})"
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{where}: hidden_act={raw['hidden_act']!r}; LLaMA and Mistral use 'silu'")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {**HF_DEFAULTS[model_type], **{k: v for k, v in raw.items() if k in known}}
        values.update(_rope_fields(raw))
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: {e}") from e

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json dict that transformers (4.x and 5.x) reads back into the same model."""
        d = dataclasses.asdict(self)
        d.pop("attn_implementation")
        d["architectures"] = ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"]
        d["hidden_act"] = "silu"
        if self.model_type == "mistral":
            # MistralConfig has no bias fields; it would store them as unknown attributes.
            d.pop("attention_bias")
            d.pop("mlp_bias")
        return d


def _read_config_json(source: str | Path | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    if isinstance(source, dict):
        return "<config dict>", source
    path = Path(source)
    path = path if path.suffix == ".json" else path / "config.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{path}: missing; a model folder needs its config.json") from e
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return str(path), raw


def _rope_fields(raw: dict[str, Any]) -> dict[str, Any]:
    """rope_theta and rope_scaling from either transformers 4 keys or 5's `rope_parameters`."""
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    out: dict[str, Any] = {}
    theta = rope.pop("rope_theta", raw.get("rope_theta"))
    if theta is not None:
        out["rope_theta"] = float(theta)
    kind = rope.get("rope_type") or rope.get("type")
    out["rope_scaling"] = None if kind in (None, "default") else {**rope, "rope_type": kind}
    return out


def _checked_rope_scaling(scaling: dict[str, Any] | None) -> dict[str, Any] | None:
    if not scaling:
        return None
    scaling = {**scaling, "rope_type": scaling.get("rope_type") or scaling.get("type")}
    scaling.pop("type", None)
    kind = scaling["rope_type"]
    if kind not in ROPE_TYPES:
        raise ValueError(f"rope_scaling type {kind!r} is not supported (expected one of {ROPE_TYPES})")
    needed = LLAMA3_ROPE_KEYS if kind == "llama3" else ("factor",) if kind == "linear" else ()
    absent = [k for k in needed if k not in scaling]
    if absent:
        raise ValueError(f"rope_scaling of type {kind!r} needs {absent}")
    return None if kind == "default" else scaling


LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}
_LLAMA2_7B = {
    "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
}
_LLAMA3_8B = {
    "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
    "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001,
}
CONFIGS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(**_LLAMA2_7B),
    "llama2-7b-chat": LlamaConfig(**_LLAMA2_7B),
    "llama3-8b": LlamaConfig(**_LLAMA3_8B),
    "llama3-8b-instruct": LlamaConfig(**{**_LLAMA3_8B, "eos_token_id": 128009}),
    "llama3.1-8b": LlamaConfig(
        **{**_LLAMA3_8B, "max_position_embeddings": 131072, "rope_scaling": LLAMA3_ROPE_SCALING}
    ),
    "mistral-7b": LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=32768, rms_norm_eps=1e-5,
        model_type="mistral", sliding_window=4096,
    ),
    # The demo's base model: small enough to train on 2 CPU cores in minutes.
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256,
    ),
    "tiny-llama3": LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rope_theta=500000.0,
        rope_scaling={**LLAMA3_ROPE_SCALING, "original_max_position_embeddings": 16},
    ),
    "tiny-mistral": LlamaConfig(
        vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, model_type="mistral", sliding_window=8,
    ),
}


# ---------------------------------------------------------------- lean autograd ops
#
# Liger's idea in plain PyTorch: each op saves only its inputs and recomputes the cheap
# elementwise parts in backward, so autograd keeps no intermediate. The math is HF's exactly
# (LlamaRMSNorm normalizes in fp32 and casts back before the scale; rotate-half RoPE; SiLU(gate)
# * up), and the `*_reference` functions beside them are that math as plain autograd, the oracle
# of the tests. `engine.ops.KernelOps` may hand the model Triton versions with the same
# signatures (`LlamaOps`); these are the default and the `kernels: torch` path.


def _norm_dtype(x: torch.Tensor) -> torch.dtype:
    # HF normalizes in fp32; float64 (the tests' oracles) stays float64 rather than losing digits.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _rms_scale(x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor) -> torch.Tensor:
    """HF's `weight * (x * rstd).to(x.dtype)`: the same bits in forward and in any recompute."""
    normed = (x.to(rstd.dtype) * rstd).to(x.dtype)
    return normed.mul_(weight) if normed.dtype == weight.dtype else weight * normed


class _RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(_norm_dtype(x))
        rstd = torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
        out = _rms_scale(x, weight, rstd)
        ctx.save_for_backward(x, weight, rstd)
        # How to make `out` again from what this node keeps anyway: a consumer that would save
        # `out` for its backward (kernels.torch_lora, for the LoRA A gradient) keeps these instead,
        # so q/k/v's (gate/up's) shared input costs no bytes of its own between forward and backward.
        # Not under torch.compile: a traced graph keeps what its partitioner chooses.
        if not torch.compiler.is_compiling():
            out.recompute_from = (_rms_scale, (x, weight, rstd), out._version)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, rstd = ctx.saved_tensors
        n = x.to(rstd.dtype) * rstd
        grad_x = grad_w = None
        if ctx.needs_input_grad[1]:
            grad_w = (grad * n.to(x.dtype)).reshape(-1, weight.shape[0]).sum(0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            # Through the cast to x's dtype, as autograd of HF's graph goes.
            dn = (grad * weight).to(x.dtype).to(rstd.dtype)
            proj = (dn * n).mean(-1, keepdim=True)
            grad_x = dn.sub_(n.mul_(proj)).mul_(rstd).to(x.dtype)
        return grad_x, grad_w, None


class _SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate, up)
        return F.silu(gate).mul_(up)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        gate, up = ctx.saved_tensors
        grad_gate = grad_up = None
        if ctx.needs_input_grad[0]:
            grad_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            grad_up = F.silu(gate).mul_(grad)
        return grad_gate, grad_up


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, sign: float) -> torch.Tensor:
    """`x * cos + sign * rotate_half(x) * sin` for sign 1; for -1 the transpose `x*cos - R(x*sin)`.

    Written into one output, without rotate_half's concatenated copy. The backward needs the
    transpose of the rotation, `-rotate_half`, applied after the multiplication by sin (the halves
    of a table need not be equal for this to hold).
    """
    half = x.shape[-1] // 2
    out = x * cos
    if sign > 0:
        out[..., :half].addcmul_(x[..., half:], sin[..., :half], value=-1.0)
        out[..., half:].addcmul_(x[..., :half], sin[..., half:])
    else:
        out[..., :half].addcmul_(x[..., half:], sin[..., half:])
        out[..., half:].addcmul_(x[..., :half], sin[..., :half], value=-1.0)
    return out


class _RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D] against [B, H, T, D]
        ctx.save_for_backward(cos, sin)
        return _rotate(q, cos, sin, 1.0), _rotate(k, cos, sin, 1.0)

    @staticmethod
    def backward(ctx, grad_q: torch.Tensor, grad_k: torch.Tensor):
        cos, sin = ctx.saved_tensors
        dq = _rotate(grad_q, cos, sin, -1.0) if ctx.needs_input_grad[0] else None
        dk = _rotate(grad_k, cos, sin, -1.0) if ctx.needs_input_grad[1] else None
        return dq, dk, None, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """LlamaRMSNorm: saves x and the fp32 `rstd [.., 1]`, recomputes the normalized x in backward."""
    return _RMSNormFunction.apply(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """`silu(gate) * up`: saves gate and up (not silu(gate)), recomputes the rest in backward."""
    return _SwiGLUFunction.apply(gate, up)


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate-half RoPE of q `[B, H, T, D]` and k `[B, KVH, T, D]` by cos, sin `[B, T, D]`."""
    return _RoPEFunction.apply(q, k, cos, sin)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    dtype = x.dtype
    x = x.to(_norm_dtype(x))
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rope_reference(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


apply_rope = rope_reference  # HF's name for the same function


@dataclass(frozen=True)
class LlamaOps:
    """The elementwise ops the model calls: `rms_norm(x, weight, eps)`, `swiglu(gate, up)`,
    `rope(q, k, cos, sin)`. The engine may pass Triton kernels here (engine/ops.py); the default
    is the lean PyTorch autograd above, and `REFERENCE_OPS` is plain autograd of HF's math."""

    rms_norm: Callable[..., torch.Tensor] = rms_norm
    swiglu: Callable[..., torch.Tensor] = swiglu
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]] = rope


LEAN_OPS = LlamaOps()
REFERENCE_OPS = LlamaOps(rms_norm_reference, swiglu_reference, rope_reference)


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, fn: Callable[..., torch.Tensor] | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.fn = fn or rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.weight, self.eps)


def rope_inv_freq(config: LlamaConfig, device: torch.device | str | None = None) -> torch.Tensor:
    dim = config.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    return _llama3_scaled(inv_freq, scaling)


def _llama3_scaled(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """LLaMA-3.1's frequency-dependent stretch: long wavelengths / factor, short ones kept."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos and sin of every position, computed once into a table and looked up by position id.

    The table is HF's arithmetic (`position * inv_freq` in fp32, duplicated halves, cos and sin)
    so a lookup equals HF's per-call computation bit for bit. It grows (doubling) to the longest
    position asked for and is kept per device; it is derived data, not a buffer, so it is in no
    checkpoint and survives `.to()` by being rebuilt on the new device.
    """

    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        # Not in checkpoints; recomputed by reset_buffers() after a meta-device build.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def reset_buffers(self) -> None:
        device = "cpu" if self.inv_freq.is_meta else self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.config, device=device)
        self._tables = {}

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos, sin `[>= length, head_dim]` on `device`."""
        table = self._tables.get(device)
        if table is None or table[0].shape[0] < length:
            size = max(64, 1 << max(0, length - 1).bit_length())
            positions = torch.arange(size, device=device, dtype=torch.float32)
            freqs = positions[:, None] * self.inv_freq.float().to(device)[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            table = (emb.cos(), emb.sin())
            self._tables[device] = table
        return table

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype, max_position: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin `[*position_ids.shape, head_dim]` in `dtype`.

        `max_position` bounds the ids from above (a host integer the caller knows from shapes),
        so the table size never needs a look at the ids on the device.
        """
        if max_position is None:
            max_position = int(position_ids.max()) + 1 if position_ids.numel() else 1
        cos, sin = self.tables(max_position, position_ids.device)
        return cos[position_ids].to(dtype), sin[position_ids].to(dtype)


# ---------------------------------------------------------------- attention


@dataclass(frozen=True)
class Packing:
    """Several sequences laid end to end in each row of `[R, L]` (the rows flattened to R*L).

    `cu_seqlens` (int32, `[segments + 1]`) are the segment offsets into the flattened tokens and
    cover all R*L of them (a row's padding tail is a segment of its own, attending only to
    itself); `max_seqlen` and `lengths` are the same facts on the host, for flash-attn's
    arguments, xformers' block mask and SDPA's per-segment loop, so that no backend has to read
    them back from the device.
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    lengths: tuple[int, ...]

    @classmethod
    def from_lengths(cls, lengths: Iterable[int], device: torch.device | str = "cpu") -> Packing:
        lengths = tuple(int(n) for n in lengths)
        if not lengths or min(lengths) < 1:
            raise ValueError(f"packed segment lengths must be positive, got {list(lengths)}")
        offsets = [0]
        for n in lengths:
            offsets.append(offsets[-1] + n)
        return cls(torch.tensor(offsets, dtype=torch.int32, device=device), max(lengths), lengths)

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, max_seqlen: int | None = None) -> Packing:
        """From the offsets alone (reads them back to the host once: prefer `from_lengths`)."""
        offsets = [int(v) for v in cu_seqlens.tolist()]
        lengths = tuple(b - a for a, b in zip(offsets[:-1], offsets[1:]))
        return cls(cu_seqlens.to(torch.int32), max_seqlen or max(lengths), lengths)

    @property
    def n_tokens(self) -> int:
        return sum(self.lengths)

    def position_ids(self, rows: int) -> torch.Tensor:
        """Positions restarting at 0 in every segment, `[rows, n_tokens // rows]`."""
        device = self.cu_seqlens.device
        ids = torch.cat([torch.arange(n, device=device) for n in self.lengths])
        return ids.view(rows, -1)


@dataclass(frozen=True)
class AttentionPlan:
    """What attention must respect, decided once per forward from shapes and host facts.

    `dense`: a boolean mask (`[B|1, 1, q, k]`, True = attend) for left padding or a sliding window
    that binds; else plain causal (`causal`) or nothing. `packing`: block-diagonal causal attention
    over packed segments. `window`: the sliding window, for the backends that take it natively.
    """

    dense: torch.Tensor | None
    causal: bool
    packing: Packing | None = None
    window: int | None = None


def plan_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past: int, device, sliding_window: int | None
) -> AttentionPlan:
    """The cheapest exact mask: none or causal where padding cannot reach a real query.

    Right padding never reaches a real query under a causal mask, so training batches (right
    padded) run the fused causal kernels. A sliding window only binds once keys outnumber it.
    Telling left from right padding reads the mask once (a host sync): the training path
    (`LlamaForCausalLM.loss`) passes no mask at all, so it never does.
    """
    k_len = past + q_len
    window_binds = sliding_window is not None and k_len > sliding_window
    if not window_binds and not _padding_matters(attention_mask, past, k_len):
        if past == 0:
            return AttentionPlan(None, causal=q_len > 1)
        if q_len == 1:
            return AttentionPlan(None, causal=False)
    return AttentionPlan(_dense_mask(attention_mask, q_len, past, device, sliding_window), causal=False)


def _padding_matters(attention_mask: torch.Tensor | None, past: int, k_len: int) -> bool:
    if attention_mask is None:
        return False
    mask = attention_mask[:, :k_len]
    if past == 0:
        return bool((mask[:, 1:] > mask[:, :-1]).any())  # a 0 followed by a 1: not right padding
    return not bool(mask.all())


def _dense_mask(attention_mask, q_len: int, past: int, device, sliding_window: int | None) -> torch.Tensor:
    k_len = past + q_len
    q_pos = torch.arange(past, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :k_len].bool()
        # A left-padding query would see no key at all, and SDPA would return NaN there: let it
        # see itself. Those rows are ignored by the loss and by generation.
        allowed = allowed | (k_pos == q_pos)[None, None]
    return allowed


def _window_binds(window: int | None, length: int) -> bool:
    return window is not None and length > window


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, implementation: str
) -> torch.Tensor:
    """Softmax attention of q [B, H, Tq, D] over k, v [B, KVH, Tk, D]; returns [B, H, Tq, D].

    GQA never repeats k and v: SDPA takes `enable_gqa`, flash-attn takes fewer k/v heads, and
    xformers takes the 5-D `[B, M, G, H/G, D]` layout with k/v broadcast over each group.
    """
    if plan.packing is not None:
        return _attend_packed(q, k, v, plan.packing, plan.window, implementation)
    if plan.dense is None and implementation == "flash_attention_2":
        flash_attn = importlib.import_module("flash_attn")
        # flash-attn takes [B, T, H, D], handles GQA itself and aligns causal to the bottom right.
        out = flash_attn.flash_attn_func(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=plan.causal,
            window_size=_flash_window(plan.window),
        )
        return out.transpose(1, 2)
    if plan.dense is None and implementation == "xformers":
        xops = importlib.import_module("xformers.ops")
        bias = xops.LowerTriangularMask() if plan.causal else None
        return _xformers(xops, q, k, v, bias)
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=plan.dense, is_causal=plan.causal, enable_gqa=q.shape[1] != k.shape[1]
    )


def _flash_window(window: int | None) -> tuple[int, int]:
    # flash-attn's window (left, right) keeps keys i - left .. i + right; a window of w keeps w keys.
    return (-1, -1) if window is None else (window - 1, 0)


def _xformers(xops, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias) -> torch.Tensor:
    """q [B, H, M, D], k/v [B, KVH, M, D] -> [B, H, M, D] through memory_efficient_attention."""
    b, h, m, d = q.shape
    kv = k.shape[1]
    q5 = q.transpose(1, 2).reshape(b, m, kv, h // kv, d)
    k5 = k.transpose(1, 2)[:, :, :, None].expand(b, k.shape[2], kv, h // kv, d)
    v5 = v.transpose(1, 2)[:, :, :, None].expand(b, v.shape[2], kv, h // kv, d)
    out = xops.memory_efficient_attention(q5, k5, v5, attn_bias=bias)
    return out.reshape(b, m, h, d).transpose(1, 2)


def _attend_packed(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, packing: Packing, window: int | None, implementation: str
) -> torch.Tensor:
    """Block-diagonal causal attention over the segments of packed rows (q [R, H, L, D])."""
    r, h, length, d = q.shape
    kv = k.shape[1]
    total = r * length
    if packing.n_tokens != total:
        raise ValueError(f"packing covers {packing.n_tokens} tokens but the batch holds {r} x {length} = {total}")
    # The segments run across the flattened rows: [R, H, L, D] -> [R*L, H, D].
    qf, kf, vf = (t.transpose(1, 2).reshape(total, t.shape[1], d) for t in (q, k, v))
    if implementation == "flash_attention_2":
        flash_attn = importlib.import_module("flash_attn")
        out = flash_attn.flash_attn_varlen_func(
            qf, kf, vf, packing.cu_seqlens, packing.cu_seqlens, packing.max_seqlen, packing.max_seqlen,
            causal=True, window_size=_flash_window(window),
        )
    elif implementation == "xformers":
        xops = importlib.import_module("xformers.ops")
        bias = xops.fmha.attn_bias.BlockDiagonalCausalMask.from_seqlens(list(packing.lengths))
        if window is not None:
            bias = bias.make_local_attention(window)
        out = _xformers(xops, *(t[None].transpose(1, 2) for t in (qf, kf, vf)), bias).transpose(1, 2)[0]
    else:
        # SDPA per segment: exact, and each segment runs the fused causal kernel.
        parts = []
        for qs, ks, vs in zip(*(t.split(packing.lengths) for t in (qf, kf, vf))):
            n = qs.shape[0]
            seg = [t.transpose(0, 1)[None] for t in (qs, ks, vs)]  # [1, H, n, D]
            mask = _dense_mask(None, n, 0, q.device, window) if _window_binds(window, n) else None
            parts.append(
                F.scaled_dot_product_attention(
                    *seg, attn_mask=mask, is_causal=mask is None and n > 1, enable_gqa=kv != h
                )[0].transpose(0, 1)
            )
        out = torch.cat(parts)
    return out.reshape(r, length, h, d).transpose(1, 2)


class KVCache:
    """Preallocated keys and values, per layer `[B, kv_heads, max_len, head_dim]` (gpt-fast's
    static cache). Slot i holds the i-th input position, padding included.

    `valid [B, max_len]` says which slots hold a real token (False at left padding); it is set
    from the prompt's mask once and true for every generated slot, so a decoding step's mask is a
    view of it, not a new tensor. `padded` (a host bool, set with `valid`) tells whether any slot
    is padding at all; without padding, decoding needs no mask.
    """

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor) -> None:
        self.keys, self.values, self.valid = keys, values, valid
        self.length = 0
        self.padded = False

    @classmethod
    def allocate(cls, config: LlamaConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in layers],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in layers],
            torch.ones(batch, max_len, dtype=torch.bool, device=device),
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def set_valid(self, attention_mask: torch.Tensor) -> None:
        """Slots `[0, attention_mask.shape[1])` from a `[B, n]` mask (1 = real token)."""
        n = attention_mask.shape[1]
        if n > self.max_len:
            raise RuntimeError(f"KV cache full: {n} positions > {self.max_len} allocated")
        self.valid[:, :n] = attention_mask.bool()
        self.padded = not bool(self.valid.all())  # one look per prompt, not per token

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values after the cached ones; return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions > {self.max_len} allocated")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]

    def plan(self, q_len: int, sliding_window: int | None) -> AttentionPlan:
        """The mask for `q_len` new positions after `length` cached ones, from `valid`."""
        past, end = self.length, self.length + q_len
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions > {self.max_len} allocated")
        binds = _window_binds(sliding_window, end)
        if not self.padded and not binds:
            if past == 0:
                return AttentionPlan(None, causal=q_len > 1, window=sliding_window)
            if q_len == 1:
                return AttentionPlan(None, causal=False)
        if q_len == 1 and not binds:
            return AttentionPlan(self.valid[:, None, None, :end], causal=False)  # a view: nothing built
        return AttentionPlan(_dense_mask(self.valid[:, :end], q_len, past, self.valid.device, sliding_window), False)


def _projection_parts(module: nn.Module) -> tuple | None:
    """(weight, bias, adapter or None) of a frozen projection that `fused_projections` may run, else None."""
    if module._forward_hooks or module._forward_pre_hooks:
        return None  # the module's own hooks (ZeRO-3 gathers, meters) must see its call
    parts = getattr(module, "projection_parts", None)
    if parts is not None:
        return parts()
    if type(module) is nn.Linear:
        return module.weight, module.bias, None
    return None


def _plain_frozen(t: torch.Tensor | None, like: torch.Tensor) -> bool:
    # Only a plain, frozen, materialized tensor may be re-pointed into a shared storage: a DTensor
    # (FSDP2), an NF4Tensor, a DeepSpeed-partitioned parameter or a trained bias keeps its own.
    return (
        t is not None and type(t) in (nn.Parameter, torch.Tensor) and not t.requires_grad and not t.is_meta
        and t.dtype == like.dtype and t.device == like.device and not hasattr(t, "ds_id")
    )  # fmt: skip


def _consecutive(tensors: list[torch.Tensor]) -> bool:
    """Do these contiguous tensors lie one after another in one storage?"""
    first = tensors[0]
    ptr, offset = first.untyped_storage().data_ptr(), first.storage_offset()
    for t in tensors:
        if not t.is_contiguous() or t.untyped_storage().data_ptr() != ptr or t.storage_offset() != offset:
            return False
        offset += t.numel()
    return True


def _joined(tensors: list[torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The tensors as one `shape` tensor over their shared storage; re-pointed there first if needed.

    The parameters become views of one storage (a cat, then `.data` swapped, so no second copy is
    kept); `.to()` or loading with `assign=True` give them storages of their own again, and the
    next call joins them anew.
    """
    if not _consecutive(tensors):
        with torch.no_grad():
            joined = torch.cat([t.detach().reshape(-1) for t in tensors])
            offset = 0
            for t in tensors:
                t.data = joined[offset : offset + t.numel()].view(t.shape)
                offset += t.numel()
    first = tensors[0].detach()
    stride = (shape[1], 1) if len(shape) == 2 else (1,)
    return first.as_strided(shape, stride, first.storage_offset())


def fused_projections(modules: tuple[nn.Module, ...], x: torch.Tensor) -> list[torch.Tensor]:
    """`[m(x) for m in modules]`, as one GEMM when the projections are frozen and plain.

    q/k/v (and gate/up) read the same input: their frozen weights, kept consecutive in one storage,
    run as one `[in, sum(out)]` GEMM forward and one dX GEMM backward (no per-projection dX to
    sum), and LoRA adapters add their terms on their slices (`kernels.torch_lora.grouped_lora_linear`,
    the same values and dropout draws as the layers one by one). Anything else (the Triton kernels,
    NF4, FSDP2 / ZeRO-3 parameters, hooks on a projection, autocast, torch.compile, which fuses by
    itself) runs the modules one by one.
    """
    if torch.compiler.is_compiling() or torch.is_autocast_enabled(x.device.type) or x.dim() < 2:
        return [m(x) for m in modules]
    parts = [_projection_parts(m) for m in modules]
    if any(p is None for p in parts):
        return [m(x) for m in modules]
    weights = [p[0] for p in parts]
    biases = [p[1] for p in parts]
    has_bias = biases[0] is not None
    if not all(_plain_frozen(w, x) and w.dim() == 2 and w.shape[1] == x.shape[-1] for w in weights) or any(
        (b is not None) != has_bias or (has_bias and not _plain_frozen(b, x)) for b in biases
    ):
        return [m(x) for m in modules]
    from pefomed.kernels.torch_lora import grouped_lora_linear

    sizes = [w.shape[0] for w in weights]
    total = sum(sizes)
    weight = _joined(weights, (total, x.shape[-1]))
    bias = _joined(biases, (total,)) if has_bias else None
    adapters, start = [], 0
    for size, (_, _, adapter) in zip(sizes, parts):
        if adapter is not None:
            lora_A, lora_B, scaling, p = adapter
            adapters.append((start, start + size, lora_A, lora_B, scaling, p))
        start += size
    return list(grouped_lora_linear(x, weight, bias, adapters).split(sizes, dim=-1))


class Attention(nn.Module):
    def __init__(
        self, config: LlamaConfig, prefix: str, linear: LinearFactory, layer_idx: int, ops: LlamaOps = LEAN_OPS
    ) -> None:
        super().__init__()
        c = config
        self.config, self.layer_idx, self.rope = c, layer_idx, ops.rope
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = linear(f"{prefix}.q_proj", c.hidden_size, q_out, c.attention_bias)
        self.k_proj = linear(f"{prefix}.k_proj", c.hidden_size, kv_out, c.attention_bias)
        self.v_proj = linear(f"{prefix}.v_proj", c.hidden_size, kv_out, c.attention_bias)
        self.o_proj = linear(f"{prefix}.o_proj", q_out, c.hidden_size, c.attention_bias)

    def forward(self, x, cos, sin, plan: AttentionPlan, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = fused_projections((self.q_proj, self.k_proj, self.v_proj), x)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        # v reaches attention (which saves it) as a slice of the fused output: its own storage
        # keeps the whole [B, T, q + k + v] buffer from being saved for backward.
        v = v.contiguous().view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, plan, self.config.attn_implementation)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig, prefix: str, linear: LinearFactory, ops: LlamaOps = LEAN_OPS) -> None:
        super().__init__()
        c = config
        self.swiglu = ops.swiglu
        self.gate_proj = linear(f"{prefix}.gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.up_proj = linear(f"{prefix}.up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.down_proj = linear(f"{prefix}.down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_projections((self.gate_proj, self.up_proj), x)
        return self.down_proj(self.swiglu(gate, up))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, idx: int, linear: LinearFactory, ops: LlamaOps = LEAN_OPS) -> None:
        super().__init__()
        prefix = f"model.layers.{idx}"
        self.self_attn = Attention(config, f"{prefix}.self_attn", linear, idx, ops)
        self.mlp = MLP(config, f"{prefix}.mlp", linear, ops)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops.rms_norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops.rms_norm)

    def forward(self, x, cos, sin, plan: AttentionPlan, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, plan, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, linear: LinearFactory, ops: LlamaOps = LEAN_OPS) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, linear, ops) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops.rms_norm)
        self.rotary_emb = RotaryEmbedding(config)


# ---------------------------------------------------------------- the loss on target rows

# Logits of at most this many elements exist at once (fp32: 64 MiB), whatever the number of
# target rows: 341 rows of SmolLM2's 49152-word vocabulary, 130 of LLaMA-3's 128256.
LOSS_CHUNK_ELEMENTS = 1 << 24


class _TargetCrossEntropy(torch.autograd.Function):
    """Sum of cross-entropies of `hidden [n, H] @ weight [V, H]^T` against `targets [n]`.

    The rows are taken in chunks and each chunk's logits live only inside this forward, which
    also computes the gradients (softmax - one-hot, pushed through the head at once): backward is
    a scaling of the saved `[n, H]` (and, if the head trains, `[V, H]`) gradients. The logits are
    computed in the weight's dtype and upcast to fp32 for the softmax, as transformers does.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk_rows: int):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc = _norm_dtype(hidden)  # fp32 (fp64 stays fp64)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        for start in range(0, hidden.shape[0], chunk_rows):
            h = hidden[start : start + chunk_rows]
            t = targets[start : start + chunk_rows]
            logits = F.linear(h, weight).to(acc)
            lse = torch.logsumexp(logits, dim=-1)
            total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
            if need_h or need_w:
                probs = logits.sub_(lse[:, None]).exp_()
                probs.scatter_add_(1, t[:, None], probs.new_full((t.shape[0], 1), -1.0))
                dlogits = probs.to(weight.dtype)
                if need_h:
                    grad_h[start : start + chunk_rows] = dlogits @ weight
                if need_w:
                    grad_w += (dlogits.t() @ h.to(weight.dtype)).to(acc)
        ctx.weight_dtype = weight.dtype
        ctx.save_for_backward(grad_h, grad_w)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad_h, grad_w = ctx.saved_tensors
        dh = grad_h * grad.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * grad).to(ctx.weight_dtype) if grad_w is not None else None
        return dh, dw, None, None


class LMHead(nn.Linear):
    """The output projection (checkpoint key `lm_head.weight`).

    Called with rows only, it returns logits; called with `targets` too, it returns the summed
    cross-entropy of those rows without keeping their logits (`_TargetCrossEntropy`). Both go
    through the module call, so the hooks of a sharded head (FSDP2's all-gather) run either way.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        if targets is None:
            return F.linear(x, self.weight)
        chunk = max(1, LOSS_CHUNK_ELEMENTS // self.out_features)
        return _TargetCrossEntropy.apply(x, self.weight, targets, chunk)


@dataclass(frozen=True)
class TargetRows:
    """The positions whose next token is a target: flat indices into the `[B*T]` hidden rows, and
    those next tokens. The data pipeline computes them on the host (engine/data/collate.py);
    `from_labels` finds them on the device, which costs one host sync (the count decides the
    shape), the only one of a training forward."""

    index: torch.Tensor  # long [n]
    ids: torch.Tensor  # long [n]

    @classmethod
    def from_labels(cls, labels: torch.Tensor, position_ids: torch.Tensor | None = None) -> TargetRows:
        shift = labels[:, 1:]
        keep = shift != IGNORE_INDEX
        if position_ids is not None:  # packed rows: no target across a segment boundary
            keep = keep & (position_ids[:, 1:] != 0)
        rows, cols = keep.nonzero(as_tuple=True)
        return cls(rows * labels.shape[1] + cols, shift[rows, cols])

    @property
    def count(self) -> int:
        return self.index.shape[0]


# ---------------------------------------------------------------- the model


class LlamaForCausalLM(nn.Module):
    def __init__(
        self, config: LlamaConfig, linear_factory: LinearFactory | None = None, ops: LlamaOps | None = None
    ) -> None:
        super().__init__()
        _require_attention_backend(config.attn_implementation)
        self.config = config
        self.config_source = "the LlamaConfig"  # from_pretrained names the config.json instead
        self.model = LlamaModel(config, linear_factory or default_linear, ops or LEAN_OPS)
        self.lm_head = LMHead(config.hidden_size, config.vocab_size)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        logits_to_keep: int = 0,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """Logits [B, T, vocab] in the model's dtype (the last `logits_to_keep` positions if > 0).

        `attention_mask` [B, past + T] (1 = real token) covers the cached positions too. Position
        ids default to the count of real tokens before each one, as HF does for left padding.
        With `packing`, the rows hold several sequences (block-diagonal causal attention);
        `position_ids` then restart in each segment (`Packing.position_ids` when omitted).
        """
        x = self.hidden_states(
            input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, position_ids=position_ids,
            kv_cache=kv_cache, packing=packing,
        )
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x))

    def hidden_states(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        packing: Packing | None = None,
    ) -> torch.Tensor:
        """The last decoder layer's output [B, T, H], before the final norm."""
        x = self._embed(input_ids, inputs_embeds)
        b, t, _ = x.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
            raise ValueError(
                f"attention_mask has shape {list(attention_mask.shape)}, expected [{b}, {past + t}] "
                "(batch, cached + new positions)"
            )
        window = self.config.sliding_window
        if packing is not None:
            if kv_cache is not None or attention_mask is not None:
                raise ValueError("packed rows take neither attention_mask nor kv_cache (segments are their mask)")
            plan = AttentionPlan(None, causal=True, packing=packing, window=window)
            if position_ids is None:
                position_ids = packing.position_ids(b)
            bound = min(t, packing.max_seqlen)
        elif kv_cache is not None:
            if attention_mask is not None:
                kv_cache.set_valid(attention_mask)
            plan = kv_cache.plan(t, window)
            if position_ids is None:
                position_ids = default_position_ids(attention_mask, b, past, t, x.device)
            bound = past + t
        elif attention_mask is None and self.config.attn_implementation == "flash_attention_2":
            plan = AttentionPlan(None, causal=t > 1, window=window)  # flash-attn takes the window itself
            if position_ids is None:
                position_ids = default_position_ids(None, b, past, t, x.device)
            bound = t
        else:
            plan = plan_attention_mask(attention_mask, t, past, x.device, window)
            if position_ids is None:
                position_ids = default_position_ids(attention_mask, b, past, t, x.device)
            bound = t
        cos, sin = self.model.rotary_emb(position_ids, x.dtype, max_position=bound)
        for layer in self.model.layers:
            x = layer(x, cos, sin, plan, kv_cache)
        if kv_cache is not None:
            kv_cache.length += t
        return x

    def loss(
        self,
        labels: torch.Tensor | None = None,
        *,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        packing: Packing | None = None,
        targets: TargetRows | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean next-token cross-entropy over the targets, their count as a long tensor).

        For training batches: right-padded rows (padding after each row's last real token, its
        labels -100) or packed rows. Causal attention then needs no mask, since no real token
        sees a later one; so none is taken, and none is read. `lm_head` runs on the target rows
        only, chunked, so the `[tokens, vocab]` logits never exist. `targets` (from the data
        pipeline) saves the one host sync that finding them in `labels` costs.
        """
        if targets is None:
            if labels is None:
                raise ValueError("loss() needs labels or targets")
            targets = TargetRows.from_labels(labels, position_ids if packing is not None else None)
        hidden = self.hidden_states(input_ids, inputs_embeds=inputs_embeds, position_ids=position_ids, packing=packing)
        count = torch.full((), targets.count, dtype=torch.long, device=hidden.device)
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, targets.index)
        total = self.lm_head(self.model.norm(rows), targets=targets.ids)
        # No targets (an all-prompt micro-batch): a zero loss whose graph still reaches every
        # module, so that every parameter gets its (zero) gradient and every hook runs.
        return total / max(targets.count, 1), count

    def _embed(self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        return self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
    ) -> torch.Tensor:
        """Greedy decoding with a static KV cache from left-padded prompts.

        Returns only the new tokens, [B, <= max_new_tokens]: a row that produced EOS is padded
        with `pad_token_id` (EOS's first id when None) and decoding stops once every row has.
        The cache's slot mask and the RoPE table are made once; a step looks both up. Each step
        reads one flag back (have all rows ended?), as transformers does.
        """
        prompt = self._embed(input_ids, inputs_embeds)
        b, t, _ = prompt.shape
        device = prompt.device
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if max_new_tokens == 0:
            return torch.empty(b, 0, dtype=torch.long, device=device)
        eos = torch.tensor(_as_list(eos_token_id), dtype=torch.long, device=device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
        # The last generated token is never fed back, so it needs no cache slot.
        cache = KVCache.allocate(self.config, b, t + max_new_tokens - 1, device, prompt.dtype)
        cache.set_valid(attention_mask)
        positions = default_position_ids(attention_mask, b, 0, t, device)
        next_position = attention_mask.long().sum(-1, keepdim=True)  # real tokens so far, per row
        logits = self(inputs_embeds=prompt, position_ids=positions, kv_cache=cache, logits_to_keep=1)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = torch.where(done, pad, logits[:, -1].argmax(-1))
            new_tokens.append(token)
            done = done | torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = self(token[:, None], position_ids=next_position, kv_cache=cache, logits_to_keep=1)
            next_position = next_position + 1
        return torch.stack(new_tokens, dim=1)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        linear_factory: LinearFactory | None = None,
        attn_implementation: str | None = None,
        allow_missing: Iterable[str] = (),
        ops: LlamaOps | None = None,
    ) -> LlamaForCausalLM:
        """Read config.json, build on the meta device, assign the checkpoint tensor by tensor.

        Parameters whose names match an `allow_missing` regex may be absent from the checkpoint
        (parameters that `linear_factory`'s modules add): they stay on the meta device, for the
        caller to materialize. Any other parameter left without a value is an error.
        """
        path = Path(path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: expected a model folder with config.json and weights")
        config = LlamaConfig.from_hf(path)
        if attn_implementation is not None:
            config = dataclasses.replace(config, attn_implementation=attn_implementation)
        with torch.device("meta"):
            model = cls(config, linear_factory, ops)
        model.config_source = str(path / "config.json")
        load_into(
            model,
            iter_state_dict(path),
            dtype=dtype,
            device=device,
            allow_missing=allow_missing,
            ignore=[r"(^|\.)rotary_emb\.inv_freq$"],  # saved by old transformers versions
            source=str(path),
        )
        leftover = meta_tensor_names(model, allow=allow_missing)
        if leftover:
            raise CheckpointError(f"{path}: no values for {leftover[:8]} after loading (no checkpoint key, no init)")
        return model

    def shape_mismatch_hint(self, name: str, got: tuple[int, ...], want: tuple[int, ...]) -> str | None:
        """Which config.json fields make `name` the shape the model expects (for load errors)."""
        dims = _config_dims(name)
        if dims is None or len(dims) != len(want):
            return None
        c = dataclasses.asdict(self.config)
        differing = [i for i in range(len(want)) if i >= len(got) or got[i] != want[i]] or range(len(want))
        said = ", ".join(_describe_dim(dims[i], c) for i in differing)
        return f"{self.config_source} says {said} but the checkpoint's {name} is {list(got)}; fix the config"


def default_position_ids(attention_mask: torch.Tensor | None, b: int, past: int, t: int, device) -> torch.Tensor:
    if attention_mask is None:
        return torch.arange(past, past + t, device=device)[None].expand(b, t)
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + t]


def _as_list(token_ids: int | list[int] | None) -> list[int]:
    if token_ids is None:
        return []
    return [token_ids] if isinstance(token_ids, int) else list(token_ids)


# Which config fields give each dimension of a checkpoint tensor (a product when several).
_SHAPE_FIELDS: list[tuple[str, tuple[tuple[str, ...], ...]]] = [
    (r"(embed_tokens|lm_head)\.weight$", (("vocab_size",), ("hidden_size",))),
    (r"q_proj\.weight$", (("num_attention_heads", "head_dim"), ("hidden_size",))),
    (r"q_proj\.bias$", (("num_attention_heads", "head_dim"),)),
    (r"[kv]_proj\.weight$", (("num_key_value_heads", "head_dim"), ("hidden_size",))),
    (r"[kv]_proj\.bias$", (("num_key_value_heads", "head_dim"),)),
    (r"o_proj\.weight$", (("hidden_size",), ("num_attention_heads", "head_dim"))),
    (r"(gate|up)_proj\.weight$", (("intermediate_size",), ("hidden_size",))),
    (r"(gate|up)_proj\.bias$", (("intermediate_size",),)),
    (r"down_proj\.weight$", (("hidden_size",), ("intermediate_size",))),
    (r"(o_proj|down_proj)\.bias$|norm\.weight$", (("hidden_size",),)),
]


def _config_dims(name: str) -> tuple[tuple[str, ...], ...] | None:
    for pattern, dims in _SHAPE_FIELDS:
        if re.search(pattern, name):
            return dims
    return None


def _describe_dim(fields: tuple[str, ...], config: dict[str, Any]) -> str:
    if len(fields) == 1:
        return f"{fields[0]}={config[fields[0]]}"
    values = [config[f] for f in fields]
    return f"{' * '.join(fields)} = {' * '.join(map(str, values))} = {math.prod(values)}"


def _require_attention_backend(name: str) -> None:
    package = ATTENTION_PACKAGES[name]
    if package is None:
        return
    try:
        importlib.import_module(package)
    except ImportError as e:
        raise ImportError(
            f"attn_implementation={name!r} needs the {package.split('.')[0]} package, which is not "
            f"installed ({e}); install it on a CUDA machine, or set attn_implementation='sdpa'"
        ) from e
