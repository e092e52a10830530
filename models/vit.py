"""One Vision Transformer for the recipes' towers: EVA01-CLIP-g/14 (PeFoMed) and CLIP ViTs.

Parameter names follow the LAVIS / MiniGPT-v2 EVA checkpoint (`eva_vit_g.pth`), the file the
PeFoMed recipe loads: `patch_embed.proj`, `cls_token`, `pos_embed`, `blocks.N.norm1`,
`blocks.N.attn.qkv.weight` with separate `q_bias` / `v_bias` (EVA has no key bias),
`blocks.N.attn.proj`, `blocks.N.norm2`, `blocks.N.mlp.fc1/fc2`. The transformers layouts
(`Blip2VisionModel`, which is the same EVA architecture, and `CLIPVisionModel`) each get one
rename function below. MiniGPT-v2 builds EVA with 39 of the checkpoint's 40 blocks (it uses
the second-to-last layer) and no final norm; its `ln_vision` lives in models/vlm.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models.loading import CheckpointError, load_into, read_state_dict


@dataclass
class VisionConfig:
    hidden_size: int = 1408
    num_layers: int = 39
    num_heads: int = 16
    intermediate_size: int = 6144
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"  # "gelu" (EVA, exact erf) or "quick_gelu" (OpenAI CLIP)
    key_bias: bool = False  # CLIP has a key bias; EVA does not
    patch_bias: bool = True  # EVA's patch conv has a bias; CLIP's does not
    pre_norm: bool = False  # CLIP's `pre_layrnorm` before the blocks
    final_norm: bool = False  # keep a final LayerNorm (CLIP's post_layernorm) in the state dict
    apply_final_norm: bool = False  # and apply it to every token

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


CONFIGS: dict[str, VisionConfig] = {
    "eva-g-14": VisionConfig(image_size=448),
    "clip-b-16": VisionConfig(
        hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, patch_size=16, image_size=224,
        layer_norm_eps=1e-5, activation="quick_gelu", key_bias=True, patch_bias=False, pre_norm=True, final_norm=True,
    ),
    "clip-l-14": VisionConfig(
        hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, patch_size=14, image_size=224,
        layer_norm_eps=1e-5, activation="quick_gelu", key_bias=True, patch_bias=False, pre_norm=True, final_norm=True,
    ),
    # The demo's tower: EVA-style, small enough for CPU.
    "tiny": VisionConfig(hidden_size=96, num_layers=3, num_heads=4, intermediate_size=256, patch_size=8, image_size=64),
}


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = nn.Linear(c.hidden_size, 3 * c.hidden_size, bias=False)
        self.q_bias = nn.Parameter(torch.zeros(c.hidden_size))
        self.k_bias = nn.Parameter(torch.zeros(c.hidden_size)) if c.key_bias else None
        self.v_bias = nn.Parameter(torch.zeros(c.hidden_size))
        self.proj = nn.Linear(c.hidden_size, c.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        k_bias = self.k_bias if self.k_bias is not None else torch.zeros_like(self.v_bias)
        qkv = F.linear(x, self.qkv.weight, torch.cat((self.q_bias, k_bias, self.v_bias)))
        q, k, v = qkv.view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(c.hidden_size, c.intermediate_size)
        self.fc2 = nn.Linear(c.intermediate_size, c.hidden_size)
        self.act = quick_gelu if c.activation == "quick_gelu" else F.gelu

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = Mlp(c)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size, bias=c.patch_bias)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.hidden_size))
        self.norm_pre = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) if c.pre_norm else None
        self.blocks = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) if c.final_norm else None
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> all tokens `[B, 1 + N, D]`, CLS first."""
        expected = self.config.image_size
        if pixel_values.shape[-2:] != (expected, expected):
            raise ValueError(f"images must be {expected}x{expected}, got {tuple(pixel_values.shape[-2:])}")
        x = self.patch_embed(pixel_values)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        if self.norm is not None and self.config.apply_final_norm:
            x = self.norm(x)
        return x

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: VisionConfig,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layout: str = "lavis",
    ) -> VisionTransformer:
        """Build on meta, convert the layout, interpolate the position grid, assign."""
        converters = {"lavis": lambda sd: sd, "hf_blip2": from_hf_blip2, "hf_clip": from_hf_clip}
        if layout not in converters:
            raise ValueError(f"vision layout {layout!r}: expected one of {sorted(converters)}")
        state = converters[layout](read_state_dict(path))
        state = interpolate_pos_embed(state, config.grid)
        n_blocks = config.num_layers
        with torch.device("meta"):
            model = cls(config)
        # MiniGPT-v2 drops the checkpoint's last block(s): keep the first num_layers.
        extra = [rf"^blocks\.{i}\." for i in range(n_blocks, n_blocks + 64)]
        load_into(model, state, dtype=dtype, device=device, ignore=extra, source=str(path))
        return model


