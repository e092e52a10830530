"""The assembled vision-language model: frozen ViT, ln_vision, connector, LLM.

The ViT runs under `no_grad` (it is frozen), followed by MiniGPT-v2's frozen LayerNorm. The
connector's output fills the image-placeholder positions of the prompt's embeddings, and the
LLM's loss covers only the answer tokens (`labels != -100`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = -100


class VisionLanguageModel(nn.Module):
    def __init__(
        self,
        vit: nn.Module,
        llm: nn.Module,
        connector: nn.Module,
        ln_vision: nn.Module | None = None,
        train_vit: bool = False,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.ln_vision = ln_vision if ln_vision is not None else nn.Identity()
        self.connector = connector
        self.llm = llm
        self.train_vit = train_vit

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.vit.parameters()).dtype
        with torch.set_grad_enabled(self.train_vit and torch.is_grad_enabled()):
            feats = self.vit(pixel_values.to(dtype))
            return self.ln_vision(feats)

    def embed(self, pixel_values, input_ids, image_token_mask) -> torch.Tensor:
        feats = self.encode_images(pixel_values)
        embeds = self.llm.get_input_embeddings()(input_ids)
        feats = feats.to(embeds.dtype)
        return self.connector.project_into(feats, embeds, image_token_mask)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over this batch's target tokens, and their count."""
        embeds = self.embed(batch["pixel_values"], batch["input_ids"], batch["image_token_mask"])
        logits = self.llm(inputs_embeds=embeds, attention_mask=batch.get("attention_mask"))
        return target_token_loss(logits, batch["labels"])

    @torch.no_grad()
    def generate(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        image_token_mask: torch.Tensor,
        *,
        max_new_tokens: int,
        eos_token_id: int | list[int],
        pad_token_id: int,
    ) -> torch.Tensor:
        """Greedy decoding from left-padded prompts; returns only the new tokens."""
        embeds = self.embed(pixel_values, input_ids, image_token_mask)
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )


def target_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on the labelled positions only.

    Only the rows that carry a target are upcast to fp32, so the `[B, T, vocab]` logits are never
    copied in full precision. Returns the mean over targets (0 when there are none, so an
    all-prompt micro-batch contributes nothing) and the target count.
    """
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    n_targets = keep.sum()
    picked = logits[:, :-1][keep].float()
    if picked.shape[0] == 0:
        return logits.sum() * 0.0, n_targets
    loss = F.cross_entropy(picked, shift_labels[keep], reduction="sum") / n_targets
    return loss, n_targets
