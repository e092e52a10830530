"""Build the vision-language model that a run config describes.

This is the one place where config turns into modules. `build_model(cfg, device)` composes
parts that each do one job:

- `engine.ops.kernel_ops`: `model.kernels` -> the kernel callables, resolved once;
- `build_llm`: the LLM, with the linear factory that builds LoRA (`lora.*`) and QLoRA
  (`model.quantize_llm`) into it as it is constructed or loaded;
- `build_vision`: the vision tower (its linears from the same factory, without adapters);
- `build_connector`: `ln_vision` and the grouped projection, with the kernels' projection;
- `load_projection` / `load_adapter`: the `model.projection_checkpoint` /
  `model.adapter_checkpoint` to start from;
- `freeze_and_cast`: everything but the adapters and the projection frozen, the model in
  `model.dtype`, the trained parameters in fp32.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from pefomed.engine.config import Config, ConfigError
from pefomed.engine.lora import (
    ADAPTER_KEYS,
    freeze_except,
    init_fresh_adapters,
    load_adapter_state_dict,
    lora_parameter_names,
    make_linear_factory,
)
from pefomed.engine.ops import KernelOps, kernel_ops, weight_quantizer
from pefomed.models import llama, vit
from pefomed.models.connectors import GroupedProjection
from pefomed.models.loading import CheckpointNotFoundError, iter_state_dict, load_into, read_state_dict
from pefomed.models.vlm import VisionLanguageModel

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llm_config(cfg: Config) -> llama.LlamaConfig:
    m = cfg.model
    if m.random_init:
        if m.llm not in llama.CONFIGS:
            raise ConfigError(
                f"model.llm={m.llm!r} with model.random_init=true must name one of "
                f"{sorted(llama.CONFIGS)}; to load weights, set model.llm to a model folder and "
                "model.random_init=false"
            )
        base = with_overrides(llama.CONFIGS[m.llm], m.llm_overrides)
    else:
        if m.llm_overrides:
            raise ConfigError(
                f"model.llm_overrides={m.llm_overrides} applies to random-init models only; the sizes of "
                f"the pretrained model.llm={m.llm!r} come from its config.json: remove model.llm_overrides"
            )
        base = llama.LlamaConfig.from_hf(m.llm)
    return dataclasses.replace(base, attn_implementation=m.attn_implementation)


def with_overrides(base: llama.LlamaConfig, overrides: dict) -> llama.LlamaConfig:
    """Apply overrides, recomputing the derived sizes (head_dim, MHA's kv heads) they change."""
    values = dataclasses.asdict(base)
    unknown = sorted(overrides.keys() - values.keys())
    if unknown:
        raise ConfigError(
            f"model.llm_overrides: unknown field(s) {unknown}; the LlamaConfig fields are {sorted(values)}"
        )
    if "head_dim" not in overrides and ({"hidden_size", "num_attention_heads"} & overrides.keys()):
        values["head_dim"] = None
    if "num_key_value_heads" not in overrides and base.num_key_value_heads == base.num_attention_heads:
        values["num_key_value_heads"] = None
    try:
        return llama.LlamaConfig(**{**values, **overrides})
    except ValueError as e:
        raise ConfigError(f"model.llm_overrides={overrides}: {e}") from e


def vision_config(cfg: Config) -> vit.VisionConfig:
    m = cfg.model
    if m.vision not in vit.CONFIGS:
        raise ConfigError(f"model.vision={m.vision!r}: expected one of {sorted(vit.CONFIGS)}")
    return dataclasses.replace(vit.CONFIGS[m.vision], image_size=m.image_size)


def build_llm(cfg: Config, device: torch.device, ops: KernelOps) -> llama.LlamaForCausalLM:
    """The LLM with LoRA (and NF4 frozen weights under QLoRA) built in by the linear factory."""
    m = cfg.model
    dtype = DTYPES[m.dtype]
    config = llm_config(cfg)
    check_lora_targets(cfg, config)
    factory = make_linear_factory(cfg.lora, ops, quantize=weight_quantizer(m.quantize_llm), dtype=dtype)
    if m.random_init:
        with torch.device(device):
            model = llama.LlamaForCausalLM(config, linear_factory=factory)
        return model.to(dtype)
    model = llama.LlamaForCausalLM.from_pretrained(
        m.llm,
        dtype=dtype,
        device=device,
        linear_factory=factory,
        attn_implementation=m.attn_implementation,
        allow_missing=ADAPTER_KEYS,
    )
    init_fresh_adapters(model, device, dtype)
    return model


def check_lora_targets(cfg: Config, config: llama.LlamaConfig) -> None:
    """`lora.target_modules` must name layers of this LLM (checked on the meta device, before loading)."""
    probe = make_linear_factory(cfg.lora)
    with torch.device("meta"):
        llama.LlamaForCausalLM(config, linear_factory=probe)
    probe.check_targets("lora.target_modules")


def build_vision(cfg: Config, device: torch.device, ops: KernelOps) -> vit.VisionTransformer:
    m = cfg.model
    dtype = DTYPES[m.dtype]
    config = vision_config(cfg)
    factory = make_linear_factory(None, ops)
    if m.vision_checkpoint:
        return vit.VisionTransformer.from_pretrained(
            m.vision_checkpoint, config, dtype=dtype, device=device, layout=m.vision_layout, linear_factory=factory
        )
    with torch.device(device):
        model = vit.VisionTransformer(config, linear_factory=factory)
    return model.to(dtype)


def build_connector(
    cfg: Config, vision_width: int, llm_width: int, device: torch.device, ops: KernelOps
) -> tuple[nn.Module | None, GroupedProjection]:
    """MiniGPT-v2's frozen `ln_vision` (or None) and the trainable grouped projection."""
    m = cfg.model
    with torch.device(device):
        ln_vision = nn.LayerNorm(vision_width) if m.ln_vision else None
        connector = GroupedProjection(
            vision_width, llm_width, group=m.group, layout=m.group_layout, projection=ops.grouped_projection
        )
    return ln_vision, connector


def load_projection(connector: nn.Module, path: str, device: torch.device) -> None:
    """`model.projection_checkpoint`: a projection.safetensors (keys llama_proj.weight / .bias)."""
    load_into(connector, iter_state_dict(path), device=device, source=f"{path} (model.projection_checkpoint)")


def load_adapter(llm: nn.Module, folder: str) -> None:
    """`model.adapter_checkpoint`: a folder with a PEFT adapter_model.safetensors."""
    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"model.adapter_checkpoint={folder}: no adapter_model.safetensors there; give a checkpoint "
            "folder (output_dir/checkpoints/step_N) saved by pefomed or by PEFT"
        )
    load_adapter_state_dict(llm, read_state_dict(path), str(path))


