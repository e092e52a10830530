"""Connectors from vision features to LLM embeddings.

Three kinds, chosen by `model.connector` (`build_connector`):

- `grouped`: MiniGPT-v2's grouped projection (below).
- `linear`: LLaVA-1's `Linear(vision, llm)` over each patch token, named `mm_projector`.
- `mlp2x_gelu`: LLaVA-1.5's `Linear(vision, llm) -> GELU -> Linear(llm, llm)`, whose weights
  LLaVA saves as `mm_projector.0.*` and `mm_projector.2.*` (an `nn.Sequential`, the GELU at 1).

The LLaVA connectors take the patch tokens (LLaVA-1.5's `select_feature="patch"` drops CLS;
which layer they come from is the tower's `VisionConfig.output_layer`), one LLM token per patch.

MiniGPT-v2's connector drops the CLS token, concatenates every `group` consecutive visual
tokens (`view(B, N/group, group*D)`) and applies one trainable `Linear(group*D, llm_dim)`,
which MiniGPT-v2 names `llama_proj`. The "spatial" layout concatenates 2x2 neighbours on the
patch grid instead (pixel-shuffle, as in InternVL and Idefics3).

The arithmetic is the `projection` callable the builder hands in, with the signature of
`kernels.reference.grouped_projection_reference` (the default): the engine passes the Triton op
(`kernels.visual_proj.grouped_projection`, whose gather happens inside its loads) for
`model.kernels: triton`, see engine/ops.py.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pefomed.kernels.reference import grouped_projection_reference

CONNECTORS = ("grouped", "linear", "mlp2x_gelu")


def _check_placeholders(image_token_mask: torch.Tensor, expected: int, hint: str) -> None:
    per_row = image_token_mask.sum(dim=1)
    if bool((per_row != expected).any()):
        raise ValueError(
            f"each sequence needs exactly {expected} image placeholder tokens, got {per_row.tolist()}; {hint}"
        )


class GroupedProjection(nn.Module):
    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        group: int = 4,
        layout: str = "sequence",
        drop_cls: bool = True,
        projection: Callable[..., torch.Tensor] = grouped_projection_reference,
    ) -> None:
        super().__init__()
        if layout not in ("sequence", "spatial"):
            raise ValueError(f"connector layout {layout!r}: expected 'sequence' or 'spatial'")
        if layout == "spatial" and group != 4:
            raise ValueError("the spatial (2x2 pixel-shuffle) layout groups exactly 4 tokens")
        self.group, self.layout, self.drop_cls = group, layout, drop_cls
        self.llama_proj = nn.Linear(group * vision_dim, llm_dim)
        self._fn = projection

    def n_output_tokens(self, n_vision_tokens: int) -> int:
        n = n_vision_tokens - (1 if self.drop_cls else 0)
        return n // self.group

    def output_layer(self) -> nn.Linear:
        """The linear whose weight and bias the output is linear in (see `scale_output_`)."""
        return self.llama_proj

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """`[B, 1+N, D]` features -> `[B, N/group, llm_dim]` embeddings."""
        return self._fn(
            feats,
            self.llama_proj.weight,
            self.llama_proj.bias,
            group=self.group,
            layout=self.layout,
            drop_cls=self.drop_cls,
        )

    def project_into(self, feats: torch.Tensor, embeds: torch.Tensor, image_token_mask: torch.Tensor) -> torch.Tensor:
        """Write the projected tokens into `embeds [B, T, H]` at the placeholder positions.

        The rows are handed to the op, which writes them in place of a `torch.cat` of text and
        image pieces; `embeds` is cloned first so the embedding table's output stays intact.
        """
        batch, seq, hidden = embeds.shape
        expected = self.n_output_tokens(feats.shape[1])
        _check_placeholders(image_token_mask, expected, "check the prompt template and model.group")
        rows = image_token_mask.reshape(-1).nonzero().squeeze(1)
        out = embeds.reshape(batch * seq, hidden).clone()
        out = self._fn(
            feats,
            self.llama_proj.weight,
            self.llama_proj.bias,
            group=self.group,
            layout=self.layout,
            drop_cls=self.drop_cls,
            out=out,
            row_index=rows,
        )
        return out.view(batch, seq, hidden)


class PatchProjector(nn.Module):
    """LLaVA's projector over each patch token: `linear` or `mlp2x_gelu` (`mm_projector.*`).

    The weights may be kept in fp32 while the features arrive in bf16 (the trained parameters
    stay fp32, see engine/build.py); they are cast to the features' dtype, as the grouped
    projection's kernels do.
    """

    def __init__(self, vision_dim: int, llm_dim: int, kind: str = "mlp2x_gelu", drop_cls: bool = True) -> None:
        super().__init__()
        if kind == "linear":
            self.mm_projector = nn.Linear(vision_dim, llm_dim)
        elif kind == "mlp2x_gelu":
            # LLaVA-1.5's nn.Sequential: its saved keys are mm_projector.0.* and mm_projector.2.*.
            self.mm_projector = nn.Sequential(nn.Linear(vision_dim, llm_dim), nn.GELU(), nn.Linear(llm_dim, llm_dim))
        else:
            raise ValueError(f"connector {kind!r}: expected 'linear' or 'mlp2x_gelu' (or 'grouped')")
        self.kind, self.drop_cls = kind, drop_cls

    def n_output_tokens(self, n_vision_tokens: int) -> int:
        return n_vision_tokens - (1 if self.drop_cls else 0)

    def _layers(self) -> list[nn.Linear]:
        return [self.mm_projector] if self.kind == "linear" else [self.mm_projector[0], self.mm_projector[2]]

    def output_layer(self) -> nn.Linear:
        """The last linear: the output is linear in its weight and bias (see `scale_output_`)."""
        return self._layers()[-1]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """`[B, 1+N, D]` features -> `[B, N, llm_dim]` embeddings (CLS dropped)."""
        x = feats[:, 1:] if self.drop_cls else feats
        first, *rest = self._layers()
        x = F.linear(x, first.weight.to(x.dtype), first.bias.to(x.dtype))
        for layer in rest:
            # LLaVA's nn.GELU(): the exact (erf) form.
            x = F.linear(F.gelu(x), layer.weight.to(x.dtype), layer.bias.to(x.dtype))
        return x

    def project_into(self, feats: torch.Tensor, embeds: torch.Tensor, image_token_mask: torch.Tensor) -> torch.Tensor:
        """`embeds [B, T, H]` with the projected patch tokens at the placeholder positions."""
        expected = self.n_output_tokens(feats.shape[1])
        _check_placeholders(image_token_mask, expected, "check the prompt template and the vision tower's patch grid")
        projected = self(feats).to(embeds.dtype)
        # masked_scatter fills the True positions in row-major order: row by row, patch by patch.
        return embeds.masked_scatter(image_token_mask.unsqueeze(-1), projected)


@torch.no_grad()
def scale_output_(connector: GroupedProjection | PatchProjector, factor: float) -> None:
    """Multiply the connector's output by `factor`, exactly, by scaling its last linear in place.

    The output is `W x + b` of that layer, so scaling W and b scales every output by `factor`
    whatever came before (the GELU of mlp2x_gelu sits before it).
    """
    layer = connector.output_layer()
    layer.weight.mul_(factor)
    if layer.bias is not None:
        layer.bias.mul_(factor)


def build_connector(
    kind: str,
    vision_dim: int,
    llm_dim: int,
    *,
    group: int = 4,
    layout: str = "sequence",
    projection: Callable[..., torch.Tensor] = grouped_projection_reference,
) -> GroupedProjection | PatchProjector:
    """The connector `model.connector` names: MiniGPT-v2's grouped projection or LLaVA's."""
    if kind == "grouped":
        return GroupedProjection(vision_dim, llm_dim, group=group, layout=layout, projection=projection)
    if kind in ("linear", "mlp2x_gelu"):
        return PatchProjector(vision_dim, llm_dim, kind)
    raise ValueError(f"model.connector={kind!r}: expected one of {', '.join(CONNECTORS)}")
