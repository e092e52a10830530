"""The assembled vision-language model: frozen ViT, ln_vision, connector, LLM.

A training forward (`VisionLanguageModel.forward(batch) -> (mean loss over targets, n_targets)`):

1. The frozen ViT and MiniGPT-v2's frozen LayerNorm run in the compute dtype under
   `inference_mode` (no autograd bookkeeping at all); their output is copied into a normal
   tensor, since inference tensors cannot be saved for backward and the connector's matmul
   saves its input. With `feature_cache` on, those features are kept per image (keyed by the
   data pipeline's `image_keys`, a hash of the preprocessed pixels), LRU-bounded in bytes: VQA-RAD
   asks about 11 questions per image, and the frozen tower gives the same features each time.
2. The connector's output fills the image-placeholder rows of the prompt's embeddings
   (`image_rows`, flat row indices the collate computed on the host).
3. The LLM runs without an attention mask (right-padded rows are causal-exact; packed rows carry
   `cu_seqlens`) and `lm_head` runs only on the target rows (`LlamaForCausalLM.loss`).

With the indices the collate puts in the batch (`image_rows`, `target_index`, `target_ids`,
`seq_lens`), the forward reads nothing back from the device. A batch without them still works:
each missing index is found on the device, at one host sync apiece.
"""

from __future__ import annotations

import inspect
import logging
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from pefomed.models.llama import Packing, TargetRows

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


class FeatureCache:
    """Frozen-tower features by image key, least recently used first out, within `max_bytes`.

    The features are a pure function of the image's preprocessed pixels (the key hashes them)
    and of frozen weights, so a cached entry is exactly what the tower would compute again: a
    run resumed from a checkpoint starts with an empty cache and gets the same features.
    """

    def __init__(self, max_bytes: int) -> None:
        if max_bytes <= 0:
            raise ValueError(f"feature cache size {max_bytes} bytes: expected a positive budget")
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def get(self, key: str) -> torch.Tensor | None:
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry

    def put(self, key: str, features: torch.Tensor) -> None:
        size = features.numel() * features.element_size()
        if key in self._entries or size > self.max_bytes:
            return
        while self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = features
        self.bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self.bytes = 0


def _is_sharded(module: nn.Module) -> bool:
    """Whether a sharding strategy gathers the module's weights during its forward: FSDP2, or
    DeepSpeed ZeRO-3 (whose partitioned parameters carry a `ds_id`)."""
    if any(hasattr(p, "ds_id") for p in module.parameters()):
        return True
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(module, FSDPModule)


