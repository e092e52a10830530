"""Build the vision-language model that a run config describes.

This is the one place where config turns into modules. `build_model(cfg, device)` composes
parts that each do one job, for the assembly `model.arch` names:

- `engine.ops.kernel_ops`: `model.kernels` -> the kernel callables, resolved once;
- `minigptv2` and `llava`, a `VisionLanguageModel` (models/vlm.py):
  - `build_llm`: the LLM, with the linear factory that builds LoRA (`lora.*`) and QLoRA
    (`model.quantize_llm`) into it as it is constructed or loaded;
  - `build_vision`: the vision tower (its linears from the same factory, without adapters);
  - `build_connector`: `ln_vision` and the connector `model.connector` names: MiniGPT-v2's
    grouped projection with the kernels' projection op, or LLaVA's `mm_projector`;
- `idefics2`, an `Idefics2VisionLanguageModel` (models/idefics2.py), `build_idefics2`: one
  HF-named model whose text model gets LoRA and (QLoRA) NF4 weights, whose connector (modality
  projection and perceiver resampler) gets LoRA on full-precision weights, and whose SigLIP
  tower gets neither, as Med-Idefics adapts it;
- `load_projection` / `load_adapter`: the `model.projection_checkpoint` /
  `model.adapter_checkpoint` to start from;
- `freeze_and_cast`: everything but the adapters and the connector frozen (by name), the
  model in `model.dtype`, the trained parameters in fp32.

`n_image_tokens(cfg)` and `model_inputs(cfg)` tell the data pipeline how many positions an
image fills and, for Idefics2, how images and their placeholders are prepared.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch
from torch import nn

from pefomed.engine.config import Config, ConfigError, LoRAConfig
from pefomed.engine.lora import (
    ADAPTER_KEYS,
    ALL_LINEAR,
    freeze_except,
    init_fresh_adapters,
    load_adapter_state_dict,
    lora_parameter_names,
    make_linear_factory,
)
from pefomed.engine.ops import KernelOps, kernel_ops, weight_quantizer
from pefomed.models import connectors, idefics2, llama, vit
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


def adapters(cfg: Config) -> LoRAConfig | None:
    """The LoRA config, or None when `lora.enabled` is false (only the connector trains)."""
    return cfg.lora if cfg.lora.enabled else None


def build_llm(cfg: Config, device: torch.device, ops: KernelOps) -> llama.LlamaForCausalLM:
    """The LLM with LoRA (and NF4 frozen weights under QLoRA) built in by the linear factory."""
    m = cfg.model
    dtype = DTYPES[m.dtype]
    config = llm_config(cfg)
    check_lora_targets(cfg, config)
    factory = make_linear_factory(adapters(cfg), ops, quantize=weight_quantizer(m.quantize_llm), dtype=dtype)
    elementwise = llama_ops(ops)
    if m.random_init or device.type == "meta":  # meta: shapes only (engine.sharded_loading loads)
        with torch.device(device):
            model = llama.LlamaForCausalLM(config, linear_factory=factory, ops=elementwise)
        return model.to(dtype)
    model = llama.LlamaForCausalLM.from_pretrained(
        m.llm,
        dtype=dtype,
        device=device,
        linear_factory=factory,
        attn_implementation=m.attn_implementation,
        allow_missing=ADAPTER_KEYS,
        ops=elementwise,
    )
    init_fresh_adapters(model, device, dtype)
    return model


def llama_ops(ops: KernelOps) -> llama.LlamaOps:
    """The LLM's RMSNorm / SwiGLU / RoPE from the kernel ops; the model's lean defaults where None."""
    default = llama.LEAN_OPS
    return llama.LlamaOps(
        rms_norm=ops.rms_norm or default.rms_norm, swiglu=ops.swiglu or default.swiglu, rope=ops.rope or default.rope
    )


def check_lora_targets(cfg: Config, config: llama.LlamaConfig) -> None:
    """`lora.target_modules` must name layers of this LLM (checked on the meta device, before loading)."""
    if not cfg.lora.enabled:
        return
    probe = make_linear_factory(cfg.lora)
    with torch.device("meta"):
        llama.LlamaForCausalLM(config, linear_factory=probe)
    probe.check_targets("lora.target_modules")


def build_vision(cfg: Config, device: torch.device, ops: KernelOps) -> vit.VisionTransformer:
    m = cfg.model
    dtype = DTYPES[m.dtype]
    config = vision_config(cfg)
    factory = make_linear_factory(None, ops)
    if m.vision_checkpoint and device.type != "meta":
        return vit.VisionTransformer.from_pretrained(
            m.vision_checkpoint, config, dtype=dtype, device=device, layout=m.vision_layout, linear_factory=factory
        )
    with torch.device(device):
        model = vit.VisionTransformer(config, linear_factory=factory)
    return model.to(dtype)


def build_connector(
    cfg: Config, vision_width: int, llm_width: int, device: torch.device, ops: KernelOps
) -> tuple[nn.Module | None, nn.Module]:
    """MiniGPT-v2's frozen `ln_vision` (or None) and the trainable connector `model.connector` names."""
    m = cfg.model
    with torch.device(device):
        ln_vision = nn.LayerNorm(vision_width) if m.ln_vision else None
        connector = connectors.build_connector(
            m.connector, vision_width, llm_width, group=m.group, layout=m.group_layout,
            projection=ops.grouped_projection,
        )
    return ln_vision, connector


