"""Idefics2's perceiver resampler: a fixed number of latents that read an image's patch tokens.

Each of its `depth` layers lets the latents attend to the concatenation of the context (the
image's tokens, already projected to the LLM's width) and the latents themselves, with grouped
query attention (16 heads of 96 on 4 key/value heads in Idefics2-8B), RMSNorm before attention
and before the SwiGLU MLP (4x width), and no positions: the latents are queries, the patch
tokens keys and values. Padded patches are masked out as keys. A final RMSNorm gives the
`n_latents` tokens (64) that stand for the image in the LLM's sequence.

Names are transformers' `Idefics2PerceiverResampler` (`latents`, `layers.N.input_latents_norm`,
`input_context_norm`, `self_attn.{q,k,v,o}_proj`, `post_attention_layernorm`,
`mlp.{gate,up,down}_proj`, `norm`). `SwiGLU` is also the modality projection's MLP
(`Idefics2MLP`). Linear layers come from `linear_factory(name, in, out, bias)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pefomed.models.llama import LinearFactory, RMSNorm, default_linear

MLP_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu}


@dataclass(frozen=True)
class PerceiverConfig:
    hidden_size: int = 4096  # the LLM's width
    n_latents: int = 64
    depth: int = 3
    n_heads: int = 16
    head_dim: int = 96
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-5
    activation: str = "silu"

    def __post_init__(self) -> None:
        if self.n_heads % self.num_key_value_heads:
            raise ValueError(
                f"PerceiverConfig: n_heads={self.n_heads} must be a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if self.activation not in MLP_ACTIVATIONS:
            raise ValueError(
                f"PerceiverConfig.activation={self.activation!r}: expected one of {sorted(MLP_ACTIVATIONS)}"
            )

    @classmethod
    def from_hf(cls, hf: object, text_hidden_size: int, text_rms_norm_eps: float) -> PerceiverConfig:
        """From a transformers Idefics2PerceiverConfig (or its dict); as transformers does, a
        perceiver width that differs from the text model's is replaced by the text model's."""
        get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
        hidden, eps = get("hidden_size", text_hidden_size), get("rms_norm_eps", text_rms_norm_eps)
        if hidden != text_hidden_size:
            hidden, eps = text_hidden_size, text_rms_norm_eps
        return cls(
            hidden_size=hidden,
            n_latents=get("resampler_n_latents", 64),
            depth=get("resampler_depth", 3),
            n_heads=get("resampler_n_heads", 16),
            head_dim=get("resampler_head_dim", 96),
            num_key_value_heads=get("num_key_value_heads", 4),
            rms_norm_eps=eps,
            activation=get("hidden_act", "silu"),
        )


class SwiGLU(nn.Module):
    """`down(act(gate(x)) * up(x))`, no biases: Idefics2's MLP (perceiver and modality projection)."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, activation: str, prefix: str, linear: LinearFactory):
        super().__init__()
        self.gate_proj = linear(f"{prefix}.gate_proj", d_in, d_hidden, False)
        self.up_proj = linear(f"{prefix}.up_proj", d_in, d_hidden, False)
        self.down_proj = linear(f"{prefix}.down_proj", d_hidden, d_out, False)
        self.act = MLP_ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PerceiverAttention(nn.Module):
    def __init__(self, c: PerceiverConfig, prefix: str, linear: LinearFactory) -> None:
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = c.n_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = linear(f"{prefix}.q_proj", c.hidden_size, c.n_heads * c.head_dim, False)
        self.k_proj = linear(f"{prefix}.k_proj", c.hidden_size, c.num_key_value_heads * c.head_dim, False)
        self.v_proj = linear(f"{prefix}.v_proj", c.hidden_size, c.num_key_value_heads * c.head_dim, False)
        self.o_proj = linear(f"{prefix}.o_proj", c.n_heads * c.head_dim, c.hidden_size, False)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, _ = latents.shape
        keys_in = torch.cat((context, latents), dim=1)
        q = self.q_proj(latents).view(b, n, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(keys_in).view(b, keys_in.shape[1], self.n_kv, self.head_dim).transpose(1, 2)
        v = self.v_proj(keys_in).view(b, keys_in.shape[1], self.n_kv, self.head_dim).transpose(1, 2)
        groups = self.n_heads // self.n_kv
        if groups > 1:  # each key/value head serves `groups` consecutive query heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))


class PerceiverLayer(nn.Module):
    def __init__(self, c: PerceiverConfig, prefix: str, linear: LinearFactory) -> None:
        super().__init__()
        self.input_latents_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.input_context_norm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = PerceiverAttention(c, f"{prefix}.self_attn", linear)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = SwiGLU(c.hidden_size, 4 * c.hidden_size, c.hidden_size, c.activation, f"{prefix}.mlp", linear)

    def forward(self, latents: torch.Tensor, context: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        latents = latents + self.self_attn(self.input_latents_norm(latents), self.input_context_norm(context), key_mask)
        return latents + self.mlp(self.post_attention_layernorm(latents))


class PerceiverResampler(nn.Module):
    """`context [N, L, hidden]` (+ its key mask `[N, L]`) -> `[N, n_latents, hidden]`."""

    def __init__(self, config: PerceiverConfig, linear_factory: LinearFactory | None = None, prefix: str = "") -> None:
        super().__init__()
        self.config = c = config
        linear = linear_factory or default_linear
        at = f"{prefix}." if prefix else ""
        # transformers initializes the latents to ones; a checkpoint replaces them.
        self.latents = nn.Parameter(torch.ones(c.n_latents, c.hidden_size))
        self.layers = nn.ModuleList(PerceiverLayer(c, f"{at}layers.{i}", linear) for i in range(c.depth))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)

    def forward(self, context: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        n = context.shape[0]
        latents = self.latents.unsqueeze(0).expand(n, -1, -1)
        key_mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            # The latents are keys too and are never masked.
            latents_kept = attention_mask.new_ones(n, self.config.n_latents, dtype=torch.bool)
            keep = torch.cat((attention_mask.bool(), latents_kept), dim=1)
            key_mask = keep[:, None, None, :]
        for layer in self.layers:
            latents = layer(latents, context, key_mask)
        return self.norm(latents)
