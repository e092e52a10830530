"""Run configuration: dataclasses loaded from YAML, with `key=value` overrides.

One `Config` describes a whole run (model, LoRA, data, optimizer, trainer, evaluation). Every
field is typed; loading checks types and `Literal` choices, and an unknown key is an error that
names the key, the file and the known keys, because a silently ignored typo (`lora.rank: 64`)
costs a cluster-day.

Every option that loads does what it names, or loading refuses it: `load_config` also checks
numeric ranges (RANGES), names against what exists (prompt templates, dataset kinds and their
splits, vision configs), values not supported yet (NOT_SUPPORTED_YET) and the rules that tie
options together (RULES), before any data is read or any model is built. Each error is one line
that starts with where the value came from: the YAML file, or `override 'key=value'`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pefomed.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration file or override that cannot be used as it is."""


@dataclass
class ModelConfig:
    # LLM: a Hugging Face model folder (config.json + safetensors + tokenizer), or the name of a
    # config in models.llama.CONFIGS when `random_init` is true (the demo has no weights offline).
    llm: str = "tiny"
    tokenizer: str | None = None  # defaults to the llm folder
    random_init: bool = False
    llm_overrides: dict[str, Any] = field(default_factory=dict)  # e.g. {vocab_size: 512}
    # How the parts are assembled (engine/build.py): minigptv2 and llava put `vision` + `connector`
    # before the LLM `llm`; idefics2 is one Idefics2 model (`llm`: its folder, or a name in
    # models.idefics2.CONFIGS with random_init), whose vision tower and connector are its own.
    arch: Literal["minigptv2", "llava", "idefics2"] = "minigptv2"
    # Vision tower: a name in models.vit.CONFIGS, and optionally the checkpoint to load.
    vision: str = "tiny"
    vision_checkpoint: str | None = None
    vision_layout: Literal["lavis", "hf_blip2", "hf_clip", "hf_vit", "open_clip"] = "lavis"
    # The square input size; for idefics2 the longest image side (the processor keeps the aspect).
    image_size: int = 448
    image_splitting: bool = False  # idefics2: also feed the image's 4 quadrants (do_image_splitting)
    ln_vision: bool = True  # MiniGPT-v2's frozen LayerNorm after the ViT
    # Train the vision tower too: all its parameters, in fp32, at optim.connector_lr (saved as
    # vision.safetensors in each checkpoint). For a tower without pretrained weights, such as the
    # demo's random ViT: frozen, its random features carry too little of the image to learn from.
    # The papers keep their pretrained towers frozen (the default).
    train_vision: bool = False
    # Connector: MiniGPT-v2's grouped projection (grouped), or LLaVA's projector over each patch
    # token (linear, or mlp2x_gelu: Linear -> GELU -> Linear).
    connector: Literal["grouped", "linear", "mlp2x_gelu"] = "grouped"
    group: int = 4
    group_layout: Literal["sequence", "spatial"] = "sequence"
    projection_checkpoint: str | None = None  # a projection.safetensors to start from
    # A fresh connector's initial scale (engine.build.match_connector_to_embeddings): default keeps
    # nn.Linear's init; match_embeddings scales its output to the RMS of the LLM's input embeddings,
    # so that image tokens do not arrive several times louder than any text token (docs/demo.md).
    connector_init: Literal["default", "match_embeddings"] = "default"
    adapter_checkpoint: str | None = None  # a PEFT adapter folder to start from (stage 2)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    kernels: Literal["torch", "triton"] = "torch"
    # flash_attention_2 and xformers need their package (the `gpu` extra) and a CUDA device.
    attn_implementation: Literal["sdpa", "flash_attention_2", "xformers"] = "sdpa"
    # Keep the frozen ViT's features per image (keyed by a hash of the preprocessed pixels), LRU
    # within feature_cache_mb: VQA-RAD asks ~11 questions per image. Needs data.augment off.
    feature_cache: bool = False
    feature_cache_mb: int = 2048
    quantize_llm: Literal["none", "nf4"] = "none"  # QLoRA: frozen linears stored as NF4