class VisionLanguageModel(nn.Module):
    def __init__(
        self,
        vit: nn.Module,
        llm: nn.Module,
        connector: nn.Module,
        ln_vision: nn.Module | None = None,
        train_vit: bool = False,
        feature_cache_bytes: int = 0,
    ) -> None:
        super().__init__()
        self.vit = vit
        self.ln_vision = ln_vision if ln_vision is not None else nn.Identity()
        self.connector = connector
        self.llm = llm
        self.train_vit = train_vit
        # Not a module or buffer: derived data, in no checkpoint.
        self.feature_cache = FeatureCache(feature_cache_bytes) if feature_cache_bytes > 0 else None

    # ------------------------------------------------------------ vision

    def _run_vit(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.train_vit and torch.is_grad_enabled():
            return self._vit_features(pixel_values)
        # FSDP2 and ZeRO-3 gather a sharded tower's weights in its forward hooks; those must not
        # become inference tensors, so a sharded tower runs under no_grad instead.
        context = torch.no_grad() if _is_sharded(self.vit) else torch.inference_mode()
        with context:
            feats = self._vit_features(pixel_values)
        return feats.clone() if feats.is_inference() else feats

    def _vit_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The tower in its weights' dtype (fp32 when `train_vit` trains it), then ln_vision in the
        compute dtype, which the frozen LayerNorm and the connector's input share."""
        feats = self.vit(pixel_values.to(next(self.vit.parameters()).dtype))
        return self.ln_vision(feats.to(self.llm.get_input_embeddings().weight.dtype))

    def encode_images(self, pixel_values: torch.Tensor, image_keys: list | None = None) -> torch.Tensor:
        """`[B, 3, S, S]` -> the tower's features after ln_vision, from the cache where it has them."""
        cache = self.feature_cache
        usable = cache is not None and not self.train_vit and image_keys is not None and None not in image_keys
        if not usable:
            return self._run_vit(pixel_values)
        if len(image_keys) != pixel_values.shape[0]:
            raise ValueError(f"{len(image_keys)} image_keys for {pixel_values.shape[0]} images")
        found = [cache.get(key) for key in image_keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            index = torch.tensor(missing, device=pixel_values.device)
            fresh = self._run_vit(pixel_values.index_select(0, index))
            for j, i in enumerate(missing):
                found[i] = fresh[j].clone()  # its own storage, so the cache holds only its bytes
                cache.put(image_keys[i], found[i])
        return torch.stack(found)

    # ------------------------------------------------------------ embeddings

    def embed(
        self,
        pixel_values: torch.Tensor,
        input_ids: torch.Tensor,
        image_token_mask: torch.Tensor,
        image_keys: list | None = None,
        image_rows: torch.Tensor | None = None,
        packed: bool = False,
    ) -> torch.Tensor:
        """Token embeddings `[B, T, H]` with the connector's output at the image placeholders.

        `image_rows` are the placeholders' flat row indices into `[B*T]`, in image order (as the
        collate gives them). Without them, the connector's `project_into` checks the placeholder
        count of each row and finds them on the device (host syncs); packed rows hold several
        images, so there they are found here.
        """
        feats = self.encode_images(pixel_values, image_keys)
        embeds = self.llm.get_input_embeddings()(input_ids)
        feats = feats.to(embeds.dtype)
        if image_rows is None and not packed:
            return self.connector.project_into(feats, embeds, image_token_mask)
        if image_rows is None:
            image_rows = image_token_mask.reshape(-1).nonzero().squeeze(1)
        if self._places_rows():  # the connector's op writes the rows itself (a fused kernel)
            return self.connector.project_into(feats, embeds, image_token_mask, row_index=image_rows)
        projected = self.connector(feats)
        hidden = embeds.shape[-1]
        n_tokens = projected.shape[0] * projected.shape[1]
        if image_rows.shape[0] != n_tokens:
            raise ValueError(
                f"the batch has {image_rows.shape[0]} image placeholder positions but its "
                f"{projected.shape[0]} images give {n_tokens} tokens ({projected.shape[1]} each); "
                "check the prompt template, model.group and model.image_size"
            )
        flat = embeds.reshape(-1, hidden).index_copy(0, image_rows, projected.reshape(-1, hidden).to(embeds.dtype))
        return flat.view_as(embeds)

    def _places_rows(self) -> bool:
        """Whether the connector's `project_into` takes `row_index` (given rows: no check, no sync)."""
        fn = getattr(self.connector, "project_into", None)
        return fn is not None and "row_index" in inspect.signature(fn).parameters

    # ------------------------------------------------------------ training

    def forward(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy over this batch's target tokens, and their count (a long tensor).

        The batch is right-padded (the collate's contract) or packed (`cu_seqlens`,
        `position_ids`); either way attention needs no mask, and none is read.
        """
        embeds = self.embed(
            batch["pixel_values"], batch["input_ids"], batch["image_token_mask"],
            batch.get("image_keys"), batch.get("image_rows"), packed="cu_seqlens" in batch,
        )
        return llm_loss(self.llm, embeds, batch)

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
        image_keys: list | None = None,
    ) -> torch.Tensor:
        """Greedy decoding from left-padded prompts; returns only the new tokens."""
        embeds = self.embed(pixel_values, input_ids, image_token_mask, image_keys)
        return self.llm.generate(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
        )


def llm_loss(llm: nn.Module, inputs_embeds: torch.Tensor, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The LLM's (mean loss over targets, n_targets) on a training batch's embeddings.

    The batch is right-padded or packed (`cu_seqlens`, `position_ids`), so no attention mask is
    taken; its `target_index` / `target_ids` (from the collate) spare the host sync of finding
    the targets in `labels`. `llm` is a `LlamaForCausalLM` (its `loss`).
    """
    packing = packing_from_batch(batch)
    targets = TargetRows(batch["target_index"], batch["target_ids"]) if "target_index" in batch else None
    return llm.loss(
        batch.get("labels"),
        inputs_embeds=inputs_embeds,
        position_ids=batch.get("position_ids") if packing is not None else None,
        packing=packing,
        targets=targets,
    )


def packing_from_batch(batch: dict) -> Packing | None:
    """The batch's `Packing` (None for a right-padded batch)."""
    if "cu_seqlens" not in batch:
        return None
    cu_seqlens = batch["cu_seqlens"]
    lengths = batch.get("seq_lens")
    if lengths is None:
        return Packing.from_cu_seqlens(cu_seqlens, batch.get("max_seqlen"))
    max_seqlen = batch.get("max_seqlen") or max(lengths)
    return Packing(cu_seqlens.to(torch.int32), int(max_seqlen), tuple(int(n) for n in lengths))


def target_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy on the labelled positions of full `[B, T, vocab]` logits.

    The plain path, for models that produce all logits (and the tests' reference for
    `LlamaForCausalLM.loss`). Only the rows that carry a target are upcast to fp32. Returns the
    mean over targets (0 when there are none, so an all-prompt micro-batch contributes nothing)
    and the target count.
    """
    shift_labels = labels[:, 1:]
    keep = shift_labels != IGNORE_INDEX
    n_targets = keep.sum()
    picked = logits[:, :-1][keep]
    picked = picked if picked.dtype == torch.float64 else picked.float()
    if picked.shape[0] == 0:
        return logits.sum() * 0.0, n_targets
    loss = F.cross_entropy(picked, shift_labels[keep], reduction="sum") / n_targets
    return loss, n_targets
