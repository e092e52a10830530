"""Activation checkpointing policies: `train.activation_checkpointing: none | full | selective`.

- `none`: every layer keeps the activations its backward needs.
- `full`: every LLM decoder layer keeps only its input and recomputes the rest in backward.
- `selective`: every `train.ac_every`-th decoder layer is checkpointed (layers 0, k, 2k, ...;
  torchtitan's per-layer selective policy): with k = 2 half the layers are recomputed, a
  middle ground between memory and the extra forward.

`true` / `false` (the earlier boolean option) mean `full` / `none`.

A layer is wrapped in torch's non-reentrant checkpoint (`checkpoint_wrapper`), which restores
the CPU and CUDA random states of the forward in the recompute, so LoRA dropout draws the same
masks twice and the gradients equal those without checkpointing. The ViT's blocks are wrapped
only when the ViT trains: a frozen ViT runs under inference mode and keeps no activations.
Wrapped parameter names gain `_checkpoint_wrapped_module.`, which
`torch.distributed.checkpoint.state_dict` (what checkpoints use) strips again.
"""

from __future__ import annotations

import logging

from torch import nn

logger = logging.getLogger(__name__)

MODES = ("none", "full", "selective")


def checkpoint_mode(value: bool | str) -> str:
    """`none | full | selective` from the option's value (the booleans map to full / none)."""
    if value is True:
        return "full"
    if value is False or value is None:
        return "none"
    if value not in MODES:
        raise ValueError(f"activation checkpointing {value!r}: expected one of {', '.join(MODES)} (or true/false)")
    return value


def chosen_layers(n_layers: int, mode: bool | str, every: int = 2) -> list[int]:
    """The indices of the layers that `mode` checkpoints, out of `n_layers`."""
    mode = checkpoint_mode(mode)
    if every < 1:
        raise ValueError(f"ac_every={every}: expected a positive layer interval")
    if mode == "none":
        return []
    if mode == "full":
        return list(range(n_layers))
    return [i for i in range(n_layers) if i % every == 0]


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def block_lists(model: nn.Module) -> list[nn.ModuleList]:
    """The lists of blocks a policy applies to: the LLM's decoder layers, and the ViT's blocks
    when the ViT trains."""
    model = _unwrapped(model)
    lists = [model.llm.model.layers]
    vit = getattr(model, "vit", None)
    trains = getattr(model, "train_vit", False) or (vit is not None and any(p.requires_grad for p in vit.parameters()))
    if vit is not None and trains and hasattr(vit, "blocks"):
        lists.append(vit.blocks)
    return lists


def apply_activation_checkpointing(model: nn.Module, mode: bool | str = "full", every: int = 2) -> int:
    """Wrap the blocks `mode` selects, in place; returns how many were wrapped (0 for none)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        CheckpointWrapper,
        checkpoint_wrapper,
    )

    mode = checkpoint_mode(mode)
    wrapped = 0
    for blocks in block_lists(model):
        for i in chosen_layers(len(blocks), mode, every):
            if not isinstance(blocks[i], CheckpointWrapper):
                blocks[i] = checkpoint_wrapper(
                    blocks[i], checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=True
                )
                wrapped += 1
    if wrapped:
        logger.info("activation checkpointing (%s): %d blocks recompute their activations in backward", mode, wrapped)
    return wrapped