@dataclass
class LoRAConfig:
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    # Names of the linear layers (last component) that get adapters, or ["all-linear"].
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    enabled: bool = True  # false: no adapters, only the connector trains (LLaVA's stage 1)
    init: Literal["kaiming", "gaussian"] = "kaiming"
    use_rslora: bool = False


@dataclass
class DatasetSpec:
    kind: str  # a reader of engine.data.readers.READERS: vqa_rad, slake, pathvqa, caption, roco, ...
    path: str  # the dataset's folder (a split is read by name), or one file
    split: str = "train"  # train, test, or val / validation where the dataset has one
    image_root: str | None = None  # the folder the file's image paths are relative to
    # Credentialed data: the GPT judge sends its items only to a local endpoint (evaluate/judge.py).
    # The mimic reader marks its samples whatever this says; true marks any other dataset too.
    restricted: bool = False


@dataclass
class AugmentConfig:
    """PeFoMed's training augmentation (LAVIS `blip2_image_train`), see engine/data/augment.py."""

    crop_scale: tuple[float, float] = (0.5, 1.0)  # random resized crop: area fraction kept
    crop_ratio: tuple[float, float] = (0.75, 1.3333333333333333)  # and its aspect ratio range
    hflip: float = 0.5  # probability of a horizontal flip
    # swap: a flipped sample's text has left and right swapped (no flip where that is unsafe);
    # skip: a sample whose text names a side is never flipped; blind: PeFoMed's own flip, text
    # untouched (its "which side?" answers are then wrong half of the time).
    laterality: Literal["swap", "skip", "blind"] = "swap"


@dataclass
class DataConfig:
    train: list[DatasetSpec] = field(default_factory=list)
    eval: list[DatasetSpec] = field(default_factory=list)
    template: str = "minigptv2"
    short_prompt_prob: float = 0.0  # chance of MiniGPT-v2's short "[vqa] {q}" form in training
    max_length: int = 512
    num_workers: int = 0
    max_bad_fraction: float = 0.05  # stop the run when more samples than this are unreadable
    # Image paths in a dataset file that lead outside its image folder ("../..", absolute paths,
    # symbolic links out) are refused unless this is true.
    allow_outside_root: bool = False
    augment: AugmentConfig | None = None  # training only; null (the default): no augmentation
    # Pack each micro-batch's samples end to end into rows of at most pack_tokens tokens
    # (block-diagonal causal attention, positions restarting per sample) instead of padding.
    packing: bool = False
    pack_tokens: int = 4096
    # Synthetic demo data is generated here when missing (kind: synthetic).
    synthetic_train: int = 2000
    synthetic_test: int = 300
    # Which generator (engine.data.synthetic.FAMILIES) writes it: radiology, or shapes.
    synthetic_family: Literal["radiology", "shapes"] = "radiology"


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0
    # The connector's own peak lr (its parameter group; a ViT that model.train_vision trains joins
    # it), scheduled like `lr`; None: `lr`. A freshly initialized projection needs a larger step
    # than the LoRA adapters (docs/demo.md).
    connector_lr: float | None = None


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    micro_batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 100
    save_every: int = 0  # 0: only at the end
    log_every: int = 1
    strategy: Literal["single", "ddp", "fsdp2", "deepspeed"] = "single"
    # strategy deepspeed: the ZeRO stage, ZeRO-Offload of the optimizer (states and step) and,
    # with stage 3, of the parameters; a DeepSpeed JSON whose keys override the generated ones.
    deepspeed_stage: Literal[2, 3] = 2
    offload_optimizer: Literal["none", "cpu"] = "none"
    offload_params: Literal["none", "cpu"] = "none"
    deepspeed_config: str | None = None
    # none | full | selective (every ac_every-th decoder layer); true / false mean full / none.
    activation_checkpointing: Literal["none", "full", "selective"] | bool = "none"
    ac_every: int = 2
    compile: bool = False  # torch.compile each decoder layer (fullgraph, inductor)
    resume: bool = True  # resume from output_dir's latest checkpoint when there is one
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress_bar: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.activation_checkpointing, bool):  # the earlier boolean option
            self.activation_checkpointing = "full" if self.activation_checkpointing else "none"


