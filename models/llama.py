"""LLaMA-2 (MHA), LLaMA-3 (GQA, llama3 RoPE scaling) and Mistral-7B in one implementation.

Modules are named exactly as in the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`,
`mlp.gate_proj`, `input_layernorm`, ...) and RoPE is HF's rotate-half form, so a checkpoint
loads with no rename and no q/k permutation. Every projection is made through a
`linear_factory(name, in, out, bias)`, which is how LoRA is built in (see engine/lora.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from models.loading import CheckpointError, iter_state_dict, load_into

LinearFactory = Callable[[str, int, int, bool], nn.Module]


def default_linear(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
    return nn.Linear(in_features, out_features, bias=bias)


@dataclass
class LlamaConfig:
    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-5
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
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.attn_implementation not in ("sdpa", "flash_attention_2", "xformers"):
            raise ValueError(f"attn_implementation={self.attn_implementation!r}: expected sdpa, flash_attention_2 or xformers")

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")

    @classmethod
    def from_hf(cls, source: str | Path | dict) -> LlamaConfig:
        """Read a Hugging Face config.json (a folder, the file, or its dict)."""
        where = "<dict>"
        if not isinstance(source, dict):
            path = Path(source)
            path = path / "config.json" if path.is_dir() else path
            where = str(path)
            try:
                source = json.loads(path.read_text())
            except FileNotFoundError as e:
                raise FileNotFoundError(f"{path}: missing; a model folder needs its config.json") from e
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{path}: not valid JSON ({e})") from e
        missing = [k for k in cls.REQUIRED if k not in source]
        if missing:
            raise CheckpointError(f"{where}: missing required key(s) {missing}")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in source.items() if k in known}
        # transformers 5 writes rope_theta and scaling together as "rope_parameters".
        rope = source.get("rope_parameters") or {}
        if "rope_theta" in rope:
            values["rope_theta"] = rope["rope_theta"]
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type and rope_type != "default":
            values["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        if values.get("rope_scaling") and "rope_type" not in values["rope_scaling"]:
            values["rope_scaling"]["rope_type"] = values["rope_scaling"].get("type")
        if source.get("model_type") == "mistral" and "sliding_window" not in values:
            values["sliding_window"] = 4096
        return cls(**values)

    def to_hf_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("attn_implementation")
        d["architectures"] = ["MistralForCausalLM" if self.model_type == "mistral" else "LlamaForCausalLM"]
        d["hidden_act"] = "silu"
        return d


CONFIGS: dict[str, LlamaConfig] = {
    "llama2-7b": LlamaConfig(),
    "llama3-8b": LlamaConfig(
        vocab_size=128256, intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=131072,
        rope_theta=500000.0, bos_token_id=128000, eos_token_id=128009,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    ),
    "mistral-7b": LlamaConfig(
        intermediate_size=14336, num_key_value_heads=8, max_position_embeddings=32768, model_type="mistral",
        sliding_window=4096, rope_theta=10000.0,
    ),
    # The demo's base model: small enough to train on 2 CPU cores in minutes.
    "tiny": LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=344, num_hidden_layers=3, num_attention_heads=4,
        max_position_embeddings=256, rms_norm_eps=1e-6,
    ),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(config: LlamaConfig, device=None) -> torch.Tensor:
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = config.rope_scaling or {}
    kind = scaling.get("rope_type")
    if kind in (None, "default"):
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind != "llama3":
        raise ValueError(f"rope_scaling type {kind!r} is not supported (default, linear, llama3)")
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
        self.register_buffer("inv_freq", rope_inv_freq(config), persistent=False)

    def reset_buffers(self) -> None:
        self.inv_freq = rope_inv_freq(self.config, device=self.inv_freq.device if not self.inv_freq.is_meta else "cpu")

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


@dataclass
class KVCache:
    """Preallocated keys and values for every layer: [layers, B, kv_heads, max_len, head_dim]."""

    keys: torch.Tensor
    values: torch.Tensor
    length: int = 0

    @classmethod
    def allocate(cls, config: LlamaConfig, batch: int, max_len: int, device, dtype) -> KVCache:
        shape = (config.num_hidden_layers, batch, config.num_key_value_heads, max_len, config.head_dim)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype))

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = self.length + k.shape[2]
        if end > self.keys.shape[3]:
            raise RuntimeError(f"KV cache full: {end} positions > {self.keys.shape[3]} allocated")
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]


class Attention(nn.Module):
    def __init__(self, config: LlamaConfig, prefix: str, linear: LinearFactory, layer_idx: int) -> None:
        super().__init__()
        c = config
        self.config, self.layer_idx = c, layer_idx
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = linear(f"{prefix}.q_proj", c.hidden_size, c.num_attention_heads * c.head_dim, c.attention_bias)
        self.k_proj = linear(f"{prefix}.k_proj", c.hidden_size, c.num_key_value_heads * c.head_dim, c.attention_bias)
        self.v_proj = linear(f"{prefix}.v_proj", c.hidden_size, c.num_key_value_heads * c.head_dim, c.attention_bias)
        self.o_proj = linear(f"{prefix}.o_proj", c.num_attention_heads * c.head_dim, c.hidden_size, c.attention_bias)

    def forward(self, x, cos, sin, mask, cache: KVCache | None):
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        if self.n_kv != self.n_heads:
            k = k.repeat_interleave(self.n_heads // self.n_kv, dim=1)
            v = v.repeat_interleave(self.n_heads // self.n_kv, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: LlamaConfig, prefix: str, linear: LinearFactory) -> None:
        super().__init__()
        c = config
        self.gate_proj = linear(f"{prefix}.gate_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.up_proj = linear(f"{prefix}.up_proj", c.hidden_size, c.intermediate_size, c.mlp_bias)
        self.down_proj = linear(f"{prefix}.down_proj", c.intermediate_size, c.hidden_size, c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, idx: int, linear: LinearFactory) -> None:
        super().__init__()
        prefix = f"model.layers.{idx}"
        self.self_attn = Attention(config, f"{prefix}.self_attn", linear, idx)
        self.mlp = MLP(config, f"{prefix}.mlp", linear)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, config: LlamaConfig, linear: LinearFactory) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i, linear) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)


def build_attention_mask(
    attention_mask: torch.Tensor | None, q_len: int, past: int, dtype: torch.dtype, device, sliding_window: int | None
) -> torch.Tensor:
    """Boolean [B or 1, 1, q_len, past + q_len] mask: causal, padding, and Mistral's window."""
    k_len = past + q_len
    q_pos = torch.arange(past, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if sliding_window is not None:
        allowed = allowed & (k_pos > q_pos - sliding_window)
    allowed = allowed[None, None]
    if attention_mask is not None:
        allowed = allowed & attention_mask[:, None, None, :k_len].bool()
        # A fully padded query row (left padding) would be all False: let it see itself so SDPA
        # gives finite values; those rows are ignored by the loss and by generation.
        allowed = allowed | torch.eye(k_len, dtype=torch.bool, device=device)[None, None, past:]
    return allowed


class LlamaForCausalLM(nn.Module):
    def __init__(self, config: LlamaConfig, linear_factory: LinearFactory | None = None) -> None:
        super().__init__()
        if config.attn_implementation != "sdpa":
            _require_backend(config.attn_implementation)
        self.config = config
        self.model = LlamaModel(config, linear_factory or default_linear)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        *,
        inputs_embeds: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
    ) -> torch.Tensor:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = x.shape
        past = kv_cache.length if kv_cache is not None else 0
        if position_ids is None:
            if attention_mask is not None:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past : past + t]
            else:
                position_ids = torch.arange(past, past + t, device=x.device)[None].expand(b, t)
        cos, sin = self.model.rotary_emb(position_ids, x.dtype)
        mask = build_attention_mask(attention_mask, t, past, x.dtype, x.device, self.config.sliding_window)
        for layer in self.model.layers:
            x = layer(x, cos, sin, mask, kv_cache)
        if kv_cache is not None:
            kv_cache.length += t
        return self.lm_head(self.model.norm(x))

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
        """Greedy decoding with a KV cache from left-padded prompts; returns the new tokens."""
        prompt = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds
        b, t, _ = prompt.shape
        device = prompt.device
        if attention_mask is None:
            attention_mask = torch.ones(b, t, dtype=torch.long, device=device)
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []), device=device)
        pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)
        cache = KVCache.allocate(self.config, b, t + max_new_tokens, device, prompt.dtype)
        mask = torch.cat([attention_mask, attention_mask.new_ones(b, max_new_tokens)], dim=1)
        logits = self(inputs_embeds=prompt, attention_mask=mask[:, :t], kv_cache=cache)
        done = torch.zeros(b, dtype=torch.bool, device=device)
        out = []
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)
            token = torch.where(done, torch.full_like(token, pad), token)
            out.append(token)
            if len(eos):
                done = done | torch.isin(token, eos)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = self(token[:, None], attention_mask=mask[:, : t + step + 1], kv_cache=cache)
        return torch.stack(out, dim=1)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        linear_factory: LinearFactory | None = None,
    ) -> LlamaForCausalLM:
        """Build on the meta device and assign the checkpoint's tensors shard by shard."""
        config = LlamaConfig.from_hf(path)
        with torch.device("meta"):
            model = cls(config, linear_factory)
        load_into(
            model,
            iter_state_dict(path),
            dtype=dtype,
            device=device,
            allow_missing=[r"\.lora_[AB]\."],
            ignore=[r"rotary_emb\.inv_freq$"] + ([r"^lm_head\.weight$"] if config.tie_word_embeddings else []),
            source=str(path),
        )
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        _init_fresh_adapters(model, device, dtype)
        return model


def _init_fresh_adapters(model: nn.Module, device, dtype) -> None:
    """LoRA weights are not in a base checkpoint: materialize and initialize them (B = 0)."""
    for module in model.modules():
        if hasattr(module, "reset_lora_parameters") and module.lora_A.weight.is_meta:
            module.lora_A.to_empty(device=device)
            module.lora_B.to_empty(device=device)
            module.lora_A.to(dtype)
            module.lora_B.to(dtype)
            module.reset_lora_parameters()


def _require_backend(name: str) -> None:
    package = {"flash_attention_2": "flash_attn", "xformers": "xformers"}[name]
    try:
        __import__(package)
    except ImportError as e:
        raise ImportError(
            f"attn_implementation={name!r} needs the {package} package (pip install -e '.[gpu]'); "
            "use attn_implementation='sdpa' otherwise"
        ) from e
    raise ValueError(
        f"attn_implementation={name!r}: this build routes attention through torch SDPA, which "
        "dispatches to FlashAttention kernels on its own on supported GPUs; use 'sdpa'"
    )