# --- Idefics2 ----------------------------------------------------------------------------------

# Idefics2's processor resizes so that the shorter side is at least this (and the longer at
# most `model.image_size`, 980 for the released model).
IDEFICS2_SHORTEST_EDGE = 378


def idefics2_config(cfg: Config) -> idefics2.Idefics2Config:
    """The Idefics2Config of `model.llm`: a named config (random_init) or the folder's config.json."""
    m = cfg.model
    if m.random_init:
        if m.llm not in idefics2.CONFIGS:
            raise ConfigError(
                f"model.llm={m.llm!r} with model.random_init=true and model.arch=idefics2 must name one of "
                f"{sorted(idefics2.CONFIGS)}; to load weights, set model.llm to an Idefics2 folder"
            )
        base = idefics2.CONFIGS[m.llm]
        text = with_overrides(base.text, m.llm_overrides)
        perceiver = dataclasses.replace(base.perceiver, hidden_size=text.hidden_size)
        base = dataclasses.replace(base, text=text, perceiver=perceiver)
    else:
        if m.llm_overrides:
            raise ConfigError(
                f"model.llm_overrides={m.llm_overrides} applies to random-init models only; the sizes of the "
                f"pretrained model.llm={m.llm!r} come from its config.json: remove model.llm_overrides"
            )
        base = idefics2.Idefics2Config.from_hf(m.llm)
    if m.image_size > base.vision.image_size:
        raise ConfigError(
            f"model.image_size={m.image_size}: Idefics2's vision tower covers images up to {base.vision.image_size} px "
            f"a side (its position table); set model.image_size <= {base.vision.image_size}"
        )
    return base.with_text(attn_implementation=m.attn_implementation)


def model_inputs(cfg: Config) -> idefics2.Idefics2Inputs | None:
    """How images and their placeholders are prepared, when the model needs more than one
    `model.image_size` square image and a run of placeholders (Idefics2); None otherwise."""
    m = cfg.model
    if m.arch != "idefics2":
        return None
    processor = idefics2.Idefics2ImageProcessor(
        do_image_splitting=m.image_splitting,
        shortest_edge=min(IDEFICS2_SHORTEST_EDGE, m.image_size),
        longest_edge=m.image_size,
    )
    return idefics2.Idefics2Inputs(processor, image_seq_len=idefics2_config(cfg).image_seq_len)


def check_idefics2_targets(cfg: Config, config: idefics2.Idefics2Config) -> None:
    """`lora.target_modules` must name layers of the text model or the connector (on meta)."""
    if not cfg.lora.enabled:
        return
    text, connector = make_linear_factory(cfg.lora), make_linear_factory(cfg.lora)
    with torch.device("meta"):
        idefics2.Idefics2ForConditionalGeneration(config, text_factory=text, connector_factory=connector)
    names = text.leaf_names | connector.leaf_names
    unmatched = sorted(text.targets - {ALL_LINEAR} - names)
    if unmatched:
        raise ConfigError(
            f"lora.target_modules: {unmatched} match no linear layer of Idefics2's text model or connector; "
            f"their layers are named {sorted(names)} (or use [{ALL_LINEAR}])"
        )


