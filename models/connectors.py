"""Connectors from vision features to LLM embeddings.

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
from torch import nn

from pefomed.kernels.reference import grouped_projection_reference


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
        per_row = image_token_mask.sum(dim=1)
        expected = self.n_output_tokens(feats.shape[1])
        if bool((per_row != expected).any()):
            raise ValueError(
                f"each sequence needs exactly {expected} image placeholder tokens, got "
                f"{per_row.tolist()}; check the prompt template and model.group"
            )
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
