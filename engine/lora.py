"""LoRA and QLoRA built into the model's linear layers, freezing, and PEFT-format adapters.

The adapter is decided when the model is built: the model asks the `LinearFactory` that
`make_linear_factory(...)` returns for each projection, by its qualified name, and gets a plain
`nn.Linear`, a `LoRALinear`, or (QLoRA, `model.quantize_llm: nf4`) a `FrozenNF4Linear`. The
frozen weight stays at the checkpoint's key (`...q_proj.weight`), and the adapter sits beside it
under PEFT's names (`...q_proj.lora_A.weight`, `...q_proj.lora_B.weight`), so base checkpoints
load with no rename and saved adapters load in PEFT as they are.

Under QLoRA the frozen weights are NF4 from the start: a randomly initialized layer quantizes
right after its init, and a layer built on the meta device quantizes each weight as the loader
assigns it (`convert_loaded`, see `models.loading.load_into`), so the full-precision model is
never held. A base checkpoint has no adapter: `from_pretrained(..., allow_missing=ADAPTER_KEYS)`
leaves the adapters on the meta device and `init_fresh_adapters` gives them storage and PEFT's
init. The kernels are callables from `engine.ops`, resolved once when the model is built.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch
from torch import nn

from pefomed.engine.config import ConfigError, LoRAConfig
from pefomed.engine.ops import KernelOps, torch_ops
from pefomed.models.loading import CheckpointError

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
# The adapter weights, which a base checkpoint does not hold (regexes of parameter names).
ADAPTER_KEYS = (r"\.lora_[AB]\.weight$",)

Quantizer = Callable[[torch.Tensor], torch.Tensor]


def _init_linear_(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """nn.Linear's own init (the same random draws, so a frozen layer matches nn.Linear's)."""
    nn.init.kaiming_uniform_(weight, a=math.sqrt(5))
    if bias is not None:
        bound = 1 / math.sqrt(weight.shape[1])
        nn.init.uniform_(bias, -bound, bound)


class _FrozenBase(nn.Module):
    """A frozen `weight [out, in]` (and `bias`), stored as `quantize(weight)` when given."""

    def _init_base(
        self, in_features: int, out_features: int, bias: bool, quantize: Quantizer | None, dtype: torch.dtype | None
    ) -> None:
        self.in_features, self.out_features = in_features, out_features
        self.quantize, self.base_dtype = quantize, dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def _reset_base(self) -> None:
        with torch.no_grad():
            _init_linear_(self.weight, self.bias)
        if self.quantize is not None:
            self.weight = nn.Parameter(self._quantized(self.weight.detach()), requires_grad=False)

    def _quantized(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.base_dtype is not None:
            tensor = tensor.to(self.base_dtype)
        return self.quantize(tensor)

    def convert_loaded(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """The loader's hook (`models.loading.load_into`): a checkpoint's weight is quantized as it arrives."""
        if name == "weight" and self.quantize is not None:
            return self._quantized(tensor)
        return tensor


class FrozenNF4Linear(_FrozenBase):
    """A frozen linear layer whose weight is stored as NF4 (the non-adapted layers under QLoRA)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        *,
        quantize: Quantizer,
        linear: Callable[..., torch.Tensor],
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self._init_base(in_features, out_features, bias, quantize, dtype)
        self._fn = linear
        if not self.weight.is_meta:
            self._reset_base()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class LoRALinear(_FrozenBase):
    """`y = x W^T + b + scaling * dropout(x) A^T B^T` with W (and b) frozen.

    `lora_fn` is the kernel (`KernelOps.lora_linear`); `quantize` stores W in 4 bits (QLoRA).
    """

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
        lora_fn: Callable[..., torch.Tensor] | None = None,
        quantize: Quantizer | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if r <= 0:
            raise ConfigError(f"lora.r must be positive, got {r}")
        if not 0.0 <= dropout < 1.0:
            raise ConfigError(f"lora.dropout must be in [0, 1), got {dropout}")
        self._init_base(in_features, out_features, bias, quantize, dtype)
        self.lora_A = nn.Linear(in_features, r, bias=False)
        self.lora_B = nn.Linear(r, out_features, bias=False)
        self.r, self.alpha, self.dropout, self.init = r, alpha, dropout, init
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self._fn = lora_fn if lora_fn is not None else torch_ops().lora_linear
        if not self.weight.is_meta:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's init for the base (random-init models), PEFT's init for the adapter."""
        self._reset_base()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        with torch.no_grad():
            if self.init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B.weight)

    def adapter_params(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trained parameters, named relative to this module."""
        yield "lora_A.weight", self.lora_A.weight
        yield "lora_B.weight", self.lora_B.weight

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

    def projection_parts(self) -> tuple[torch.Tensor, torch.Tensor | None, tuple | None] | None:
        """(weight, bias, (lora_A, lora_B, scaling, dropout_p)) for `models.llama.fused_projections`,
        which runs q/k/v (gate/up) of the same input as one GEMM with the adapters on their slices
        through `kernels.torch_lora`; None (not fusable) unless this layer runs that same kernel."""
        from pefomed.kernels.torch_lora import lora_linear_eager

        if self._fn is not lora_linear_eager or self.quantize is not None:
            return None
        p = self.dropout if self.training else 0.0
        return self.weight, self.bias, (self.lora_A.weight, self.lora_B.weight, self.scaling, p)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"r={self.r}, alpha={self.alpha}, dropout={self.dropout}, quantized={self.quantize is not None}"
        )