@dataclass
class EvalConfig:
    max_new_tokens: int = 300
    batch_size: int = 8
    prompt: str = "minigptv2"


@dataclass
class AlignConfig:
    """Before training, the fresh connector (and a tower that model.train_vision trains) learn alone,
    without the LLM, to place each image's tokens near the LLM's embeddings of its caption's words
    (engine/align.py). steps 0 (the default): no alignment."""

    # Images with text: captions or reports (kind caption, roco, mimic, ...), or a VQA set, whose
    # questions and answers stand in for a caption (engine.align.image_texts).
    data: list[DatasetSpec] = field(default_factory=list)
    steps: int = 0
    batch_size: int = 64  # images per step; the other captions of the batch are the negatives
    lr: float = 1e-3
    temperature: float = 0.05


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ---------------------------------------------------------------- what load_config checks
#
# Beyond types and `Literal` choices, every option is checked at load time, before any data is
# read or any model is built: numeric ranges (RANGES), free-string choices (`_choices`), values
# not supported yet (NOT_SUPPORTED_YET) and rules that tie options together (RULES). An error
# names where the offending value came from: the YAML file, or the `key=value` override.


@dataclass(frozen=True)
class Range:
    """Allowed values `low <= v` (or `low < v`), and `v <= high` (or `v < high`) when `high` is set.

    NaN lies in no range (every comparison with it is false).
    """

    low: float
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    def __str__(self) -> str:
        if self.high is None:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"


AT_LEAST_1 = Range(1)
NON_NEGATIVE = Range(0)
POSITIVE = Range(0, low_open=True)
PROBABILITY = Range(0, 1)

# Every numeric option and its allowed values. For a tuple (optim.betas) the range holds for
# each element. Cross-option limits (min_lr <= lr, image_size against the patch grid) are RULES.
RANGES: dict[str, Range] = {
    "model.image_size": AT_LEAST_1,
    "model.group": AT_LEAST_1,
    "lora.r": AT_LEAST_1,
    "lora.alpha": POSITIVE,
    "lora.dropout": Range(0, 1, high_open=True),
    "data.short_prompt_prob": PROBABILITY,
    "data.max_length": AT_LEAST_1,
    "data.pack_tokens": AT_LEAST_1,
    "data.num_workers": NON_NEGATIVE,
    "data.max_bad_fraction": PROBABILITY,
    "data.synthetic_train": AT_LEAST_1,
    "data.synthetic_test": AT_LEAST_1,
    "optim.lr": POSITIVE,
    "optim.min_lr": NON_NEGATIVE,
    "optim.weight_decay": NON_NEGATIVE,
    "optim.betas": Range(0, 1, high_open=True),
    "optim.eps": POSITIVE,
    "optim.warmup_steps": NON_NEGATIVE,
    "optim.grad_clip": NON_NEGATIVE,  # 0: no clipping
    "train.seed": NON_NEGATIVE,  # numpy's SeedSequence takes no negative seed
    "train.micro_batch_size": AT_LEAST_1,
    "train.grad_accum": AT_LEAST_1,
    "train.max_steps": AT_LEAST_1,
    "train.save_every": NON_NEGATIVE,  # 0: only at the end
    "train.log_every": AT_LEAST_1,
    "train.ac_every": AT_LEAST_1,
    "model.feature_cache_mb": AT_LEAST_1,
    "align.steps": NON_NEGATIVE,
    "align.batch_size": Range(2),  # a contrastive batch needs a negative
    "align.lr": POSITIVE,
    "align.temperature": POSITIVE,
    "eval.max_new_tokens": AT_LEAST_1,
    "eval.batch_size": AT_LEAST_1,
}

