"""`train.compile: true`: regional compilation, one `torch.compile(fullgraph=True)` per decoder layer.

Compiling each decoder layer rather than the whole model (torchtitan's and PyTorch's "regional
compilation" recipe) keeps the compile time to one layer's: the layers share their code, so
dynamo traces one and reuses the graph for the others. `fullgraph=True` makes a graph break an
error, so a layer that stops being traceable fails loudly instead of running half-eager.
Inductor fuses each layer's elementwise work (norms, SwiGLU, RoPE, dropout, residual adds) into
a few kernels around the matmuls.

It runs after the strategy (engine/session.py): the layer's `forward` is replaced by its compiled
version, so the hooks that DDP, FSDP2 or activation checkpointing put around a layer keep running
in eager mode, and a checkpointed layer compiles with its recompute (the checkpoint is traced
into the graph as torch's checkpoint operator).

Random numbers: inductor draws dropout masks with its own generator, so a compiled step's LoRA
dropout differs from an eager step's draw for draw (the distribution is the same). Set
`torch._inductor.config.fallback_random = True` to draw them as eager does (the tests do).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)


def _unwrapped(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def compile_layers(model: nn.Module, *, backend: str = "inductor", fullgraph: bool = True, **options) -> int:
    """Compile each LLM decoder layer's forward in place; returns how many were compiled.

    `model` is the engine's model (a `VisionLanguageModel`, or the strategy's wrapper of one)
    or an LLM with `.model.layers`. Compiling twice is a no-op.
    """
    inner = _unwrapped(model)
    llm = getattr(inner, "llm", inner)
    layers = llm.model.layers
    compiled = 0
    for layer in layers:
        if getattr(layer, "_pefomed_compiled", False):
            continue
        layer.forward = torch.compile(layer.forward, backend=backend, fullgraph=fullgraph, **options)
        layer._pefomed_compiled = True
        compiled += 1
    if compiled:
        logger.info("torch.compile (%s, fullgraph=%s): %d decoder layers", backend, fullgraph, compiled)
    return compiled