class LinearFactory:
    """What the model calls for each projection: `(qualified_name, in, out, bias) -> module`.

    LoRA where `lora.target_modules` names the layer's last component (or `all-linear`), a plain
    `nn.Linear` elsewhere; with `quantize`, every frozen weight is stored quantized. It records
    the layer names it was asked for, so that `check_targets()` can tell a target that matched
    nothing.
    """

    def __init__(
        self,
        cfg: LoRAConfig | None,
        ops: KernelOps | None = None,
        *,
        quantize: Quantizer | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.cfg, self.ops = cfg, ops or torch_ops()
        self.quantize, self.dtype = quantize, dtype
        self.targets = set(cfg.target_modules) if cfg is not None else set()
        self.leaf_names: set[str] = set()
        self.adapted: list[str] = []

    def wants_adapter(self, leaf: str) -> bool:
        return self.cfg is not None and (ALL_LINEAR in self.targets or leaf in self.targets)

    def __call__(self, name: str, in_features: int, out_features: int, bias: bool) -> nn.Module:
        leaf = name.rsplit(".", 1)[-1]
        self.leaf_names.add(leaf)
        if self.wants_adapter(leaf):
            cfg = self.cfg
            self.adapted.append(name)
            return LoRALinear(
                in_features,
                out_features,
                bias,
                r=cfg.r,
                alpha=cfg.alpha,
                dropout=cfg.dropout,
                init=cfg.init,
                use_rslora=cfg.use_rslora,
                lora_fn=self.ops.lora_linear,
                quantize=self.quantize,
                dtype=self.dtype,
            )
        if self.quantize is not None:
            return FrozenNF4Linear(
                in_features, out_features, bias, quantize=self.quantize, linear=self.ops.nf4_linear, dtype=self.dtype
            )
        return nn.Linear(in_features, out_features, bias=bias)

    def check_targets(self, where: str = "lora.target_modules") -> None:
        """A target that names no layer is a typo that would train nothing: say so."""
        unmatched = sorted(self.targets - {ALL_LINEAR} - self.leaf_names)
        if unmatched:
            raise ConfigError(
                f"{where}: {unmatched} match no linear layer of the model; the layers are named "
                f"{sorted(self.leaf_names)} (or use [{ALL_LINEAR}])"
            )


def make_linear_factory(
    cfg: LoRAConfig | None,
    ops: KernelOps | None = None,
    *,
    quantize: Quantizer | None = None,
    dtype: torch.dtype | None = None,
) -> LinearFactory:
    """The factory the model calls for each projection: LoRA where the config says so."""
    return LinearFactory(cfg, ops, quantize=quantize, dtype=dtype)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    return ((n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear))


def lora_parameter_names(model: nn.Module) -> list[str]:
    """The adapter parameters' names in `model` (found through `LoRALinear.adapter_params`)."""
    return [f"{n}.{p}" if n else p for n, m in adapter_modules(model) for p, _ in m.adapter_params()]


def init_fresh_adapters(model: nn.Module, device: torch.device | str, dtype: torch.dtype) -> int:
    """Give storage and PEFT's init (B = 0) to adapters a base checkpoint left on the meta device."""
    count = 0
    for _, module in adapter_modules(model):
        if any(p.is_meta for _, p in module.adapter_params()):
            module.lora_A.to_empty(device=device).to(dtype)
            module.lora_B.to_empty(device=device).to(dtype)
            module.reset_lora_parameters()
            count += 1
    return count


def freeze_except(model: nn.Module, trainable: Iterable[str]) -> int:
    """Freeze every parameter whose name is not in `trainable`; log and return the trainable count."""
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
    logger.info(
        "trainable parameters: %s (%.2fM) of %s (%.4f%%)",
        f"{n_trainable:,}",
        n_trainable / 1e6,
        f"{n_total:,}",
        100 * n_trainable / max(n_total, 1),
    )
    return n_trainable


# --- PEFT format ----------------------------------------------------------------------------

PEFT_PREFIX = "base_model.model."


def adapter_state_dict(llm: nn.Module) -> dict[str, torch.Tensor]:
    """The LLM's adapter tensors under PEFT's saved names (no adapter name in the key)."""
    params = dict(llm.named_parameters())
    return {PEFT_PREFIX + name: params[name].detach().contiguous() for name in lora_parameter_names(llm)}


def load_adapter_state_dict(llm: nn.Module, state: dict[str, torch.Tensor], source: str = "<adapter>") -> None:
    """Copy a PEFT adapter (keys `base_model.model.<name>.lora_A.weight`) into the LLM's adapters."""
    params = dict(llm.named_parameters())
    expected = {PEFT_PREFIX + n for n in lora_parameter_names(llm)}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: adapter does not match the model's LoRA layers "
            f"(missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}); "
            "check lora.target_modules and the model config against the run that saved it"
        )
    with torch.no_grad():
        for key, tensor in state.items():
            p = params[key[len(PEFT_PREFIX) :]]
            if p.shape != tensor.shape:
                raise CheckpointError(
                    f"{source}: {key} has shape {list(tensor.shape)} but the model expects "
                    f"{list(p.shape)}; check lora.r and the model sizes"
                )
            p.copy_(tensor.to(p.dtype))