# Values a `Literal` names but the engine does not implement yet, and what to use instead.
NOT_SUPPORTED_YET: dict[str, tuple[tuple[Any, ...], str]] = {}

# The projections that LoRA may wrap are checked against the model when it is built
# (engine.build.check_lora_targets); here only that there is at least one.
SYNTHETIC_MIN_IMAGE_SIZE = 16  # engine.data.synthetic draws lesions too small to see below this


def _choices() -> dict[str, tuple[str, ...]]:
    """Free-string options and the names they may take, read from where those names are defined."""
    from pefomed.engine.data.prompts import TEMPLATES
    from pefomed.models import vit

    return {"data.template": TEMPLATES, "eval.prompt": TEMPLATES, "model.vision": tuple(vit.CONFIGS)}


Problem = tuple[tuple[str, ...], str]  # (the keys whose values are at fault, what is wrong and the fix)


def _lr_order(cfg: Config) -> Iterator[Problem]:
    if cfg.optim.min_lr > cfg.optim.lr:
        yield ("optim.min_lr", "optim.lr"), (
            f"optim.min_lr={cfg.optim.min_lr:g} is above optim.lr={cfg.optim.lr:g}: the schedule decays from lr "
            "down to min_lr, so set min_lr <= lr"
        )


def _connector_options(cfg: Config) -> Iterator[Problem]:
    """optim.connector_lr and model.connector_init: where they apply, and their ranges."""
    m, lr = cfg.model, cfg.optim.connector_lr
    if lr is not None and lr not in POSITIVE:
        yield ("optim.connector_lr",), (
            f"optim.connector_lr={lr!r} is out of range: it must be {POSITIVE} (or null to use optim.lr)")
    if m.connector_init == "default":
        return
    if m.arch not in ARCH_CONNECTORS:
        yield ("model.connector_init", "model.arch"), (
            f"model.connector_init={m.connector_init} applies to the minigptv2 and llava connectors; "
            f"model.arch={m.arch} brings its own connector: set model.connector_init=default")
    if m.projection_checkpoint is not None:
        yield ("model.connector_init", "model.projection_checkpoint"), (
            f"model.connector_init={m.connector_init} initializes a fresh connector, but "
            "model.projection_checkpoint replaces it: remove one of them")
    if cfg.train.strategy == "fsdp2":
        yield ("model.connector_init", "train.strategy"), (
            f"model.connector_init={m.connector_init} is applied by the whole-model build, which "
            "train.strategy=fsdp2's sharded loading skips: use train.strategy=ddp or deepspeed, or "
            "model.connector_init=default")


def _align(cfg: Config) -> Iterator[Problem]:
    """align: where the caption alignment of a fresh vision side applies."""
    a, m = cfg.align, cfg.model
    if a.steps == 0:
        return
    if not a.data:
        yield ("align.data", "align.steps"), (
            f"align.steps={a.steps} but align.data is empty: add captioned images, e.g. "
            "[{kind: caption, path: data/demo_smollm2, split: train}], or set align.steps=0")
    if m.arch not in ARCH_CONNECTORS:
        yield ("align.steps", "model.arch"), (
            f"align.steps={a.steps} aligns a fresh minigptv2 or llava connector; model.arch={m.arch} brings its own: "
            "set align.steps=0")
    if m.projection_checkpoint is not None:
        yield ("align.steps", "model.projection_checkpoint"), (
            f"align.steps={a.steps} trains a fresh connector, but model.projection_checkpoint replaces it: remove "
            "one of them")
    if cfg.train.strategy not in ("single", "ddp"):
        yield ("align.steps", "train.strategy"), (
            f"align.steps={a.steps} runs on the whole model before it is sharded, which "
            f"train.strategy={cfg.train.strategy} does not build: use train.strategy=single or ddp, or set align.steps=0")


