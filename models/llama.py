"""LLaMA-2 (MHA), LLaMA-3 (GQA, llama3 RoPE scaling) and Mistral-7B in one implementation.

Modules are named exactly as in the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, ...) and RoPE is HF's rotate-half form, so a checkpoint
loads with no rename and no q/k permutation. Every projection is made through a
`linear_factory(name, in, out, bias)`: the caller decides what each projection is (the engine
builds its adapters and quantized layers there, see engine/lora.py); the default is `nn.Linear`.

Attention runs through `F.scaled_dot_product_attention` by default. flash-attn or xformers run
only when `attn_implementation` asks for them (and they are installed), and only where the mask
is plain causal or absent; masks with left padding or a binding sliding window go through SDPA
with an explicit boolean mask.
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


# ---------------------------------------------------------------- layers


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # As HF: normalize in fp32, cast back, then scale (the cast before the scale matters in bf16).
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


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
    def __init__(self, config: LlamaConfig) -> None:
        super().__init__()
        self.config = config
        # Not in checkpoints; recomputed by reset_buffers() after a meta-device build.
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_buffers(self) -> None:
        device = "cpu" if self.inv_freq.is_meta else self.inv_freq.device
        self.inv_freq = rope_inv_freq(self.config, device=device)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.float().to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # [B, 1, T, D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


class KVCache:
    """Preallocated keys and values, per layer `[B, kv_heads, max_len, head_dim]`."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        self.keys, self.values = keys, values
        self.length = 0

    @classmethod
    def allocate(cls, config: LlamaConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (batch, config.num_key_value_heads, max_len, config.head_dim)
        layers = range(config.num_hidden_layers)
        return cls(
            [torch.zeros(shape, device=device, dtype=dtype) for _ in layers],
            [torch.zeros(shape, device=device, dtype=dtype) for _ in layers],
        )

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this step's keys/values after the cached ones; return all of them so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache full: {end} positions > {self.max_len} allocated")
        self.keys[layer][:, :, self.length : end] = k
        self.values[layer][:, :, self.length : end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


@dataclass
class AttentionMask:
    """What attention must mask: `dense` (bool [B|1, 1, q, k], True = attend) or plain causal."""

    dense: torch.Tensor | None
    causal: bool


def plan_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past: int, device, sliding_window: int | None
) -> AttentionMask:
    """The cheapest exact mask: none or causal where padding cannot reach a real query.

    Right padding never reaches a real query under a causal mask, so training batches (right
    padded) run the fused causal kernels. A sliding window only binds once keys outnumber it.
    """
    k_len = past + q_len
    window_binds = sliding_window is not None and k_len > sliding_window
    if not window_binds and not _padding_matters(attention_mask, past, k_len):
        if past == 0:
            return AttentionMask(None, causal=q_len > 1)
        if q_len == 1:
            return AttentionMask(None, causal=False)
    return AttentionMask(_dense_mask(attention_mask, q_len, past, device, sliding_window), causal=False)


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
        allowed = allowed | torch.eye(k_len, dtype=torch.bool, device=device)[None, None, past:]
    return allowed


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, implementation: str
) -> torch.Tensor:
    """Softmax attention of q [B, H, Tq, D] over k, v [B, KVH, Tk, D]; returns [B, H, Tq, D]."""
    if mask.dense is None and implementation == "flash_attention_2":
        flash_attn = importlib.import_module("flash_attn")
        # flash-attn takes [B, T, H, D], handles GQA itself and aligns causal to the bottom right.
        out = flash_attn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=mask.causal)
        return out.transpose(1, 2)
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    if mask.dense is None and implementation == "xformers":
        xops = importlib.import_module("xformers.ops")
        bias = xops.LowerTriangularMask() if mask.causal else None
        out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
        return out.transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask.dense, is_causal=mask.causal)


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, prefix: str, linear: LinearFactory, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        self.q_proj = linear(f"{prefix}.q_proj", c.hidden_size, q_out, c.attention_bias)
        self.k_proj = linear(f"{prefix}.k_proj", c.hidden_size, kv_out, c.attention_bias)
        self.v_proj = linear(f"{prefix}.v_proj", c.hidden_size, kv_out, c.attention_bias)
        self.o_proj = linear(f"{prefix}.o_proj", q_out, c.hidden_size, c.attention_bias)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        out = attend(q, k, v, mask, self.config.attn_implementation)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig, prefix: str, linear: LinearFactory) -> None:
        super().__init__()
        c = config
        self.gate_proj = linear(f"{prefix}.gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.up_proj = linear(f"{prefix}.up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.down_proj = linear(f"{prefix}.down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, idx: int, linear: LinearFactory) -> None:
        super().__init__()
        prefix = f"model.layers.{idx}"
        self.self_attn = Attention(config, f"{prefix}.self_attn", linear, idx)
        self.mlp = MLP(config, f"{prefix}.mlp", linear)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask: AttentionMask, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, linear) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


# ---------------------------------------------------------------- the model


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, linear_factory: LinearFactory | None = None) -> None:
        super().__init__()
        _require_attention_backend(config.attn_implementation)
        self.config = config
        self.config_source = "the LlamaConfig"  # from_pretrained names the config.json instead
        self.model = LlamaModel(config, linear_factory or default_linear)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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
    ) -> torch.Tensor:
        """Logits [B, T, vocab] in the model's dtype (the last `logits_to_keep` positions if > 0).

        `attention_mask` [B, past + T] (1 = real token) covers the cached positions too. Position
        ids default to the count of real tokens before each one, as HF does for left padding.
        """
        x = self._embed(input_ids, inputs_embeds)
        b, t, _ = x.shape
        past = kv_cache.length if kv_cache is not None else 0
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
            raise ValueError(
                f"attention_mask has shape {list(attention_mask.shape)}, expected [{b}, {past + t}] "
                "(batch, cached + new positions)"
            )
        if position_ids is None:
            position_ids = default_position_ids(attention_mask, b, past, t, x.device)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        mask = plan_attention_mask(attention_mask, t, past, x.device, self.config.sliding_window)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += t
        if logits_to_keep > 0:
            x = x[:, -logits_to_keep:]
        return self.lm_head(self.model.norm(x))

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
        """Greedy decoding with a KV cache from left-padded prompts.

        Returns only the new tokens, [B, <= max_new_tokens]: a row that produced EOS is padded
        with `pad_token_id` (EOS's first id when None) and decoding stops once every row has.
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
        mask = torch.cat([attention_mask, attention_mask.new_ones(b, max_new_tokens)], dim=1)
        # The last generated token is never fed back, so it needs no cache slot.
        cache = KVCache.allocate(self.config, b, t + max_new_tokens - 1, device, prompt.dtype)
        logits = self(inputs_embeds=prompt, attention_mask=mask[:, :t], kv_cache=cache, logits_to_keep=1)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        new_tokens = []
        for step in range(max_new_tokens):
            token = torch.where(done, pad, logits[:, -1].argmax(-1))
            new_tokens.append(token)
            done = done | torch.isin(token, eos)
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            logits = self(token[:, None], attention_mask=mask[:, : t + step + 1], kv_cache=cache, logits_to_keep=1)
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
            model = cls(config, linear_factory)
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
