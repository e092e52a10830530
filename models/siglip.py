"""SigLIP's vision transformer as Idefics2 uses it: native aspect ratio, variable resolution.

Idefics2 feeds SigLIP-so400m (width 1152, 27 blocks, 16 heads, MLP 4304, patch 14) images of up
to 980 px on their longer side, padded at the bottom and right to the largest image of the batch.
A patch is real when all of its pixels are (the `pixel_attention_mask` of the processor); padded
patches are masked out as keys, and each image's real patches get positions from the 70x70
table by bucketing their fractional coordinates (NaViT's "Patch n' Pack" scheme), so a 378x504
image uses the same table as a 980x980 one.

Modules and parameters carry transformers' `Idefics2VisionTransformer` names (`embeddings.
patch_embedding`, `embeddings.position_embedding`, `encoder.layers.N.self_attn.q_proj`,
`layer_norm1`, `mlp.fc1`, `post_layernorm`), so Idefics2 checkpoints load with no rename. Every
linear layer is built through `linear_factory(name, in, out, bias)` as in models/llama.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pefomed.models.llama import LinearFactory, default_linear
from pefomed.models.vit import ACTIVATIONS, HF_ACTIVATIONS


@dataclass(frozen=True)
class SiglipVisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 980  # the largest side the position table covers
    layer_norm_eps: float = 1e-6
    activation: str = "gelu_tanh"  # transformers' gelu_pytorch_tanh

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"SiglipVisionConfig: hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"SiglipVisionConfig.activation={self.activation!r}: expected one of {sorted(ACTIVATIONS)}"
            )
        if self.image_size < self.patch_size:
            raise ValueError(
                f"SiglipVisionConfig: image_size={self.image_size} is smaller than patch_size={self.patch_size}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    # models.vit.VisionConfig's names, which the engine reads (the trainer's FLOP count): the
    # blocks run, and the patch grid of the largest image.
    @property
    def depth(self) -> int:
        return self.num_layers

    @property
    def grid(self) -> int:
        return self.patches_per_side

    @classmethod
    def from_hf(cls, hf: object) -> SiglipVisionConfig:
        """From a transformers Idefics2VisionConfig / SiglipVisionConfig (or its dict)."""
        get = hf.get if isinstance(hf, dict) else lambda k, d=None: getattr(hf, k, d)
        act = get("hidden_act", "gelu_pytorch_tanh")
        if act not in HF_ACTIVATIONS:
            raise ValueError(f"vision_config.hidden_act={act!r} is not one of {sorted(HF_ACTIVATIONS)}")
        return cls(
            hidden_size=get("hidden_size"),
            intermediate_size=get("intermediate_size"),
            num_layers=get("num_hidden_layers"),
            num_heads=get("num_attention_heads"),
            patch_size=get("patch_size"),
            image_size=get("image_size"),
            layer_norm_eps=get("layer_norm_eps", 1e-6),
            activation=HF_ACTIVATIONS[act],
        )


def patch_attention_mask(pixel_attention_mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """`[N, H, W]` pixel mask -> `[N, H/p, W/p]` bool: a patch is real when all its pixels are."""
    n, h, w = pixel_attention_mask.shape
    if h % patch_size or w % patch_size:
        # The processor never produces this: crops are at least 378 px, then the patch grid floors them.
        h, w = h - h % patch_size, w - w % patch_size
        pixel_attention_mask = pixel_attention_mask[:, :h, :w]
    per_patch = pixel_attention_mask.reshape(n, h // patch_size, patch_size, w // patch_size, patch_size)
    return per_patch.to(torch.int32).sum(dim=(2, 4)) == patch_size * patch_size


def bucketed_position_ids(mask: torch.Tensor, patches_per_side: int) -> torch.Tensor:
    """Each real patch's index into the `patches_per_side`^2 position table; 0 for padding.

    An image with h x w real patches spreads them over the whole table: patch (i, j) sits at the
    fractional coordinates (i/h, j/w), which are bucketed into the table's `patches_per_side`
    equal intervals per axis. The boundaries and the float32 arithmetic are Idefics2's, so the
    indices agree with the released model's exactly.
    """
    n, max_h, max_w = mask.shape
    device = mask.device
    boundaries = torch.arange(1 / patches_per_side, 1.0, 1 / patches_per_side, device=device)
    rows = mask[:, :, 0].sum(dim=1)  # real patches per column: the image's height in patches
    cols = mask[:, 0, :].sum(dim=1)
    frac_h = torch.arange(max_h, device=device, dtype=torch.float32)[None, :] * (1.0 / rows)[:, None]
    frac_w = torch.arange(max_w, device=device, dtype=torch.float32)[None, :] * (1.0 / cols)[:, None]
    bucket_h = torch.bucketize(frac_h.clamp(max=1.0 - 1e-6), boundaries, right=True)
    bucket_w = torch.bucketize(frac_w.clamp(max=1.0 - 1e-6), boundaries, right=True)
    ids = (bucket_h[:, :, None] * patches_per_side + bucket_w[:, None, :]).reshape(n, -1)
    return torch.where(mask.reshape(n, -1), ids, torch.zeros_like(ids))


class SiglipVisionEmbeddings(nn.Module):
    def __init__(self, c: SiglipVisionConfig) -> None:
        super().__init__()
        self.config = c
        self.patch_embedding = nn.Conv2d(3, c.hidden_size, kernel_size=c.patch_size, stride=c.patch_size)
        self.position_embedding = nn.Embedding(c.patches_per_side**2, c.hidden_size)

    def forward(self, pixel_values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values).flatten(2).transpose(1, 2)
        return patches + self.position_embedding(bucketed_position_ids(mask, self.config.patches_per_side))


class SiglipAttention(nn.Module):
    def __init__(self, c: SiglipVisionConfig, prefix: str, linear: LinearFactory) -> None:
        super().__init__()
        self.num_heads, self.head_dim = c.num_heads, c.head_dim
        self.q_proj = linear(f"{prefix}.q_proj", c.hidden_size, c.hidden_size, True)
        self.k_proj = linear(f"{prefix}.k_proj", c.hidden_size, c.hidden_size, True)
        self.v_proj = linear(f"{prefix}.v_proj", c.hidden_size, c.hidden_size, True)
        self.out_proj = linear(f"{prefix}.out_proj", c.hidden_size, c.hidden_size, True)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (
            proj(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
            for proj in (self.q_proj, self.k_proj, self.v_proj)
        )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class SiglipMLP(nn.Module):
    def __init__(self, c: SiglipVisionConfig, prefix: str, linear: LinearFactory) -> None:
        super().__init__()
        self.fc1 = linear(f"{prefix}.fc1", c.hidden_size, c.intermediate_size, True)
        self.fc2 = linear(f"{prefix}.fc2", c.intermediate_size, c.hidden_size, True)
        self.act = ACTIVATIONS[c.activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, c: SiglipVisionConfig, prefix: str, linear: LinearFactory) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.self_attn = SiglipAttention(c, f"{prefix}.self_attn", linear)
        self.layer_norm2 = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)
        self.mlp = SiglipMLP(c, f"{prefix}.mlp", linear)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class SiglipEncoder(nn.Module):
    def __init__(self, c: SiglipVisionConfig, prefix: str, linear: LinearFactory) -> None:
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(c, f"{prefix}.layers.{i}", linear) for i in range(c.num_layers))


class SiglipVisionTransformer(nn.Module):
    """`pixel_values [N, 3, H, W]` (+ the patch mask) -> `[N, (H/p)(W/p), D]` after the final norm."""

    def __init__(
        self, config: SiglipVisionConfig, linear_factory: LinearFactory | None = None, prefix: str = ""
    ) -> None:
        super().__init__()
        self.config = c = config
        linear = linear_factory or default_linear
        at = f"{prefix}." if prefix else ""
        self.embeddings = SiglipVisionEmbeddings(c)
        self.encoder = SiglipEncoder(c, f"{at}encoder", linear)
        self.post_layernorm = nn.LayerNorm(c.hidden_size, eps=c.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, patch_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`patch_mask [N, H/p, W/p]` (True = real patch; see `patch_attention_mask`), or None when
        every patch is real."""
        if pixel_values.ndim != 4 or pixel_values.shape[1] != 3:
            raise ValueError(f"pixel_values must be [N, 3, H, W], got {list(pixel_values.shape)}")
        p = self.config.patch_size
        grid = (pixel_values.shape[2] // p, pixel_values.shape[3] // p)
        if max(grid) > self.config.patches_per_side:
            raise ValueError(
                f"an image of {pixel_values.shape[2]}x{pixel_values.shape[3]} px exceeds the vision tower's "
                f"{self.config.image_size} px (its position table is {self.config.patches_per_side} patches a side); "
                "resize it with the processor's longest_edge"
            )
        if patch_mask is None:
            patch_mask = torch.ones(pixel_values.shape[0], *grid, dtype=torch.bool, device=pixel_values.device)
        x = self.embeddings(pixel_values, patch_mask)
        flat = patch_mask.reshape(patch_mask.shape[0], -1)
        # Padded patches are masked as keys only; with no padding SDPA may take its unmasked kernels.
        key_mask = None if bool(flat.all()) else flat[:, None, None, :]
        for layer in self.encoder.layers:
            x = layer(x, key_mask)
        return self.post_layernorm(x)
