"""One Vision Transformer for the recipes' towers: EVA01-CLIP-g/14 (PeFoMed), BiomedCLIP's
ViT-B/16 (the lightweight LVLM of arXiv 2504.05575) and CLIP ViTs.

Parameter names follow the LAVIS / MiniGPT-v2 EVA checkpoint (`eva_vit_g.pth`), the file the
PeFoMed recipe loads: `cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.N.norm1`,
`blocks.N.attn.qkv.weight` (no bias) with separate `q_bias` / `v_bias` (EVA has no key bias),
`blocks.N.attn.proj`, `blocks.N.norm2`, `blocks.N.mlp.fc1/fc2`. CLIP adds `k_bias`, `norm_pre`
(its `pre_layrnorm`) and `norm` (its `post_layernorm`). timm's `VisionTransformer` uses these
same names, with one fused `qkv.bias` (split here into q / k / v biases). Each other layout gets
one rename function over the state dict: transformers' `Blip2VisionModel` (the same EVA
architecture), `CLIPVisionModel` and `ViTModel` (separate q/k/v projections, fused here into
`qkv`), and open_clip's timm tower (`open_clip_pytorch_model.bin`: the timm ViT under
`visual.trunk.`, CLIP's embedding projection under `visual.head.`, which is dropped).

`VisionConfig.output_layer` picks the hidden state returned, indexed as transformers'
`hidden_states` (0 = embeddings, -1 = last block, -2 = second-to-last); blocks after it are
not built and their checkpoint tensors are skipped. MiniGPT-v2 builds EVA-g with 39 of the
checkpoint's 40 blocks and no final norm, so "eva-g-14" is `num_layers=40, output_layer=-2`;
its `ln_vision` LayerNorm lives in models/vlm.py (transformers stores that same LayerNorm as
`Blip2VisionModel.post_layernorm`). LLaVA-1.5 feeds its projector the second-to-last block's
patch tokens, before any final norm, so "biomedclip-b-16" is `num_layers=12, output_layer=-2`
without the final norm (the connector drops the CLS token).

Every linear layer is made through `linear_factory(name, in, out, bias)` as in models/llama.py,
so the engine decides what each one is; `qkv` is bias-free there and its bias is added apart.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pefomed.models.llama import LinearFactory, default_linear
from pefomed.models.loading import CheckpointError, iter_state_dict, load_into, meta_tensor_names

Items = Iterable[tuple[str, torch.Tensor]]
# (checkpoint key, our name, tensor): the checkpoint key is kept for error messages.
Converted = Iterator[tuple[str, str, torch.Tensor]]


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,  # exact (erf): EVA, timm
    "quick_gelu": quick_gelu,  # OpenAI CLIP
    "gelu_tanh": gelu_tanh,  # SigLIP
}
HF_ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh"}


@dataclass(frozen=True)
class VisionConfig:
    hidden_size: int = 1408
    num_layers: int = 40  # blocks of the architecture (of the checkpoint)
    num_heads: int = 16
    intermediate_size: int = 6144
    patch_size: int = 14
    image_size: int = 224
    layer_norm_eps: float = 1e-6
    activation: str = "gelu"
    key_bias: bool = False  # CLIP has a key bias; EVA does not
    patch_bias: bool = True  # EVA's patch conv has a bias; CLIP's does not
    pre_norm: bool = False  # CLIP's `pre_layrnorm` before the blocks
    final_norm: bool = False  # the model has a final LayerNorm (CLIP's `post_layernorm`)
    normalize_output: bool = False  # apply it to every returned token (timm / open_clip style)
    output_layer: int = -1  # hidden-state index returned: 0 = embeddings, -1 = last block

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"VisionConfig: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"VisionConfig.activation={self.activation!r}: expected one of {sorted(ACTIVATIONS)}")
        if not -(self.num_layers + 1) <= self.output_layer <= self.num_layers:
            raise ValueError(
                f"VisionConfig.output_layer={self.output_layer}: with num_layers={self.num_layers} it must be "
                f"in [{-(self.num_layers + 1)}, {self.num_layers}] (hidden-state index, -1 = last block)"
            )
        if self.image_size < self.patch_size:
            raise ValueError(f"VisionConfig: image_size={self.image_size} is smaller than patch_size={self.patch_size}")
        if self.normalize_output and not self.final_norm:
            raise ValueError("VisionConfig: normalize_output=True needs final_norm=True")

    @property
    def depth(self) -> int:
        """Blocks built and run: those up to `output_layer`."""
        return self.output_layer % (self.num_layers + 1)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2


_CLIP = {
    "layer_norm_eps": 1e-5,
    "activation": "quick_gelu",
    "key_bias": True,
    "patch_bias": False,
    "pre_norm": True,
    "final_norm": True,
}
CONFIGS: dict[str, VisionConfig] = {
    # EVA01-CLIP-g/14 as MiniGPT-v2 builds it: 448 px, the second-to-last block's output.
    "eva-g-14": VisionConfig(image_size=448, output_layer=-2),
    "clip-b-16": VisionConfig(
        hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, patch_size=16, image_size=224, **_CLIP
    ),
    "clip-l-14": VisionConfig(
        hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096, patch_size=14, image_size=224, **_CLIP
    ),
    # BiomedCLIP's image tower, timm's vit_base_patch16_224 inside open_clip (pre-norm blocks,
    # LayerNorm eps 1e-6, exact GELU, q/k/v biases), as LLaVA-1.5 selects its features: the
    # second-to-last block's output, so the checkpoint's final `norm` is not built.
    "biomedclip-b-16": VisionConfig(
        hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072, patch_size=16, image_size=224,
        key_bias=True, output_layer=-2,
    ),
    "tiny-biomedclip": VisionConfig(
        hidden_size=48, num_layers=3, num_heads=4, intermediate_size=96, patch_size=8, image_size=32,
        key_bias=True, output_layer=-2,
    ),
    # The demo's tower: EVA-style, small enough for CPU.
    "tiny": VisionConfig(hidden_size=96, num_layers=3, num_heads=4, intermediate_size=256, patch_size=8, image_size=64),
    "tiny-eva": VisionConfig(
        hidden_size=64, num_layers=3, num_heads=4, intermediate_size=160, patch_size=14, image_size=56, output_layer=-2
    ),
    "tiny-clip": VisionConfig(
        hidden_size=48, num_layers=2, num_heads=4, intermediate_size=96, patch_size=8, image_size=32, **_CLIP
    ),
}


class Attention(nn.Module):
    def __init__(self, c: VisionConfig, prefix: str, linear: LinearFactory) -> None:
        super().__init__()
        self.num_heads = c.num_heads
        self.qkv = linear(f"{prefix}.qkv", c.hidden_size, 3 * c.hidden_size, False)
        self.q_bias = nn.Parameter(torch.zeros(c.hidden_size))
        self.k_bias = nn.Parameter(torch.zeros(c.hidden_size)) if c.key_bias else None
        self.v_bias = nn.Parameter(torch.zeros(c.hidden_size))
        self.proj = linear(f"{prefix}.proj", c.hidden_size, c.hidden_size, True)

    def qkv_bias(self) -> torch.Tensor:
        k_bias = self.k_bias if self.k_bias is not None else torch.zeros_like(self.q_bias)
        return torch.cat((self.q_bias, k_bias, self.v_bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        bias = self.qkv_bias()
        if type(self.qkv) is nn.Linear:
            # The frozen path: the bias rides in the GEMM's epilogue.
            qkv = F.linear(x, self.qkv.weight, bias)
        else:
            # Any other module from the factory has its own forward, which must not be bypassed.
            qkv = self.qkv(x) + bias
        q, k, v = qkv.view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, c: VisionConfig, prefix: str, linear: LinearFactory) -> None:
        super().__init__()
        self.fc1 = linear(f"{prefix}.fc1", c.hidden_size, c.intermediate_size, True)
        self.fc2 = linear(f"{prefix}.fc2", c.intermediate_size, c.hidden_size, True)
        self.act = ACTIVATIONS[c.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, c: VisionConfig, prefix: str, linear: LinearFactory) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.attn = Attention(c, f"{prefix}.attn", linear)
        self.norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = Mlp(c, f"{prefix}.mlp", linear)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, c: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size, bias=c.patch_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
    def __init__(self, config: VisionConfig, linear_factory: LinearFactory | None = None) -> None:
        super().__init__()
        self.config = c = config
        linear = linear_factory or default_linear
        self.patch_embed = PatchEmbed(c)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c.hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, c.num_patches + 1, c.hidden_size))
        self.norm_pre = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) if c.pre_norm else None
        self.blocks = nn.ModuleList(Block(c, f"blocks.{i}", linear) for i in range(c.depth))
        self.norm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps) if c.final_norm else None
        if not self.pos_embed.is_meta:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` -> the tokens of `config.output_layer`, `[B, 1 + N, D]`, CLS first."""
        size = self.config.image_size
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[-3:]) != (3, size, size):
            raise ValueError(
                f"pixel_values must be [B, 3, {size}, {size}] for this ViT (VisionConfig.image_size={size}), "
                f"got {list(pixel_values.shape)}; resize the images or set the config's image_size"
            )
        x = self.patch_embed(pixel_values)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1) + self.pos_embed
        if self.norm_pre is not None:
            x = self.norm_pre(x)
        for block in self.blocks:
            x = block(x)
        if self.config.normalize_output:
            x = self.norm(x)
        return x

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """The CLS token through the final norm: transformers' CLIP `pooler_output`."""
        cls = features[:, 0]
        return self.norm(cls) if self.norm is not None and not self.config.normalize_output else cls

    def shape_mismatch_hint(self, name: str, *_shapes: tuple[int, ...]) -> str:
        """The fix for a checkpoint tensor of the wrong shape (also used by `load_into`)."""
        if name.startswith("patch_embed."):
            fields = "hidden_size and patch_size"
        elif ".mlp." in name:
            fields = "hidden_size and intermediate_size"
        else:
            fields = "hidden_size"
        return (
            f"the VisionConfig does not match the checkpoint: set {fields} to the checkpoint's values, "
            f"or use the named config that fits it ({', '.join(CONFIGS)})"
        )

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        config: VisionConfig | str | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        layout: str = "lavis",
        linear_factory: LinearFactory | None = None,
        allow_missing: Iterable[str] = (),
    ) -> VisionTransformer:
        """Build on the meta device and assign the checkpoint's tensors one at a time.

        `config` is a VisionConfig, a name in CONFIGS, or None for a transformers folder (its
        config.json is read). The layout's rename runs while the file streams in; the position
        grid is resized bicubically when the checkpoint's differs (224 px -> 448 px for EVA-g);
        blocks after `output_layer` and a final norm the config does not have are skipped.
        Parameters matching an `allow_missing` regex may be absent from the checkpoint; they stay
        on the meta device for the caller to materialize.
        """
        if layout not in LAYOUTS:
            raise ValueError(f"vision layout {layout!r}: expected one of {sorted(LAYOUTS)}")
        config = _resolve_config(path, config, layout)
        with torch.device("meta"):
            model = cls(config, linear_factory)
        converted = LAYOUTS[layout](iter_state_dict(path))
        load_into(
            model,
            _fit(converted, model, str(path), layout),
            dtype=dtype,
            device=device,
            allow_missing=allow_missing,
            source=str(path),
        )
        leftover = meta_tensor_names(model, allow=allow_missing)
        if leftover:
            raise CheckpointError(f"{path}: no values for {leftover[:8]} after loading (no checkpoint key, no init)")
        return model