def interpolate_pos_embed(state: dict[str, torch.Tensor], grid: int) -> dict[str, torch.Tensor]:
    """Resize the position grid bicubically (CLS kept), as LAVIS does for 224 -> 448 px."""
    pos = state.get("pos_embed")
    if pos is None:
        return state
    n = pos.shape[1] - 1
    old = int(round(n**0.5))
    if old * old != n:
        raise CheckpointError(f"pos_embed has {n} patch positions, not a square grid")
    if old == grid:
        return state
    dtype = pos.dtype
    cls_pos, patches = pos[:, :1], pos[:, 1:].float()
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).flatten(1, 2).to(dtype)
    return {**state, "pos_embed": torch.cat((cls_pos, patches), dim=1)}


def _strip(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def from_hf_blip2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `Blip2VisionModel` -> LAVIS EVA names (the fused qkv bias is split)."""
    state = _strip(_strip(state, "vision_model."), "")
    out = {
        "cls_token": state["embeddings.class_embedding"],
        "pos_embed": state["embeddings.position_embedding"],
        "patch_embed.proj.weight": state["embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": state["embeddings.patch_embedding.bias"],
    }
    for key, value in state.items():
        if not key.startswith("encoder.layers."):
            continue
        i, rest = key[len("encoder.layers."):].split(".", 1)
        prefix = f"blocks.{i}."
        if rest == "self_attn.qkv.bias":
            q, k, v = value.chunk(3)
            if k.abs().max() > 0:
                raise CheckpointError(f"encoder.layers.{i}.self_attn.qkv.bias has a non-zero key part; EVA has no key bias")
            out[prefix + "attn.q_bias"], out[prefix + "attn.v_bias"] = q, v
            continue
        rest = (rest.replace("self_attn.qkv", "attn.qkv").replace("self_attn.projection", "attn.proj")
                .replace("layer_norm1", "norm1").replace("layer_norm2", "norm2"))
        out[prefix + rest] = value
    return out


def to_hf_blip2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `from_hf_blip2` (used to build LAVIS-layout files from HF models)."""
    out = {
        "embeddings.class_embedding": state["cls_token"],
        "embeddings.position_embedding": state["pos_embed"],
        "embeddings.patch_embedding.weight": state["patch_embed.proj.weight"],
        "embeddings.patch_embedding.bias": state["patch_embed.proj.bias"],
    }
    for key, value in state.items():
        if not key.startswith("blocks."):
            continue
        i, rest = key[len("blocks."):].split(".", 1)
        prefix = f"encoder.layers.{i}."
        if rest == "attn.q_bias":
            v_bias = state[f"blocks.{i}.attn.v_bias"]
            out[prefix + "self_attn.qkv.bias"] = torch.cat((value, torch.zeros_like(value), v_bias))
            continue
        if rest == "attn.v_bias":
            continue
        rest = (rest.replace("attn.qkv", "self_attn.qkv").replace("attn.proj", "self_attn.projection")
                .replace("norm1", "layer_norm1").replace("norm2", "layer_norm2"))
        out[prefix + rest] = value
    return out


def from_hf_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `CLIPVisionModel` -> our names (separate q/k/v are fused into qkv)."""
    state = _strip(state, "vision_model.")
    out = {
        "cls_token": state["embeddings.class_embedding"].reshape(1, 1, -1),
        "pos_embed": state["embeddings.position_embedding.weight"].unsqueeze(0),
        "patch_embed.proj.weight": state["embeddings.patch_embedding.weight"],
        "norm_pre.weight": state["pre_layrnorm.weight"],
        "norm_pre.bias": state["pre_layrnorm.bias"],
        "norm.weight": state["post_layernorm.weight"],
        "norm.bias": state["post_layernorm.bias"],
    }
    layers = sorted({int(k.split(".")[2]) for k in state if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"blocks.{i}."
        attn = src + "self_attn."
        out[dst + "attn.qkv.weight"] = torch.cat([state[attn + f"{p}_proj.weight"] for p in "qkv"])
        for p in "qkv":
            out[dst + f"attn.{p}_bias"] = state[attn + f"{p}_proj.bias"]
        out[dst + "attn.proj.weight"] = state[attn + "out_proj.weight"]
        out[dst + "attn.proj.bias"] = state[attn + "out_proj.bias"]
        for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[dst + ours + ".weight"] = state[src + theirs + ".weight"]
            out[dst + ours + ".bias"] = state[src + theirs + ".bias"]
    return out


def config_from_hf(hf_config, image_size: int | None = None) -> VisionConfig:
    """A VisionConfig from a transformers Blip2VisionConfig / CLIPVisionConfig."""
    clip = getattr(hf_config, "model_type", "") in ("clip_vision_model", "clip")
    return VisionConfig(
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        patch_size=hf_config.patch_size,
        image_size=image_size or hf_config.image_size,
        layer_norm_eps=hf_config.layer_norm_eps,
        activation="quick_gelu" if hf_config.hidden_act == "quick_gelu" else "gelu",
        key_bias=clip,
        patch_bias=not clip,
        pre_norm=clip,
        final_norm=clip,
    )

