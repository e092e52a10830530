"""The kernel implementations, chosen once from `model.kernels` when the model is built.

`kernel_ops(kernels, device)` maps `model.kernels: torch | triton` to the callables that the
modules call: the LoRA linear (full-precision or NF4 base weight), the frozen NF4 linear and the
grouped visual-token projection; `weight_quantizer(model.quantize_llm)` gives the function that
stores a frozen weight (`kernels.nf4.to_nf4`, or None). `engine.build` resolves both once and
hands the callables to the modules it builds (`LoRALinear`, `FrozenNF4Linear`,
`GroupedProjection`); no module holds a `kernels` string, looks at `is_cuda`, or chooses an
implementation at call time.

- `torch`: plain PyTorch (`kernels.torch_lora`, `kernels.reference`, `F.linear`). It never imports Triton, so it runs
  where Triton is not installed or has no driver; an NF4 weight goes through `F.linear` as a
  tensor subclass.
- `triton`: the fused kernels (`kernels.lora.lora_linear`, `kernels.nf4.nf4_linear`, and the
  `pefomed::grouped_projection` ops through `kernels.visual_proj.grouped_projection`), and the
  LLM's RMSNorm, SwiGLU and RoPE (`kernels.rms_norm.rms_norm`, `kernels.swiglu.swiglu`,
  `kernels.rope.rope`, the `LlamaOps` signatures).

The frozen full-precision linears are plain `nn.Linear` on both paths (cuBLAS; nothing to fuse).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pefomed.engine.config import ConfigError

KERNELS = ("torch", "triton")


@dataclass(frozen=True)
class KernelOps:
    """The callables of one implementation; their signatures are those of `kernels.reference`."""

    name: str
    # (x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, training=True) -> y;
    # the frozen `weight` may be an NF4 tensor (QLoRA).
    lora_linear: Callable[..., torch.Tensor]
    # (x, weight, bias) -> y for a frozen NF4 weight.
    nf4_linear: Callable[..., torch.Tensor]
    # (feats, weight, bias, group, layout, drop_cls, out=None, row_index=None) -> y
    grouped_projection: Callable[..., torch.Tensor]
    # The LLM's elementwise ops (models.llama.LlamaOps), each saving only its inputs for backward:
    # (x, weight, eps) -> y; (gate, up) -> silu(gate) * up; (q, k, cos, sin) -> (q, k) rotated.
    # None: the model's default, its lean PyTorch autograd (models.llama.rms_norm, ...).
    rms_norm: Callable[..., torch.Tensor] | None = None
    swiglu: Callable[..., torch.Tensor] | None = None
    rope: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None


def torch_ops() -> KernelOps:
    from pefomed.kernels.reference import grouped_projection_reference
    from pefomed.kernels.torch_lora import lora_linear_eager

    return KernelOps("torch", lora_linear_eager, F.linear, grouped_projection_reference)


def triton_ops() -> KernelOps:
    from pefomed.kernels.lora import lora_linear
    from pefomed.kernels.nf4 import nf4_linear
    from pefomed.kernels.rms_norm import rms_norm
    from pefomed.kernels.rope import rope
    from pefomed.kernels.swiglu import swiglu
    from pefomed.kernels.visual_proj import grouped_projection

    return KernelOps("triton", lora_linear, nf4_linear, grouped_projection, rms_norm=rms_norm, swiglu=swiglu, rope=rope)


def kernel_ops(kernels: str, device: torch.device | str = "cpu") -> KernelOps:
    """The implementation `model.kernels` names, checked against the machine and `device`."""
    if kernels == "torch":
        return torch_ops()
    if kernels != "triton":
        raise ConfigError(f"model.kernels={kernels!r}: expected one of {list(KERNELS)}")
    device = torch.device(device)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not interpreted and not torch.cuda.is_available():
        raise ConfigError(
            "model.kernels=triton needs a CUDA GPU (or TRITON_INTERPRET=1 for the interpreter); use model.kernels=torch"
        )
    if not interpreted and device.type != "cuda":
        raise ConfigError(
            f"model.kernels=triton runs its kernels on CUDA tensors, but the model is built on {device}; "
            "set train.device=cuda (or auto), or use model.kernels=torch"
        )
    try:
        return triton_ops()
    except ImportError as e:
        if (e.name or "").split(".")[0] != "triton":
            raise
        raise ConfigError(
            f"model.kernels=triton needs the triton package, which cannot be imported ({e}); "
            "install it (pip install triton) or use model.kernels=torch"
        ) from e


def weight_quantizer(quantize_llm: str) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`model.quantize_llm` -> the function that stores a frozen weight (None: full precision)."""
    if quantize_llm == "none":
        return None
    if quantize_llm == "nf4":
        from pefomed.kernels.nf4 import to_nf4

        return to_nf4
    raise ConfigError(f"model.quantize_llm={quantize_llm!r}: expected 'none' or 'nf4'")