def peft_adapter_config(cfg: LoRAConfig, base_model: str, adapter_keys: Iterable[str]) -> dict:
    """PEFT's adapter_config.json; target_modules names exactly the layers that carry adapters."""
    targets = peft_target_modules(adapter_keys)
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


def peft_target_modules(adapter_keys: Iterable[str]) -> list[str] | str:
    """The `target_modules` PEFT needs to put adapters exactly where ours are.

    For a causal LM whose adapters all sit in its decoder layers, the leaf names (`["q_proj",
    "v_proj"]`), as PEFT users write them. Otherwise (Idefics2: text model, connector and
    resampler carry adapters, while SigLIP also has `q_proj`s that must not) a regex that PEFT
    full-matches against module names, with the layer index generalized.
    """
    modules = sorted({k.removeprefix(PEFT_PREFIX).split(".lora_")[0] for k in adapter_keys})
    layer_index = re.compile(r"\\\.\d+\\\.")
    shapes = sorted({layer_index.sub(r"\\.\\d+\\.", re.escape(m)) for m in modules})
    if all(shape.startswith(r"model\.layers\.\d+\.") for shape in shapes):
        return sorted({m.rsplit(".", 1)[-1] for m in modules})
    return "(" + "|".join(shapes) + ")"


def write_adapter_config(path: Path, config: dict) -> None:
    path.write_text(json.dumps(config, indent=2, sort_keys=True))
