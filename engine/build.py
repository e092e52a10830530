"""Build the vision-language model that a run config describes.

This is the one place where config turns into modules: the LoRA factory (and with it the
kernel implementation) is chosen here, the base weights are loaded here, and everything except
the adapters and the projection is frozen here.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from pefomed.engine.config import Config
from pefomed.engine.lora import freeze_except, lora_parameter_names, make_linear_factory
from pefomed.models import llama, vit
from pefomed.models.connectors import GroupedProjection
from pefomed.models.vlm import VisionLanguageModel

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def llm_config(cfg: Config) -> "llama.LlamaConfig":
    m = cfg.model
    if m.random_init:
        if m.llm not in llama.CONFIGS:
            raise ValueError(
                f"model.llm={m.llm!r} with model.random_init=true must name one of "
                f"{sorted(llama.CONFIGS)}; to load weights, set model.llm to a model folder and "
                "model.random_init=false"
            )
        base = llama.CONFIGS[m.llm]
    else:
        base = llama.LlamaConfig.from_hf(m.llm)
    return with_overrides(base, m.llm_overrides)


def with_overrides(base: "llama.LlamaConfig", overrides: dict) -> "llama.LlamaConfig":
    """Apply overrides, recomputing the derived sizes (head_dim, MHA's kv heads) they change."""
    values = dataclasses.asdict(base)
    if "head_dim" not in overrides and ({"hidden_size", "num_attention_heads"} & overrides.keys()):
        values["head_dim"] = None
    if "num_key_value_heads" not in overrides and base.num_key_value_heads == base.num_attention_heads:
        values["num_key_value_heads"] = None
    return llama.LlamaConfig(**{**values, **overrides})


def vision_config(cfg: Config) -> "vit.VisionConfig":
    m = cfg.model
    if m.vision not in vit.CONFIGS:
        raise ValueError(f"model.vision={m.vision!r}: expected one of {sorted(vit.CONFIGS)}")
    return dataclasses.replace(vit.CONFIGS[m.vision], image_size=m.image_size)


def build_llm(cfg: Config, device: torch.device) -> nn.Module:
    m = cfg.model
    dtype = DTYPES[m.dtype]
    factory = make_linear_factory(cfg.lora, m.kernels)
    if m.random_init:
        with torch.device(device):
            model = llama.LlamaForCausalLM(llm_config(cfg), linear_factory=factory)
        return model.to(dtype)
    return llama.LlamaForCausalLM.from_pretrained(m.llm, dtype=dtype, device=device, linear_factory=factory)


def build_vit(cfg: Config, device: torch.device) -> nn.Module:
    m = cfg.model
    dtype = DTYPES[m.dtype]
    config = vision_config(cfg)
    if m.vision_checkpoint:
        return vit.VisionTransformer.from_pretrained(
            m.vision_checkpoint, config, dtype=dtype, device=device, layout=m.vision_layout
        )
    with torch.device(device):
        model = vit.VisionTransformer(config)
    return model.to(dtype)


def build_model(cfg: Config, device: torch.device | str = "cpu", *, log=print) -> VisionLanguageModel:
    m = cfg.model
    device = torch.device(device)
    torch.manual_seed(cfg.train.seed)  # random-init towers and fresh adapters are reproducible
    llm = build_llm(cfg, device)
    if m.quantize_llm == "nf4":
        from pefomed.engine.lora import quantize_frozen_linears

        quantize_frozen_linears(llm.model.layers, m.kernels)
    vision = build_vit(cfg, device)
    width = vision.config.hidden_size
    with torch.device(device):
        ln_vision = nn.LayerNorm(width) if m.ln_vision else None
        connector = GroupedProjection(
            width, llm.config.hidden_size, group=m.group, layout=m.group_layout, kernels=m.kernels
        )
    if m.projection_checkpoint:
        from safetensors.torch import load_file

        connector.load_state_dict(load_file(m.projection_checkpoint))
    if m.adapter_checkpoint:
        from safetensors.torch import load_file

        from pefomed.engine.lora import load_adapter_state_dict

        path = f"{m.adapter_checkpoint}/adapter_model.safetensors"
        load_adapter_state_dict(llm, load_file(path), path)
    model = VisionLanguageModel(vision, llm, connector, ln_vision)
    model.to(DTYPES[m.dtype])
    trainable = ["llm." + n for n in lora_parameter_names(llm)] + [
        "connector." + n for n, _ in connector.named_parameters()
    ]
    freeze_except(model, trainable, log=log)
    # The few trained parameters stay in fp32 (AdamW updates of 1e-5 vanish in bf16); the
    # kernels cast them to the activations' dtype.
    params = dict(model.named_parameters())
    for name in trainable:
        params[name].data = params[name].data.float()
    return model


def n_image_tokens(cfg: Config) -> int:
    config = vision_config(cfg)
    n_patches = (config.image_size // config.patch_size) ** 2
    return n_patches // cfg.model.group