def _deepspeed_stage(cfg: Config) -> Iterator[Problem]:
    t = cfg.train
    if t.strategy != "deepspeed":
        for key in ("deepspeed_stage", "offload_optimizer", "offload_params", "deepspeed_config"):
            if getattr(t, key) != getattr(TrainConfig, key):
                yield (f"train.{key}", "train.strategy"), (
                    f"train.{key}={getattr(t, key)} does nothing with train.strategy={t.strategy!r}: it applies "
                    "to train.strategy=deepspeed only; remove it or set train.strategy=deepspeed"
                )
        return
    if t.offload_params != "none" and t.deepspeed_stage != 3:
        yield ("train.offload_params", "train.deepspeed_stage"), (
            f"train.offload_params={t.offload_params} needs train.deepspeed_stage=3 (ZeRO-2 keeps every "
            f"parameter on the device); got train.deepspeed_stage={t.deepspeed_stage}"
        )
    if t.deepspeed_stage == 3 and cfg.model.quantize_llm != "none":
        yield ("train.deepspeed_stage", "model.quantize_llm"), (
            f"train.deepspeed_stage=3 with model.quantize_llm={cfg.model.quantize_llm}: ZeRO-3 partitions "
            "parameters into its own flat buffers, which cannot hold 4-bit weights; use train.deepspeed_stage=2 "
            "or train.strategy=fsdp2 (which shards NF4 weights)"
        )
    if t.deepspeed_config is not None and not Path(t.deepspeed_config).is_file():
        yield ("train.deepspeed_config",), (
            f"train.deepspeed_config={t.deepspeed_config}: no such file; give the path of a DeepSpeed JSON config"
        )


def _target_modules(cfg: Config) -> Iterator[Problem]:
    if cfg.lora.enabled and not cfg.lora.target_modules:
        yield ("lora.target_modules",), (
            "lora.target_modules is empty: name the projections that get adapters, e.g. [q_proj, v_proj], "
            "or [all-linear]"
        )


def _random_init_llm(cfg: Config) -> Iterator[Problem]:
    from pefomed.models import idefics2, llama

    names = idefics2.CONFIGS if cfg.model.arch == "idefics2" else llama.CONFIGS
    if cfg.model.random_init and cfg.model.llm not in names:
        yield ("model.llm", "model.random_init"), (
            f"model.llm={cfg.model.llm!r} with model.random_init=true must name a built-in config, one of: "
            f"{', '.join(names)}; to load weights, set model.llm to a model folder and model.random_init=false"
        )


def _image_grid(cfg: Config) -> Iterator[Problem]:
    """The image must cover at least one patch and its patches must group evenly into tokens."""
    from pefomed.models import vit

    m = cfg.model
    if m.vision not in vit.CONFIGS or m.arch == "idefics2":
        return  # reported by the choice check; Idefics2 takes any image size up to its tower's
    patch = vit.CONFIGS[m.vision].patch_size
    side = m.image_size // patch
    keys = ("model.image_size", "model.group", "model.group_layout")
    if side < 1:
        yield keys, f"model.image_size={m.image_size} is smaller than the patch size {patch} of model.vision={m.vision!r}"
    elif m.connector != "grouped":
        return  # LLaVA's projectors take every patch token
    elif (side * side) % m.group:
        yield keys, (
            f"model.image_size={m.image_size} gives {side}x{side}={side * side} patches of {patch} px, which "
            f"model.group={m.group} does not divide; pick an image size and group whose patch count divides"
        )
    elif m.group_layout == "spatial" and (m.group != 4 or side % 2):
        yield keys, (
            f"model.group_layout=spatial groups 2x2 patches: it needs model.group=4 (got {m.group}) and an even "
            f"patch grid (model.image_size={m.image_size} gives {side}x{side})"
        )