def _resolve_config(path: str | Path, config: VisionConfig | str | None, layout: str) -> VisionConfig:
    if isinstance(config, VisionConfig):
        return config
    if isinstance(config, str):
        if config not in CONFIGS:
            raise ValueError(f"vision config {config!r}: expected one of {sorted(CONFIGS)}")
        return CONFIGS[config]
    if layout == "lavis":
        raise ValueError(f"{path}: a LAVIS checkpoint has no config file; pass config= (e.g. 'eva-g-14')")
    if layout == "open_clip":
        raise ValueError(
            f"{path}: an open_clip checkpoint names its timm model, not a VisionConfig; pass config= "
            "(e.g. 'biomedclip-b-16' for BiomedCLIP's vit_base_patch16_224)"
        )
    return config_from_hf(path)


def _fit(converted: Converted, model: VisionTransformer, source: str, layout: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Skip what the config leaves out, resize the position grid, and check every shape."""
    config = model.config
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    for key, name, tensor in converted:
        block = re.match(r"blocks\.(\d+)\.", name)
        if block and int(block.group(1)) >= config.depth:
            continue  # after output_layer (MiniGPT-v2 keeps 39 of EVA-g's 40 blocks)
        if name.startswith("norm.") and not config.final_norm:
            continue  # a final norm this tower does not use (BLIP-2's ln_vision in HF files)
        if name == "pos_embed":
            tensor = interpolate_pos_embed(tensor, config.grid, key)
        if name in expected and tuple(tensor.shape) != expected[name]:
            raise CheckpointError(
                f"{source}: {key} has shape {list(tensor.shape)} but this ViT's {name} is "
                f"{list(expected[name])}: {model.shape_mismatch_hint(name)}; check also that "
                f"layout={layout!r} is the file's layout"
            )
        yield name, tensor


def interpolate_pos_embed(pos: torch.Tensor, grid: int, key: str = "pos_embed") -> torch.Tensor:
    """`[1, 1 + g*g, D]` -> `[1, 1 + grid*grid, D]`: bicubic on the grid, CLS kept (LAVIS' rule)."""
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise CheckpointError(f"{key}: expected a position embedding of shape [1, 1 + N, D], got {list(pos.shape)}")
    n = pos.shape[1] - 1
    old = round(n**0.5)
    if old * old != n:
        raise CheckpointError(
            f"{key} has {n} patch positions (shape {list(pos.shape)}), not a square grid; only square "
            "position grids (image_size / patch_size squared, plus CLS) can be loaded"
        )
    if old == grid:
        return pos
    # LAVIS interpolates in float32 whatever the file's dtype.
    cls_pos, patches = pos[:, :1].float(), pos[:, 1:].float()
    patches = patches.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat((cls_pos, patches.permute(0, 2, 3, 1).flatten(1, 2)), dim=1)


# --- layouts -----------------------------------------------------------------------------------

LAVIS_ROOTS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.")
# Heads of EVA pre-training / linear probing that LAVIS' ViT does not have either.
LAVIS_DROPPED = ("head.", "fc_norm.")


def _convert_lavis(items: Items) -> Converted:
    """Our own layout; a whole BLIP-2 / MiniGPT checkpoint gives its `visual_encoder.` part."""
    for key, tensor in items:
        name = key.removeprefix("visual_encoder.")
        if name.startswith(LAVIS_DROPPED) or not name.startswith(LAVIS_ROOTS):
            continue  # another part of a whole model (ln_vision, Qformer, llama_proj, ...)
        yield key, name, tensor


_NORM_MLP = {
    f"{theirs}.{p}": f"{ours}.{p}"
    for theirs, ours in (("layer_norm1", "norm1"), ("layer_norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2"))
    for p in ("weight", "bias")
}
BLIP2_TOP = {
    "embeddings.class_embedding": "cls_token",
    "embeddings.position_embedding": "pos_embed",
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "embeddings.patch_embedding.bias": "patch_embed.proj.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}
BLIP2_LAYER = {
    "self_attn.qkv.weight": "attn.qkv.weight",
    "self_attn.projection.weight": "attn.proj.weight",
    "self_attn.projection.bias": "attn.proj.bias",
    **_NORM_MLP,
}
_LAYER_KEY = re.compile(r"encoder\.layers\.(\d+)\.(.+)")


def _hf_vision_key(key: str, roots: tuple[str, ...]) -> str | None:
    """The key inside the vision tower, or None for another tower of a whole HF model."""
    key = key.removeprefix("vision_model.")
    return key if key.startswith(roots) else None


def _convert_hf_blip2(items: Items) -> Converted:
    for key, tensor in items:
        inner = _hf_vision_key(key, ("embeddings.", "encoder.", "post_layernorm."))
        if inner is None:
            continue  # qformer, language_model, query_tokens, ...
        if inner in BLIP2_TOP:
            yield key, BLIP2_TOP[inner], tensor
            continue
        layer = _LAYER_KEY.fullmatch(inner)
        if layer is None:
            yield key, inner, tensor  # unknown: load_into reports it
            continue
        i, rest = layer.groups()
        if rest == "self_attn.qkv.bias":
            q, k, v = tensor.chunk(3)
            if torch.count_nonzero(k):
                raise CheckpointError(
                    f"{key}: the key third of the fused qkv bias is non-zero, but EVA has no key bias "
                    "(only q_bias and v_bias); this is not an EVA / BLIP-2 vision checkpoint"
                )
            yield key, f"blocks.{i}.attn.q_bias", q
            yield key, f"blocks.{i}.attn.v_bias", v
            continue
        yield key, f"blocks.{i}.{BLIP2_LAYER.get(rest, rest)}", tensor


CLIP_TOP = {
    "embeddings.patch_embedding.weight": "patch_embed.proj.weight",
    "pre_layrnorm.weight": "norm_pre.weight",
    "pre_layrnorm.bias": "norm_pre.bias",
    "post_layernorm.weight": "norm.weight",
    "post_layernorm.bias": "norm.bias",
}
CLIP_LAYER = {
    "self_attn.q_proj.bias": "attn.q_bias",
    "self_attn.k_proj.bias": "attn.k_bias",
    "self_attn.v_proj.bias": "attn.v_bias",
    "self_attn.out_proj.weight": "attn.proj.weight",
    "self_attn.out_proj.bias": "attn.proj.bias",
    **_NORM_MLP,
}
_QKV_WEIGHT = re.compile(r"self_attn\.([qkv])_proj\.weight")


def _convert_hf_clip(items: Items) -> Converted:
    """transformers CLIP vision tower; q/k/v weights are held until a layer has all three."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in items:
        inner = _hf_vision_key(key, ("embeddings.", "pre_layrnorm.", "encoder.", "post_layernorm."))
        if inner is None or inner == "embeddings.position_ids":
            continue  # text tower, projections, logit_scale; position_ids is an index buffer
        if inner == "embeddings.class_embedding":
            yield key, "cls_token", tensor.reshape(1, 1, -1)
        elif inner == "embeddings.position_embedding.weight":
            yield key, "pos_embed", tensor.unsqueeze(0)
        elif inner in CLIP_TOP:
            yield key, CLIP_TOP[inner], tensor
        elif (layer := _LAYER_KEY.fullmatch(inner)) is None:
            yield key, inner, tensor
        elif (part := _QKV_WEIGHT.fullmatch(layer.group(2))) is not None:
            i = layer.group(1)
            parts = pending.setdefault(i, {})
            parts[part.group(1)] = tensor
            if len(parts) == 3:
                del pending[i]
                yield key, f"blocks.{i}.attn.qkv.weight", torch.cat([parts[p] for p in "qkv"])
        else:
            i, rest = layer.groups()
            yield key, f"blocks.{i}.{CLIP_LAYER.get(rest, rest)}", tensor
    for i, parts in pending.items():
        missing = sorted(set("qkv") - parts.keys())
        raise CheckpointError(
            f"encoder.layers.{i}.self_attn: the checkpoint has no {'/'.join(p + '_proj.weight' for p in missing)}; "
            "it is incomplete or not a CLIP vision checkpoint"
        )


# timm ViT names that are ours as they are (`norm_pre` is CLIP-style towers' pre-norm).
TIMM_ROOTS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "norm.", "norm_pre.")
# timm's classifier and the norm of average pooling: not part of the token features.
TIMM_DROPPED = ("head.", "fc_norm.")
OPEN_CLIP_TRUNK = "visual.trunk."
_TIMM_QKV_BIAS = re.compile(r"blocks\.(\d+)\.attn\.qkv\.bias")


def _convert_open_clip(items: Items) -> Converted:
    """open_clip's timm tower (`visual.trunk.*`), or a bare timm ViT state dict.

    open_clip's `TimmModel` puts the timm ViT at `visual.trunk` and CLIP's projection to the
    joint embedding at `visual.head` (BiomedCLIP: `visual.head.proj.weight`, 768 -> 512); the
    text tower (`text.*`, or open_clip's own `transformer.*`, `token_embedding`, ...) and
    `logit_scale` are other parts of the model. timm fuses the q/k/v biases into `qkv.bias`.
    """
    for key, tensor in items:
        if key.startswith("visual."):
            if key.startswith("visual.head."):
                continue
            if not key.startswith(OPEN_CLIP_TRUNK):
                raise CheckpointError(
                    f"{key}: an open_clip vision tower outside `visual.trunk.` (open_clip's own VisionTransformer, "
                    "`visual.conv1` / `visual.transformer.resblocks`), not a timm ViT; layout 'open_clip' reads "
                    "timm-tower checkpoints such as BiomedCLIP's open_clip_pytorch_model.bin"
                )
            name = key[len(OPEN_CLIP_TRUNK):]
        elif key.startswith(TIMM_ROOTS + TIMM_DROPPED):
            name = key  # a timm checkpoint of the ViT alone
        else:
            continue  # the text tower, logit_scale, ...
        if name.startswith(TIMM_DROPPED):
            continue
        qkv_bias = _TIMM_QKV_BIAS.fullmatch(name)
        if qkv_bias is None:
            yield key, name, tensor
            continue
        i = qkv_bias.group(1)
        for part, piece in zip("qkv", tensor.chunk(3)):
            yield key, f"blocks.{i}.attn.{part}_bias", piece


# transformers' ViTModel, in the module names of transformers 5 and in the checkpoint names that
# the hub's files (written by transformers 4) carry.
VIT_TOP = {
    "embeddings.cls_token": "cls_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}
VIT_LAYER = {
    **{f"{theirs}.{p}": f"{ours}.{p}" for p in ("weight", "bias") for theirs, ours in (
        ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
        ("attention.o_proj", "attn.proj"), ("attention.output.dense", "attn.proj"),
        ("mlp.fc1", "mlp.fc1"), ("intermediate.dense", "mlp.fc1"),
        ("mlp.fc2", "mlp.fc2"), ("output.dense", "mlp.fc2"),
    )},
}
_VIT_LAYER_KEY = re.compile(r"(?:encoder\.layer|layers)\.(\d+)\.(.+)")
_VIT_QKV = re.compile(r"attention\.(?:([qkv])_proj|attention\.(query|key|value))\.(weight|bias)")


def _convert_hf_vit(items: Items) -> Converted:
    """transformers ViTModel (or the `vit.` part of ViTForImageClassification)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in items:
        inner = key.removeprefix("vit.")
        if inner.startswith(("pooler.", "classifier.")) or inner == "embeddings.mask_token":
            continue  # heads and the masked-image-modelling token: not the features
        if inner in VIT_TOP:
            yield key, VIT_TOP[inner], tensor
            continue
        layer = _VIT_LAYER_KEY.fullmatch(inner)
        if layer is None:
            yield key, inner, tensor
            continue
        i, rest = layer.groups()
        qkv = _VIT_QKV.fullmatch(rest)
        if qkv is None:
            yield key, f"blocks.{i}.{VIT_LAYER.get(rest, rest)}", tensor
            continue
        part = qkv.group(1) or qkv.group(2)[0]
        if qkv.group(3) == "bias":
            yield key, f"blocks.{i}.attn.{part}_bias", tensor
            continue
        parts = pending.setdefault(i, {})
        parts[part] = tensor
        if len(parts) == 3:
            del pending[i]
            yield key, f"blocks.{i}.attn.qkv.weight", torch.cat([parts[p] for p in "qkv"])
    for i, parts in pending.items():
        missing = sorted(set("qkv") - parts.keys())
        raise CheckpointError(
            f"layers.{i}.attention: the checkpoint has no {'/'.join(p + '_proj.weight' for p in missing)}; "
            "it is incomplete or not a ViT checkpoint"
        )


LAYOUTS: dict[str, Callable[[Items], Converted]] = {
    "lavis": _convert_lavis,
    "hf_blip2": _convert_hf_blip2,
    "hf_clip": _convert_hf_clip,
    "hf_vit": _convert_hf_vit,
    "open_clip": _convert_open_clip,
}


def convert_state_dict(state: Mapping[str, torch.Tensor] | Items, layout: str) -> dict[str, torch.Tensor]:
    """A whole state dict in `layout` renamed to this module's names (no tensor is copied
    except CLIP's fused q/k/v weight)."""
    if layout not in LAYOUTS:
        raise ValueError(f"vision layout {layout!r}: expected one of {sorted(LAYOUTS)}")
    items = state.items() if isinstance(state, Mapping) else state
    return {name: tensor for _, name, tensor in LAYOUTS[layout](items)}


def from_hf_blip2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `Blip2VisionModel` -> LAVIS EVA names (the fused qkv bias split in q / v)."""
    return convert_state_dict(state, "hf_blip2")


def from_hf_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `CLIPVisionModel` -> our names (q/k/v weights fused into qkv)."""
    return convert_state_dict(state, "hf_clip")


def from_open_clip(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip timm tower (`visual.trunk.*`) -> our names (the fused qkv bias split in q / k / v)."""
    return convert_state_dict(state, "open_clip")


def to_hf_vit(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names -> transformers 5 `ViTModel` module names: the inverse of `from_hf_vit`."""
    top = {ours: theirs for theirs, ours in VIT_TOP.items()}
    layer = {
        "norm1": "layernorm_before", "norm2": "layernorm_after", "attn.proj": "attention.o_proj",
        "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
    }
    out = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)\.(weight|bias)|blocks\.(\d+)\.attn\.([qkv])_bias", name)
        if block is None:
            raise CheckpointError(f"{name}: no ViTModel counterpart (a ViT has no norm_pre)")
        if block.group(4) is not None:
            out[f"layers.{block.group(4)}.attention.{block.group(5)}_proj.bias"] = tensor
        elif block.group(2) == "attn.qkv":
            for part, piece in zip("qkv", tensor.chunk(3)):
                out[f"layers.{block.group(1)}.attention.{part}_proj.weight"] = piece
        elif block.group(2) in layer:
            out[f"layers.{block.group(1)}.{layer[block.group(2)]}.{block.group(3)}"] = tensor
        else:
            raise CheckpointError(f"{name}: no ViTModel counterpart")
    return out


def from_hf_vit(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers `ViTModel` (4.x checkpoint or 5.x module names) -> our names."""
    return convert_state_dict(state, "hf_vit")


def to_hf_blip2(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our (LAVIS) names -> transformers `Blip2VisionModel`: the inverse of `from_hf_blip2`."""
    top = {ours: theirs for theirs, ours in BLIP2_TOP.items()}
    layer = {ours: theirs for theirs, ours in BLIP2_LAYER.items()}
    out = {}
    for name, tensor in state.items():
        if name in top:
            out[top[name]] = tensor
            continue
        block = re.fullmatch(r"blocks\.(\d+)\.(.+)", name)
        if block is None:
            raise CheckpointError(f"{name}: no Blip2VisionModel counterpart (EVA has no k_bias / norm_pre)")
        i, rest = block.groups()
        prefix = f"encoder.layers.{i}."
        if rest == "attn.v_bias":
            continue  # written with q_bias
        if rest == "attn.q_bias":
            v_bias = state[f"blocks.{i}.attn.v_bias"]
            out[prefix + "self_attn.qkv.bias"] = torch.cat((tensor, torch.zeros_like(tensor), v_bias))
        elif rest in layer:
            out[prefix + layer[rest]] = tensor
        else:
            raise CheckpointError(f"{name}: no Blip2VisionModel counterpart (EVA has no k_bias / norm_pre)")
    return out


def config_from_hf(hf_config: Any, image_size: int | None = None, output_layer: int = -1) -> VisionConfig:
    """A VisionConfig from a transformers Blip2(Vision)Config / CLIP(Vision)Config / ViTConfig or its folder."""
    if isinstance(hf_config, (str, Path)):
        from transformers import AutoConfig

        hf_config = AutoConfig.from_pretrained(str(hf_config), local_files_only=True)
    hf_config = getattr(hf_config, "vision_config", hf_config)  # a whole Blip2Config / CLIPConfig
    model_type = getattr(hf_config, "model_type", "")
    if model_type not in ("clip_vision_model", "blip_2_vision_model", "vit"):
        raise ValueError(
            f"config_from_hf: model_type {model_type!r} is not a BLIP-2, CLIP or ViT vision tower; "
            "build a VisionConfig by hand or pick one of " + ", ".join(CONFIGS)
        )
    if hf_config.hidden_act not in HF_ACTIVATIONS:
        raise ValueError(f"config_from_hf: hidden_act {hf_config.hidden_act!r} is not one of {sorted(HF_ACTIVATIONS)}")
    if model_type == "vit":
        if not hf_config.qkv_bias:
            raise ValueError("config_from_hf: ViTConfig.qkv_bias=False; this ViT builds q/k/v biases")
        return VisionConfig(
            hidden_size=hf_config.hidden_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            intermediate_size=hf_config.intermediate_size,
            patch_size=hf_config.patch_size,
            image_size=image_size or hf_config.image_size,
            layer_norm_eps=hf_config.layer_norm_eps,
            activation=HF_ACTIVATIONS[hf_config.hidden_act],
            key_bias=True,
            final_norm=output_layer in (-1, hf_config.num_hidden_layers),
            normalize_output=output_layer in (-1, hf_config.num_hidden_layers),
            output_layer=output_layer,
        )
    clip = model_type == "clip_vision_model"
    if not clip and not getattr(hf_config, "qkv_bias", True):
        raise ValueError("config_from_hf: Blip2VisionConfig.qkv_bias=False; EVA towers have q and v biases")
    return VisionConfig(
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_heads=hf_config.num_attention_heads,
        intermediate_size=hf_config.intermediate_size,
        patch_size=hf_config.patch_size,
        image_size=image_size or hf_config.image_size,
        layer_norm_eps=hf_config.layer_norm_eps,
        activation=HF_ACTIVATIONS[hf_config.hidden_act],
        key_bias=clip,
        patch_bias=not clip,
        pre_norm=clip,
        final_norm=clip,
        output_layer=output_layer,
    )