def build_idefics2(cfg: Config, device: torch.device, ops: KernelOps) -> idefics2.Idefics2VisionLanguageModel:
    """Idefics2 with adapters on the text model (NF4 under QLoRA) and the connector, none on SigLIP."""
    m = cfg.model
    dtype = DTYPES[m.dtype]
    config = idefics2_config(cfg)
    check_idefics2_targets(cfg, config)
    lora = adapters(cfg)
    factories = {
        "text_factory": make_linear_factory(lora, ops, quantize=weight_quantizer(m.quantize_llm), dtype=dtype),
        "connector_factory": make_linear_factory(lora, ops, dtype=dtype),
        "vision_factory": make_linear_factory(None, ops),
    }
    if m.random_init or device.type == "meta":  # meta: shapes only
        with torch.device(device):
            model = idefics2.Idefics2ForConditionalGeneration(config, **factories)
        model.to(dtype)
    else:
        model = idefics2.Idefics2ForConditionalGeneration.from_pretrained(
            m.llm, config, dtype=dtype, device=device, allow_missing=ADAPTER_KEYS, **factories
        )
        init_fresh_adapters(model, device, dtype)
    return idefics2.Idefics2VisionLanguageModel(model)


def load_projection(connector: nn.Module, path: str, device: torch.device) -> None:
    """`model.projection_checkpoint`: a projection.safetensors (keys llama_proj.weight / .bias,
    or LLaVA's mm_projector.*), or LLaVA's own mm_projector.bin (keys model.mm_projector.*)."""
    load_into(
        connector,
        iter_state_dict(path),
        device=device,
        rename=lambda key: key.removeprefix("model.") if key.startswith("model.mm_projector.") else key,
        source=f"{path} (model.projection_checkpoint)",
    )


def load_adapter(llm: nn.Module, folder: str) -> None:
    """`model.adapter_checkpoint`: a folder with a PEFT adapter_model.safetensors."""
    path = Path(folder) / "adapter_model.safetensors"
    if not path.is_file():
        raise CheckpointNotFoundError(
            f"model.adapter_checkpoint={folder}: no adapter_model.safetensors there; give a checkpoint "
            "folder (output_dir/checkpoints/step_N) saved by pefomed or by PEFT"
        )
    load_adapter_state_dict(llm, read_state_dict(path), str(path))


def freeze_and_cast(model: nn.Module, dtype: torch.dtype, *, train_vision: bool = False) -> list[str]:
    """Cast to `dtype`, freeze all but the adapters and the connector (and with `train_vision` the
    ViT); those stay in fp32.

    AdamW updates of 1e-5 vanish in bf16, so the few trained parameters are kept in fp32 and
    the kernels cast them to the activations' dtype. Returns the trainable names.
    """
    model.to(dtype)
    trainable = ["llm." + n for n in lora_parameter_names(model.llm)]
    trainable += ["connector." + n for n, _ in model.connector.named_parameters()]
    if train_vision:
        trainable += ["vit." + n for n, _ in model.vit.named_parameters()]
    freeze_except(model, trainable)
    params = dict(model.named_parameters())
    for name in trainable:
        params[name].data = params[name].data.float()
    return trainable