def _datasets(cfg: Config) -> Iterator[Problem]:
    from pefomed.engine.data.readers import READERS, split_names

    parts = {"data.train": cfg.data.train, "data.eval": cfg.data.eval, "align.data": cfg.align.data}
    for part, specs in parts.items():
        for i, spec in enumerate(specs):
            where = f"{part}[{i}]"
            if spec.kind not in READERS:
                yield (f"{where}.kind",), f"{where}.kind={spec.kind!r} is not one of: {', '.join(READERS)}"
            elif spec.split not in split_names(spec.kind):
                yield (f"{where}.split",), (
                    f"{where}.split={spec.split!r}: dataset kind {spec.kind} has the splits "
                    f"{', '.join(split_names(spec.kind))}"
                )
            elif spec.kind == "synthetic" and cfg.model.image_size < SYNTHETIC_MIN_IMAGE_SIZE:
                yield ("model.image_size", f"{where}.kind"), (
                    f"model.image_size={cfg.model.image_size}: the synthetic dataset needs at least "
                    f"{SYNTHETIC_MIN_IMAGE_SIZE} px for its lesions to stay visible"
                )


def _augment(cfg: Config) -> Iterator[Problem]:
    a = cfg.data.augment
    if a is None:
        return
    low, high = a.crop_scale
    if not 0 < low <= high <= 1:
        yield ("data.augment.crop_scale",), (
            f"data.augment.crop_scale={list(a.crop_scale)}: expected [low, high] with 0 < low <= high <= 1 "
            "(the fraction of the image area a crop keeps; [1, 1] for no crop)")
    if not 0 < a.crop_ratio[0] <= a.crop_ratio[1]:
        yield ("data.augment.crop_ratio",), (
            f"data.augment.crop_ratio={list(a.crop_ratio)}: expected [low, high] with 0 < low <= high "
            "(aspect ratios, width / height)")
    if a.hflip not in PROBABILITY:
        yield ("data.augment.hflip",), f"data.augment.hflip={a.hflip!r} is out of range: it must be {PROBABILITY}"


ARCH_CONNECTORS = {"minigptv2": ("grouped",), "llava": ("linear", "mlp2x_gelu")}


def _arch(cfg: Config) -> Iterator[Problem]:
    """The connector and the vision options that each assembly uses."""
    m = cfg.model
    if m.arch in ARCH_CONNECTORS and m.connector not in ARCH_CONNECTORS[m.arch]:
        yield ("model.connector", "model.arch"), (
            f"model.connector={m.connector} does not fit model.arch={m.arch}: MiniGPT-v2 uses the grouped "
            "projection (grouped), LLaVA a projector over each patch token (linear or mlp2x_gelu)"
        )
    if m.image_splitting and m.arch != "idefics2":
        yield ("model.image_splitting", "model.arch"), (
            f"model.image_splitting=true applies to model.arch=idefics2 only (its processor's do_image_splitting); "
            f"model.arch={m.arch} takes one {m.image_size}x{m.image_size} image: remove it"
        )
    if m.arch == "idefics2" and m.vision_checkpoint is not None:
        yield ("model.vision_checkpoint", "model.arch"), (
            "model.vision_checkpoint does not apply to model.arch=idefics2: its vision tower loads from the "
            "model.llm folder with the rest of the model; remove it"
        )
    if m.train_vision and m.arch not in ARCH_CONNECTORS:
        yield ("model.train_vision", "model.arch"), (
            f"model.train_vision=true trains the ViT of the minigptv2 and llava assemblies; model.arch={m.arch} "
            "brings its own pretrained tower (train it through lora.target_modules): set model.train_vision=false"
        )


