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
    # Vision tower: a name in models.vit.CONFIGS, and optionally the checkpoint to load.
    vision: str = "tiny"
    vision_checkpoint: str | None = None
    vision_layout: Literal["lavis", "hf_blip2", "hf_clip"] = "lavis"
    image_size: int = 448
    ln_vision: bool = True  # MiniGPT-v2's frozen LayerNorm after the ViT
    # Connector: MiniGPT-v2's grouped projection.
    group: int = 4
    group_layout: Literal["sequence", "spatial"] = "sequence"
    projection_checkpoint: str | None = None  # a projection.safetensors to start from
    adapter_checkpoint: str | None = None  # a PEFT adapter folder to start from (stage 2)
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    kernels: Literal["torch", "triton"] = "torch"
    attn_implementation: Literal["sdpa", "flash_attention_2", "xformers"] = "sdpa"  # only sdpa yet
    quantize_llm: Literal["none", "nf4"] = "none"  # QLoRA: frozen linears stored as NF4


@dataclass
class LoRAConfig:
    r: int = 64
    alpha: float = 16.0
    dropout: float = 0.05
    # Names of the linear layers (last component) that get adapters, or ["all-linear"].
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    init: Literal["kaiming", "gaussian"] = "kaiming"
    use_rslora: bool = False


@dataclass
class DatasetSpec:
    kind: str  # a reader of engine.data.readers.READERS: vqa_rad, slake, pathvqa, caption, roco, ...
    path: str  # the dataset's folder (a split is read by name), or one file
    split: str = "train"  # train, test, or val / validation where the dataset has one
    image_root: str | None = None  # the folder the file's image paths are relative to


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
    # Synthetic demo data is generated here when missing (kind: synthetic).
    synthetic_train: int = 2000
    synthetic_test: int = 300


@dataclass
class OptimConfig:
    lr: float = 1e-5
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    warmup_steps: int = 0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    seed: int = 42
    micro_batch_size: int = 1
    grad_accum: int = 1
    max_steps: int = 100
    save_every: int = 0  # 0: only at the end
    log_every: int = 1
    strategy: Literal["single", "ddp", "fsdp2", "deepspeed"] = "single"  # deepspeed: not supported yet
    deepspeed_stage: Literal[2, 3] = 2
    activation_checkpointing: bool = False
    resume: bool = True  # resume from output_dir's latest checkpoint when there is one
    device: Literal["auto", "cpu", "cuda"] = "auto"
    progress_bar: bool = True


@dataclass
class EvalConfig:
    max_new_tokens: int = 300
    batch_size: int = 8
    prompt: str = "minigptv2"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    data: DataConfig = field(default_factory=DataConfig)
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
    "eval.max_new_tokens": AT_LEAST_1,
    "eval.batch_size": AT_LEAST_1,
}

# Values a `Literal` names but the engine does not implement yet, and what to use instead.
NOT_SUPPORTED_YET: dict[str, tuple[tuple[Any, ...], str]] = {
    "train.strategy": (("deepspeed",), "single, ddp or fsdp2"),
    "model.attn_implementation": (("flash_attention_2", "xformers"), "sdpa"),
}

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


def _deepspeed_stage(cfg: Config) -> Iterator[Problem]:
    default = TrainConfig.deepspeed_stage
    if cfg.train.deepspeed_stage != default and cfg.train.strategy != "deepspeed":
        yield ("train.deepspeed_stage", "train.strategy"), (
            f"train.deepspeed_stage={cfg.train.deepspeed_stage} does nothing with train.strategy="
            f"{cfg.train.strategy!r}: it applies to strategy deepspeed only, which is not supported yet; remove it"
        )


def _target_modules(cfg: Config) -> Iterator[Problem]:
    if not cfg.lora.target_modules:
        yield ("lora.target_modules",), (
            "lora.target_modules is empty: name the projections that get adapters, e.g. [q_proj, v_proj], "
            "or [all-linear]"
        )


def _random_init_llm(cfg: Config) -> Iterator[Problem]:
    from pefomed.models import llama

    if cfg.model.random_init and cfg.model.llm not in llama.CONFIGS:
        yield ("model.llm", "model.random_init"), (
            f"model.llm={cfg.model.llm!r} with model.random_init=true must name a built-in config, one of: "
            f"{', '.join(llama.CONFIGS)}; to load weights, set model.llm to a model folder and model.random_init=false"
        )


def _image_grid(cfg: Config) -> Iterator[Problem]:
    """The image must cover at least one patch and its patches must group evenly into tokens."""
    from pefomed.models import vit

    m = cfg.model
    if m.vision not in vit.CONFIGS:
        return  # reported by the choice check
    patch = vit.CONFIGS[m.vision].patch_size
    side = m.image_size // patch
    keys = ("model.image_size", "model.group", "model.group_layout")
    if side < 1:
        yield keys, f"model.image_size={m.image_size} is smaller than the patch size {patch} of model.vision={m.vision!r}"
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

    for part in ("train", "eval"):
        for i, spec in enumerate(getattr(cfg.data, part)):
            where = f"data.{part}[{i}]"
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


# Rules that tie options together, each yielding what is wrong.
RULES: tuple[Callable[[Config], Iterator[Problem]], ...] = (
    _lr_order, _deepspeed_stage, _target_modules, _random_init_llm, _image_grid, _datasets,
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
