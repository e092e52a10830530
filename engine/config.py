"""Run configuration: dataclasses loaded from YAML, with `key=value` overrides.

One `Config` describes a whole run (model, LoRA, data, optimizer, trainer, evaluation). Every
field is typed; loading checks types and `Literal` choices, and an unknown key is an error that
names the key, the file and the known keys, because a silently ignored typo (`lora.rank: 64`)
costs a cluster-day.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
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
    attn_implementation: Literal["sdpa", "flash_attention_2", "xformers"] = "sdpa"
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
    kind: Literal["vqa_rad", "slake", "pathvqa", "caption", "roco", "iu_xray", "synthetic"]
    path: str
    split: str = "train"
    image_root: str | None = None


@dataclass
class DataConfig:
    train: list[DatasetSpec] = field(default_factory=list)
    eval: list[DatasetSpec] = field(default_factory=list)
    template: str = "minigptv2"
    short_prompt_prob: float = 0.0  # chance of MiniGPT-v2's short "[vqa] {q}" form in training
    max_length: int = 512
    num_workers: int = 0
    max_bad_fraction: float = 0.05  # stop the run when more samples than this are unreadable
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
    strategy: Literal["single", "ddp", "fsdp2", "deepspeed"] = "single"
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


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Read a YAML file (or start from defaults) and apply `a.b=value` overrides."""
    raw: dict[str, Any] = {}
    source = "<defaults>"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read the config file ({e.strerror})") from e
        try:
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(Config, raw, source=source)


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=3e-5")
    node = raw
    parts = key.strip().split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def from_dict(cls: type, data: Any, *, source: str = "<dict>", where: str = "") -> Any:
    """Build dataclass `cls` from plain data, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else key
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{source}: unknown key {path!r}{hint} (known keys here: {', '.join(known)})"
            )
        kwargs[key] = _coerce(hints[key], value, source=source, where=path)
    missing = [
        name
        for name, f in known.items()
        if name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        where_text = f" in {where}" if where else ""
        raise ConfigError(f"{source}: missing required key(s) {', '.join(missing)}{where_text}")
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, *, source: str, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, source=source, where=where)
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
                return _coerce(arg, value, source=source, where=where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{source}: {where} cannot be {value!r}")
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(args[0], v, source=source, where=f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: {where} must be a list of {len(args)} values")
        return tuple(_coerce(a, v, source=source, where=where) for a, v in zip(args, value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {where} must be a mapping")
        return dict(value)
    if tp is Any:
        return value
    if tp is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)  # YAML 1.1 reads "1e-5" as a string
        except ValueError:
            pass
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