# model.attn_implementation -> the package it imports and how to get it.
ATTENTION_PACKAGES = {
    "flash_attention_2": ("flash_attn", "pip install 'pefomed[gpu]' (flash-attn) on a CUDA machine"),
    "xformers": ("xformers.ops", "pip install 'pefomed[gpu]' (xformers) on a CUDA machine"),
}


def _attention_backend(cfg: Config) -> Iterator[Problem]:
    """flash-attn and xformers are optional: refused here only when their package does not import."""
    backend = cfg.model.attn_implementation
    if backend not in ATTENTION_PACKAGES:
        return
    import importlib

    package, fix = ATTENTION_PACKAGES[backend]
    try:
        importlib.import_module(package)
    except Exception as e:  # ImportError, or a build that fails to load its CUDA libraries
        yield ("model.attn_implementation",), (
            f"model.attn_implementation={backend} needs the {package.split('.')[0]} package, which does not import "
            f"here ({type(e).__name__}: {e}); {fix}, or use model.attn_implementation=sdpa"
        )


def _hot_path(cfg: Config) -> Iterator[Problem]:
    """Packing, the feature cache and activation checkpointing: options that need others."""
    d, t, m = cfg.data, cfg.train, cfg.model
    if d.packing and d.pack_tokens < d.max_length:
        yield ("data.pack_tokens", "data.max_length"), (
            f"data.pack_tokens={d.pack_tokens} is below data.max_length={d.max_length}: a sample of max_length "
            "tokens would fit no pack; raise data.pack_tokens (or lower data.max_length)"
        )
    if d.packing and m.arch == "idefics2":
        yield ("data.packing", "model.arch"), (
            "data.packing packs one square image per sample; model.arch=idefics2 takes several images of their "
            "own sizes per sample: set data.packing=false"
        )
    if m.train_vision and m.feature_cache:
        yield ("model.feature_cache", "model.train_vision"), (
            "model.feature_cache keeps the frozen ViT's features per image, but model.train_vision=true changes "
            "the tower every step: set model.feature_cache=false"
        )
    if m.feature_cache and d.augment is not None:
        yield ("model.feature_cache", "data.augment"), (
            "model.feature_cache keeps the frozen ViT's features per image, but data.augment draws another crop "
            "or flip each time, so no two draws share features: remove data.augment or set model.feature_cache=false"
        )
    if t.ac_every != TrainConfig.ac_every and t.activation_checkpointing != "selective":
        yield ("train.ac_every", "train.activation_checkpointing"), (
            f"train.ac_every={t.ac_every} does nothing with train.activation_checkpointing="
            f"{t.activation_checkpointing}: it applies to selective checkpointing; set "
            "train.activation_checkpointing=selective or remove it"
        )


# Rules that tie options together, each yielding what is wrong.
RULES: tuple[Callable[[Config], Iterator[Problem]], ...] = (
    _lr_order, _connector_options, _align, _deepspeed_stage, _target_modules, _random_init_llm, _image_grid, _datasets, _augment, _arch,
    _attention_backend, _hot_path,
)


