"""LoRA built into the model's linear layers, freezing by name, and PEFT-format adapters.

The adapter is decided when the model is built: the model asks `make_linear_factory(...)` for
each projection, by its qualified name, and gets either a plain `nn.Linear` or a `LoRALinear`.
The frozen weight stays at the checkpoint's key (`...q_proj.weight`), and the adapter sits
beside it under PEFT's names (`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`), so base
checkpoints load with no rename and saved adapters load in PEFT as they are.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch import nn

from pefomed.engine.config import LoRAConfig

LinearFactory = Callable[[str, int, int, bool], nn.Module]

ALL_LINEAR = "all-linear"


def _lora_function(kernels: str) -> Callable:
    # Imported here so that building a model with `kernels: torch` never imports triton.
    if kernels == "triton":
        from pefomed.kernels.lora import lora_linear

        return lora_linear
    if kernels == "torch":
        from pefomed.kernels.reference import lora_linear_reference

        return lora_linear_reference
    raise ValueError(f"kernels={kernels!r}: expected 'torch' or 'triton'")


class LoRALinear(nn.Module):
    """`y = x W^T + b + scaling * dropout(x) A^T B^T` with W (and b) frozen."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        r: int,
        alpha: float,
        dropout: float = 0.0,
        init: str = "kaiming",
        use_rslora: bool = False,
        kernels: str = "torch",
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.r, self.alpha, self.dropout, self.init = r, alpha, dropout, init
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.kernels = kernels
        self._fn = _lora_function(kernels)
        if not self.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init for the base (random-init models), PEFT's init for the adapter."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(
            x,
            self.weight,
            self.lora_A.weight,
            self.lora_B.weight,
            self.scaling,
            bias=self.bias,
            dropout_p=self.dropout,
            training=self.training,
        )

    def quantize_(self) -> None:
        """Store the frozen base weight as NF4 (QLoRA); the adapter stays in full precision."""
        from pefomed.kernels.nf4 import quantize_nf4

        q = quantize_nf4(self.weight.detach())
        del self.weight
        self.weight = q

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, kernels={self.kernels}"
        )


class NF4Linear(nn.Module):
    """A frozen linear layer whose weight is stored as NF4 (the non-adapted layers under QLoRA)."""

    def __init__(self, linear: nn.Linear, kernels: str = "torch") -> None:
        super().__init__()
        from pefomed.kernels.nf4 import quantize_nf4

        self.weight = quantize_nf4(linear.weight.detach())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels == "triton":
            from pefomed.kernels.nf4 import nf4_linear

            return nf4_linear(x, self.weight, self.bias)
        return torch.nn.functional.linear(x, self.weight.dequantize(x.dtype), self.bias)


def quantize_frozen_linears(model: nn.Module, kernels: str = "torch") -> int:
    """QLoRA: every linear layer of `model` (the LLM's blocks) gets an NF4 base weight."""
    count = 0
    for module in list(model.modules()):
        if isinstance(module, LoRALinear):
            if not hasattr(module.weight, "packed"):
                module.quantize_()
                count += 1
            continue  # its lora_A / lora_B stay trainable full-precision linears
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, NF4Linear(child, kernels))
                count += 1
    return count


def make_linear_factory(cfg: LoRAConfig | None, kernels: str = "torch") -> LinearFactory:
    """The factory the model calls for each projection: LoRA where the config says so."""
    _lora_function(kernels)  # fail at build time, not at the first forward
    targets = set(cfg.target_modules) if cfg is not None else set()

    def factory(name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        leaf = name.rsplit(".", 1)[-1]
        if cfg is not None and (ALL_LINEAR in targets or leaf in targets):
            return LoRALinear(
                in_features,
                out_features,
                bias,
                r=cfg.r,
                alpha=cfg.alpha,
                dropout=cfg.dropout,
                init=cfg.init,
                use_rslora=cfg.use_rslora,
                kernels=kernels,
            )
        return nn.Linear(in_features, out_features, bias=bias)

    return factory


def lora_parameter_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def freeze_except(model: nn.Module, trainable: Iterable[str], *, log: Callable[[str], None] | None = print) -> int:
    """Freeze every parameter whose name is not in `trainable`; return the trainable count."""
    wanted = set(trainable)
    names = {n for n, _ in model.named_parameters()}
    unknown = wanted - names
    if unknown:
        raise ValueError(f"freeze_except: no parameters named {sorted(unknown)[:5]}")
    n_trainable = n_total = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in wanted)
        n_total += p.numel()
        if name in wanted:
            n_trainable += p.numel()
    if log is not None:
        log(
            f"trainable parameters: {n_trainable:,} ({n_trainable / 1e6:.2f}M) of {n_total:,} "
            f"({100 * n_trainable / max(n_total, 1):.4f}%)"
        )
    return n_trainable


# --- PEFT format ----------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def adapter_state_dict(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The LLM's adapter tensors under PEFT's saved names (no adapter name in the key)."""
    return {
        PEFT_PREFIX + name: p.detach().contiguous()
        for name, p in llm.named_parameters()
        if ".lora_A." in name or ".lora_B." in name
    }


def load_adapter_state_dict(llm: nn.Module, state: dict[str, torch.Tensor], source: str = "<adapter>") -> None:
    params = dict(llm.named_parameters())
    expected = {PEFT_PREFIX + n for n in lora_parameter_names(llm)}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise ValueError(
            f"{source}: adapter does not match the model's LoRA layers "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); "
            "check lora.target_modules and the model config against the run that saved it"
        )
    with torch.no_grad():
        for key, tensor in state.items():
            p = params[key[len(PEFT_PREFIX) :]]
            if p.shape != tensor.shape:
                raise ValueError(
                    f"{source}: {key} has shape {list(tensor.shape)} but the model expects "
                    f"{list(p.shape)}; check lora.r and the model sizes"
                )
            p.copy_(tensor.to(p.dtype))


def peft_adapter_config(cfg: LoRAConfig, base_model: str, adapter_keys: Iterable[str]) -> dict:
    """PEFT's adapter_config.json; target_modules lists the layers that really carry adapters."""
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter_keys})
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.r,
        "lora_alpha": cfg.alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": targets,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": "gaussian" if cfg.init == "gaussian" else True,
        "use_rslora": cfg.use_rslora,
        "modules_to_save": None,
        "inference_mode": True,
    }


def write_adapter_config(path: Path, config: dict) -> None:
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