def freeze_and_cast(model: VisionLanguageModel, dtype: torch.dtype) -> list[str]:
    """Cast to `dtype`, freeze all but the adapters and the connector; those stay in fp32.

    AdamW updates of 1e-5 vanish in bf16, so the few trained parameters are kept in fp32 and
    the kernels cast them to the activations' dtype. Returns the trainable names.
    """
    model.to(dtype)
    trainable = ["llm." + n for n in lora_parameter_names(model.llm)]
    trainable += ["connector." + n for n, _ in model.connector.named_parameters()]
    freeze_except(model, trainable)
    params = dict(model.named_parameters())
    for name in trainable:
        params[name].data = params[name].data.float()
    return trainable


def build_model(
    cfg: Config, device: torch.device | str = "cpu", *, ops: KernelOps | None = None
) -> VisionLanguageModel:
    """The whole model of `cfg` on `device`; `ops` overrides the kernels `model.kernels` names."""
    m = cfg.model
    device = torch.device(device)
    ops = ops or kernel_ops(m.kernels, device)
    torch.manual_seed(cfg.train.seed)  # random-init towers and fresh adapters are reproducible
    llm = build_llm(cfg, device, ops)
    vision = build_vision(cfg, device, ops)
    ln_vision, connector = build_connector(cfg, vision.config.hidden_size, llm.config.hidden_size, device, ops)
    if m.projection_checkpoint:
        load_projection(connector, m.projection_checkpoint, device)
    if m.adapter_checkpoint:
        load_adapter(llm, m.adapter_checkpoint)
    model = VisionLanguageModel(vision, llm, connector, ln_vision)
    freeze_and_cast(model, DTYPES[m.dtype])
    return model


def n_image_tokens(cfg: Config) -> int:
    config = vision_config(cfg)
    n_patches = (config.image_size // config.patch_size) ** 2
    return n_patches // cfg.model.group