def _get(cfg: Config, key: str) -> Any:
    value: Any = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def problems(cfg: Config) -> Iterator[Problem]:
    """Everything in `cfg` that is out of range, not a known name, not supported yet or inconsistent."""
    for key, allowed in RANGES.items():
        value = _get(cfg, key)
        for i, v in enumerate(value) if isinstance(value, tuple) else [(None, value)]:
            if v not in allowed:
                name = key if i is None else f"{key}[{i}]"
                yield (key,), f"{name}={v!r} is out of range: it must be {allowed}"
    for key, names in _choices().items():
        value = _get(cfg, key)
        if value not in names:
            close = difflib.get_close_matches(str(value), names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            yield (key,), f"{key}={value!r} is not one of: {', '.join(names)}{hint}"
    for key, (values, supported) in NOT_SUPPORTED_YET.items():
        value = _get(cfg, key)
        if value in values:
            yield (key,), f"{key}={value!r} is not supported yet; use {supported}"
    for rule in RULES:
        yield from rule(cfg)


def validate(cfg: Config, source: str | Origins = "<config>") -> Config:
    """Raise a ConfigError for the first problem in `cfg`, naming where the value came from."""
    origins = source if isinstance(source, Origins) else Origins(source)
    for keys, message in problems(cfg):
        raise ConfigError(f"{origins.of(*keys)}: {message}")
    return cfg


class Origins:
    """Where each value of a config came from: the file (or defaults), or a `key=value` override.

    A value set by a later override wins over an earlier one, and any override over the file; a
    section set as a whole (`lora={r: 8}`) is the origin of everything in it.
    """

    def __init__(self, default: str) -> None:
        self.default = default
        self._set: dict[str, tuple[int, str]] = {}
        self._count = 0

    def record(self, key: str, label: str) -> None:
        self._count += 1
        self._set[key] = (self._count, label)

    def _rank(self, path: str) -> tuple[int, str]:
        parts = re.split(r"\.|(?=\[)", path)
        for n in range(len(parts), 0, -1):
            prefix = ".".join(parts[:n]).replace(".[", "[")
            if prefix in self._set:
                return self._set[prefix]
        return (0, self.default)

    def of(self, *paths: str) -> str:
        """The origin of the most recently set of `paths` (dotted, with [i] for list items)."""
        return max((self._rank(p) for p in paths), default=(0, self.default))[1]


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML file (or start from defaults), apply `a.b=value` overrides, check everything.

    An error names its origin: the file for a value from the file, `override 'a.b=value'` for a
    value from an override.
    """
    raw: dict[str, Any] = {}
    origins = Origins("<defaults>")
    if path is not None:
        origins = Origins(str(path))
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from e
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        origins.record(_apply_override(raw, item), f"override {item!r}")
    return validate(from_dict(Config, raw, source=origins), origins)


def _apply_override(raw: dict[str, Any], item: str) -> str:
    """Set `a.b=value` in the raw mapping; returns the dotted key."""
    key, sep, value = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-5")
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"override {item!r}: {key!r} is not a dotted key like train.max_steps")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({' '.join(str(e).split())})") from e
    return key


def from_dict(cls: type, data: Any, *, source: str | Origins = "<dict>", where: str = "") -> Any:
    """Build dataclass `cls` from plain data, checking every key and type.

    `source` names where the data came from in errors: a label, or the `Origins` of each key.
    """
    origins = source if isinstance(source, Origins) else Origins(source)
    if not isinstance(data, dict):
        raise ConfigError(f"{origins.of(where)}: {where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{origins.of(path)}: unknown key {path!r}{hint} (known keys here: {', '.join(known)})"
            )
        kwargs[key] = _coerce(hints[key], value, origins=origins, where=path)
    missing = [
        name
        for name, f in known.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where_text = f" in {where}" if where else ""
        raise ConfigError(f"{origins.of(where)}: missing required key(s) {', '.join(missing)}{where_text}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, *, origins: Origins, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    source = origins.of(where)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=origins, where=where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{source}: {where}={value!r} is not one of {list(args)}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, origins=origins, where=where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {where} cannot be {value!r}")
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(args[0], v, origins=origins, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {where} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, origins=origins, where=f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is float:
        number = value
        if isinstance(value, str):
            try:
                number = float(value)  # YAML 1.1 reads "1e-5" as a string
            except ValueError:
                number = None
        if isinstance(number, (int, float)) and not isinstance(number, bool):
            if not math.isfinite(number):
                raise ConfigError(f"{source}: {where} must be a finite number, got {value!r}")
            return float(number)
    if tp in (int, str, bool) and isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
        return value
    raise ConfigError(f"{source}: {where} must be {getattr(tp, '__name__', tp)}, got {value!r}")


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str | Path) -> None:
    data = to_dict(config)
    Path(path).write_text(yaml.safe_dump(_plain(data), sort_keys=False))


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value