def build_model(
    cfg: Config, device: torch.device | str = "cpu", *, ops: KernelOps | None = None
) -> VisionLanguageModel | idefics2.Idefics2VisionLanguageModel:
    """The whole model of `cfg` on `device`; `ops` overrides the kernels `model.kernels` names.

    On the meta device nothing is initialized or loaded: the model has its full shapes and its
    trainable set, for counting and for sharded loading.
    """
    m = cfg.model
    device = torch.device(device)
    ops = ops or kernel_ops(m.kernels, device)
    torch.manual_seed(cfg.train.seed)  # random-init towers and fresh adapters are reproducible
    if m.arch == "idefics2":
        model = build_idefics2(cfg, device, ops)
        llm, connector = model.llm, model.connector
    else:
        llm = build_llm(cfg, device, ops)
        vision = build_vision(cfg, device, ops)
        ln_vision, connector = build_connector(cfg, vision.config.hidden_size, llm.config.hidden_size, device, ops)
        cache_bytes = m.feature_cache_mb * 2**20 if m.feature_cache else 0
        model = VisionLanguageModel(
            vision, llm, connector, ln_vision, train_vit=m.train_vision, feature_cache_bytes=cache_bytes
        )
    if m.projection_checkpoint and device.type != "meta":
        load_projection(connector, m.projection_checkpoint, device)
    if m.adapter_checkpoint and device.type != "meta":
        load_adapter(llm, m.adapter_checkpoint)
    freeze_and_cast(model, DTYPES[m.dtype], train_vision=m.train_vision)
    if m.connector_init == "match_embeddings" and device.type != "meta":
        factor = match_connector_to_embeddings(model, m.image_size, seed=cfg.train.seed)
        logger.info("model.connector_init=match_embeddings: the connector's output scaled by %.4g", factor)
    return model


# Probe images for `match_connector_to_embeddings`: a fixed, seeded draw of this many.
CALIBRATION_IMAGES = 8


def embedding_rms(llm: nn.Module) -> float:
    """The root mean square of the LLM's input embedding table, over every entry."""
    weight = llm.get_input_embeddings().weight
    return float(weight.detach().float().pow(2).mean().sqrt())


@torch.no_grad()
def match_connector_to_embeddings(model: VisionLanguageModel, image_size: int, *, seed: int = 0,
                                  n_images: int = CALIBRATION_IMAGES) -> float:
    """Scale a fresh connector so that its output has the RMS of the LLM's input embeddings.

    nn.Linear's init gives the projection of layer-normed features an RMS near 0.58 (a unit-RMS
    input times a uniform(+-1/sqrt(fan_in)) weight), several times the RMS of a trained LLM's token
    embeddings (0.14 for SmolLM2-135M): the image tokens then dominate the frozen LLM's attention
    and its RMSNorm statistics, and LoRA learns the answers' priors from the question instead
    (docs/demo.md has the ablations). The RMS is measured on seeded Gaussian probe images in the
    tower's normalized pixel space: behind ln_vision every token has unit RMS whatever the image,
    so the factor equals the one measured on real images (within 0.5% on both demo families), and
    the build needs no data and draws nothing from the global generator. Returns the factor.
    """
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n_images, 3, image_size, image_size, generator=generator)
    return scale_connector_to_embeddings(model, pixels, "the probe images")


@torch.no_grad()
def scale_connector_to_embeddings(model: VisionLanguageModel, pixels: torch.Tensor, what: str) -> float:
    """Scale the connector so that its output on `pixels` (`what` they are, for the error) has the
    RMS of the LLM's input embeddings; returns the factor."""
    param = next(model.vit.parameters())
    was_training = model.training
    model.eval()
    feats = model.encode_images(pixels.to(device=param.device, dtype=param.dtype))
    # As VisionLanguageModel.embed feeds it: the features in the LLM's activation dtype.
    out = model.connector(feats.to(model.llm.get_input_embeddings().weight.dtype)).float()
    model.train(was_training)
    rms = float(out.pow(2).mean().sqrt())
    if not rms > 0:
        raise ValueError(f"the connector's output on {what} has RMS {rms}: nothing to scale")
    factor = embedding_rms(model.llm) / rms
    connectors.scale_output_(model.connector, factor)
    return factor


def n_image_tokens(cfg: Config) -> int:
    """The placeholder positions one sample's image fills in the prompt."""
    inputs = model_inputs(cfg)
    if inputs is not None:
        return inputs.n_image_tokens
    config = vision_config(cfg)
    n_patches = (config.image_size // config.patch_size) ** 2
    return n_patches if cfg.model.connector != "grouped" else n_patches // cfg.model.group
