"""`pefomed export`: a training checkpoint as a Hugging Face model folder.

    pefomed export --checkpoint runs/x/checkpoints/step_N --out DIR [--merge] [--dtype bfloat16]
        [--config run.yaml] [--max-shard-gb 5] [key=value overrides]

With `--merge`, DIR is a transformers model folder (`config.json`, `model.safetensors` or shards
with `model.safetensors.index.json`, the tokenizer files, `generation_config.json` when the base
has one): every LoRA-adapted weight is `W + scaling * B @ A`, computed in fp32 and then cast to
the export dtype (`--dtype`, default `model.dtype` of the run). The base streams from its own
checkpoint one tensor at a time, so a 7B base never sits in memory twice. A QLoRA base
(`model.quantize_llm: nf4`) is quantized and dequantized exactly as training saw it, and the delta
is added to those dequantized weights: the merged model computes what the trained one did.

Without `--merge`, DIR is a PEFT adapter folder (`adapter_config.json`,
`adapter_model.safetensors`) whose `base_model_name_or_path` is the untouched base: the run's
`model.llm` folder, or, for a randomly initialised base (the demo), `DIR/base`, written here.
After QLoRA the base is the full-precision folder; load it in 4-bit NF4 (blocksize 64, double
quantization) to run what was trained.

Both write `projection.safetensors`, the trained connector under MiniGPT-v2's names
(`llama_proj.weight`, `llama_proj.bias`) or LLaVA's (`mm_projector.*`, `mm_projector.0/2.*` for
mlp2x_gelu), and `pefomed_export.json`, which records what was exported, from where, and the
vision tower that the connector expects (the ViT is not part of the HF folder; a ViT that
`model.train_vision` trained is written beside it as `vision.safetensors`).

The LLM part covers LLaMA (2, 3) and Mistral, whose module names are transformers' own. For
`model.arch: idefics2` the folder is the whole Idefics2ForConditionalGeneration (SigLIP,
connector, Mistral; transformers' names), the LoRA of the text model and of the connector folded
in, and the processor files copied: there is no separate projection file. The folder is written
to a temporary sibling and renamed, so an interrupted export leaves nothing that looks complete.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors.torch import save_file

from pefomed.engine.config import Config, ConfigError, load_config
from pefomed.errors import run_cli

logger = logging.getLogger(__name__)

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HF_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
                   "preprocessor_config.json", "processor_config.json")
BUFFER_KEYS = ("rotary_emb.inv_freq",)  # saved by old transformers versions; not weights
CONNECTOR_PREFIXES = ("llama_proj.", "mm_projector.")  # MiniGPT-v2's and LLaVA's names, as the checkpoint holds them


class ExportError(ConfigError):
    """A checkpoint that cannot be exported as asked; the message names what and the fix."""


# ---------------------------------------------------------------- writing folders


@contextlib.contextmanager
def atomic_folder(out: str | Path) -> Iterator[Path]:
    """A temporary folder beside `out`, renamed to `out` when the block completes (removed if it fails).

    `out` must not exist yet: an export never overwrites a folder.
    """
    out = Path(out)
    if out.exists():
        raise ExportError(f"{out}: already exists; remove it or choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp's 0700 would make the folder private
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class ShardWriter:
    """Writes (name, tensor) pairs into safetensors shards of at most `max_bytes` each, as
    transformers names them (`model.safetensors`, or `model-0000i-of-0000N.safetensors` with an index)."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder, self.max_bytes = folder, max_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        size = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + size > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.contiguous()
        self.pending_bytes += size
        self.total_bytes += size

    def _flush(self) -> None:
        path = self.folder / f".shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, str(path), metadata={"format": "pt"})
        self.shards.append((path, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> list[str]:
        """Write the last shard and the index; returns the file names."""
        if self.pending or not self.shards:
            self._flush()
        if len(self.shards) == 1:
            self.shards[0][0].rename(self.folder / "model.safetensors")
            return ["model.safetensors"]
        n = len(self.shards)
        weight_map, names = {}, []
        for i, (path, keys) in enumerate(self.shards, start=1):
            name = f"model-{i:05d}-of-{n:05d}.safetensors"
            path.rename(self.folder / name)
            names.append(name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        return names


# ---------------------------------------------------------------- the checkpoint


def resolve_checkpoint_folder(path: str | Path) -> Path:
    """A complete `step_N` folder, or a run's output_dir -> its latest complete checkpoint."""
    from pefomed.engine.checkpoint import CheckpointError, latest_checkpoint, require_complete

    path = Path(path)
    if (path / "checkpoints").is_dir():
        latest = latest_checkpoint(path)
        if latest is None:
            raise CheckpointError(f"{path / 'checkpoints'}: no complete step_N checkpoint to export")
        path = latest
    return require_complete(path)


def lora_scaling(cfg: Config) -> float:
    return cfg.lora.alpha / (cfg.lora.r ** 0.5 if cfg.lora.use_rslora else cfg.lora.r)


def merged_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    """`W + scaling * B @ A` in fp32 (the caller casts it to the export dtype)."""
    return weight.float() + scaling * (lora_b.float() @ lora_a.float())


def _dense(tensor: torch.Tensor) -> torch.Tensor:
    """A QLoRA weight (NF4) as the dense tensor the model computed with; others as they are."""
    from pefomed.kernels.nf4 import NF4Tensor

    return tensor.dequantize() if isinstance(tensor, NF4Tensor) else tensor


def _meta_llm(cfg: Config):
    """The run's LLM (the whole Idefics2 model for arch idefics2) on the meta device, with its LoRA
    and QLoRA layers: it says how training's loader converted each base tensor (`convert_loaded`)."""
    from pefomed.engine.build import DTYPES, adapters, idefics2_config, llm_config
    from pefomed.engine.lora import make_linear_factory
    from pefomed.engine.ops import weight_quantizer
    from pefomed.models import idefics2, llama

    dtype, lora = DTYPES[cfg.model.dtype], adapters(cfg)
    text = make_linear_factory(lora, quantize=weight_quantizer(cfg.model.quantize_llm), dtype=dtype)
    with torch.device("meta"):
        if cfg.model.arch == "idefics2":
            # The factories engine.build.build_idefics2 uses: QLoRA on the text model only.
            return idefics2.Idefics2ForConditionalGeneration(
                idefics2_config(cfg), text_factory=text, connector_factory=make_linear_factory(lora, dtype=dtype))
        return llama.LlamaForCausalLM(llm_config(cfg), linear_factory=text)


def base_tensors(cfg: Config) -> Iterator[tuple[str, torch.Tensor]]:
    """The LLM's frozen tensors as the trained model held them (model dtype, NF4 round trip), one at a time.

    A pretrained base streams from `model.llm`; a random-init one (the demo) is rebuilt exactly as
    evaluation rebuilds it, from the run's seed.
    """
    from pefomed.engine.build import DTYPES, build_model
    from pefomed.engine.ops import torch_ops
    from pefomed.models.loading import iter_state_dict

    dtype = DTYPES[cfg.model.dtype]
    if cfg.model.random_init:
        llm = build_model(cfg, "cpu", ops=torch_ops()).llm  # the kernels change no weight
        tied = getattr(llm.config, "tie_word_embeddings", False)
        for name, tensor in llm.state_dict().items():
            if ".lora_" in name or (tied and name == "lm_head.weight"):
                continue
            yield name, _dense(tensor.detach())
        return
    meta = _meta_llm(cfg)
    modules = dict(meta.named_modules())
    for name, tensor in iter_state_dict(cfg.model.llm):
        if name.endswith(BUFFER_KEYS):
            continue
        if tensor.is_floating_point():
            tensor = tensor.to(dtype)
        owner, _, leaf = name.rpartition(".")
        convert = getattr(modules.get(owner), "convert_loaded", None)
        yield name, _dense(convert(leaf, tensor) if convert is not None else tensor)


def _adapter_pairs(adapter: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Base weight name -> (A, B), from PEFT keys `base_model.model.<module>.lora_A.weight`."""
    from pefomed.engine.lora import PEFT_PREFIX

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for key, a in adapter.items():
        if ".lora_A." not in key:
            continue
        module = key[len(PEFT_PREFIX):].split(".lora_A.")[0]
        pairs[f"{module}.weight"] = (a, adapter[key.replace(".lora_A.", ".lora_B.")])
    return pairs


def export_projection(projection: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The checkpoint's connector, whose keys are MiniGPT-v2's (`llama_proj.*`) or LLaVA's (`mm_projector.*`)."""
    strange = sorted(k for k in projection if not k.startswith(CONNECTOR_PREFIXES))
    if strange:
        raise ExportError(f"the checkpoint's connector has keys {strange[:6]}, neither MiniGPT-v2's llama_proj.* nor "
                          "LLaVA's mm_projector.*; export writes those two connectors")
    return dict(projection)


def _hf_config(cfg: Config, dtype: torch.dtype) -> dict:
    from pefomed.engine.build import llm_config

    if cfg.model.random_init:
        config = llm_config(cfg).to_hf_dict()
    else:
        config = json.loads((Path(cfg.model.llm) / "config.json").read_text())
        if config.get("quantization_config"):
            raise ExportError(f"{cfg.model.llm}/config.json has a quantization_config: export needs a "
                              "full-precision base folder (QLoRA quantizes it while loading)")
    config["torch_dtype"] = HF_DTYPE_NAMES[dtype]
    if "dtype" in config:
        config["dtype"] = HF_DTYPE_NAMES[dtype]
    return config


def _copy_tokenizer(cfg: Config, folder: Path) -> list[str]:
    source = Path(cfg.model.tokenizer or cfg.model.llm)
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, folder / name)
            copied.append(name)
    if not cfg.model.random_init and (Path(cfg.model.llm) / "generation_config.json").is_file():
        shutil.copy2(Path(cfg.model.llm) / "generation_config.json", folder / "generation_config.json")
    if not copied:
        logger.warning("no tokenizer files in %s; add them to the exported folder by hand", source)
    return copied


def write_model_folder(cfg: Config, folder: Path, dtype: torch.dtype, adapter: dict[str, torch.Tensor] | None,
                       max_shard_bytes: int) -> dict:
    """A transformers folder of the LLM in `folder`, with `adapter` merged in (None: the base as it is)."""
    pairs = _adapter_pairs(adapter) if adapter is not None else {}
    scaling = lora_scaling(cfg)
    writer = ShardWriter(folder, max_shard_bytes)
    merged = []
    for name, tensor in base_tensors(cfg):
        if name in pairs:
            tensor = merged_weight(tensor, *pairs[name], scaling)
            merged.append(name)
        writer.add(name, tensor.to(dtype) if tensor.is_floating_point() else tensor)
    absent = sorted(set(pairs) - set(merged))
    if absent:
        raise ExportError(f"the adapter names weights the base {cfg.model.llm} does not have: {absent[:4]}; "
                          "export with the config that trained this checkpoint")
    files = writer.close()
    (folder / "config.json").write_text(json.dumps(_hf_config(cfg, dtype), indent=2, sort_keys=True))
    return {"files": files, "merged_weights": len(merged), "tokenizer": _copy_tokenizer(cfg, folder)}


def _adapter_folder(cfg: Config, folder: Path, checkpoint: Path, base: str, adapter: dict[str, torch.Tensor]) -> None:
    from pefomed.engine.lora import PEFT_PREFIX

    adapter_config = json.loads((checkpoint / "adapter_config.json").read_text())
    adapter_config["base_model_name_or_path"] = base
    # The adapted modules by full name: PEFT matches a leaf name ("q_proj") in every tower, and
    # would add empty adapters to Idefics2's SigLIP, which the run never adapted.
    adapter_config["target_modules"] = sorted({k[len(PEFT_PREFIX):].split(".lora_")[0] for k in adapter})
    (folder / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2, sort_keys=True))
    shutil.copy2(checkpoint / "adapter_model.safetensors", folder / "adapter_model.safetensors")


def export_checkpoint(checkpoint: str | Path, out: str | Path, *, merge: bool, dtype: str | None = None,
                      config: str | Path | None = None, overrides: list[str] | tuple = (),
                      max_shard_gb: float = 5.0) -> Path:
    """Write the export of `checkpoint` to `out` (see the module docstring); returns `out`."""
    from pefomed.engine.checkpoint import VISION_FILE, read_exports

    checkpoint = resolve_checkpoint_folder(checkpoint)
    cfg = load_config(Path(config) if config else checkpoint / "config.yaml", list(overrides))
    if cfg.model.random_init and cfg.model.arch == "idefics2":
        raise ExportError(f"model.llm={cfg.model.llm} is a random-init Idefics2, which transformers has no config.json "
                          "for here: export needs an Idefics2 folder (config.json and weights) as the base")
    if not cfg.model.random_init and not (Path(cfg.model.llm) / "config.json").is_file():
        raise ExportError(f"model.llm={cfg.model.llm}: no config.json there; export needs the run's base model "
                          "folder (pass model.llm=<folder> as an override)")
    export_dtype = EXPORT_DTYPES[dtype or cfg.model.dtype]
    exports = read_exports(checkpoint)
    out = Path(out).resolve()
    record = {
        "checkpoint": str(checkpoint.resolve()), "merged": merge, "dtype": HF_DTYPE_NAMES[export_dtype],
        "base_model": "random init: " + cfg.model.llm if cfg.model.random_init else str(Path(cfg.model.llm).resolve()),
        "quantize_llm": cfg.model.quantize_llm,
        "lora": {"r": cfg.lora.r, "alpha": cfg.lora.alpha, "use_rslora": cfg.lora.use_rslora,
                 "target_modules": cfg.lora.target_modules, "scaling": lora_scaling(cfg)},
        "connector": "projection.safetensors",
        "vision": {"name": cfg.model.vision, "checkpoint": cfg.model.vision_checkpoint,
                   "layout": cfg.model.vision_layout, "image_size": cfg.model.image_size,
                   "ln_vision": cfg.model.ln_vision, "group": cfg.model.group, "group_layout": cfg.model.group_layout},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    max_bytes = int(max_shard_gb * 2**30)
    with atomic_folder(out) as folder:
        if merge:
            record.update(write_model_folder(cfg, folder, export_dtype, exports["adapter"], max_bytes))
        else:
            base = record["base_model"]
            if cfg.model.random_init:
                (folder / "base").mkdir()
                record["base"] = write_model_folder(cfg, folder / "base", export_dtype, None, max_bytes)
                base = str(out / "base")
            _adapter_folder(cfg, folder, checkpoint, base, exports["adapter"])
            record["adapter_base_model"] = base
            if cfg.model.quantize_llm != "none":
                record["note"] = ("the adapter was trained on the NF4-quantized base (blocksize 64, double "
                                  "quantization): load the base in 4-bit NF4 to run what was trained")
        projection = export_projection(exports["projection"])
        if projection:  # Idefics2 trains its connector through LoRA: it is inside the model
            save_file(projection, str(folder / "projection.safetensors"), metadata={"format": "pt"})
        else:
            record["connector"] = "inside the model (LoRA folded in)" if merge else "inside the model (adapter)"
        if "vision" in exports:  # model.train_vision: the trained tower replaces vision.checkpoint
            save_file(exports["vision"], str(folder / VISION_FILE), metadata={"format": "pt"})
            record["vision"]["trained"] = VISION_FILE
        (folder / "pefomed_export.json").write_text(json.dumps(record, indent=2))
    logger.info("exported %s -> %s (%s, %s)", checkpoint, out, "merged" if merge else "PEFT adapter",
                record["dtype"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Export a training checkpoint as a Hugging Face folder")
    parser.add_argument("--checkpoint", required=True, help="a step_N folder or a run's output_dir")
    parser.add_argument("--out", required=True, help="the folder to write (must not exist)")
    parser.add_argument("--merge", action="store_true",
                        help="fold the LoRA into the base weights (default: a PEFT adapter folder on the untouched base)")
    parser.add_argument("--dtype", choices=sorted(EXPORT_DTYPES), help="weights' dtype (default: the run's model.dtype)")
    parser.add_argument("--config", help="run config (default: the checkpoint's config.yaml)")
    parser.add_argument("--max-shard-gb", type=float, default=5.0, help="largest safetensors shard (GiB)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.llm=/models/Llama-2-7b-chat-hf")
    args = parser.parse_args(argv)
    if args.max_shard_gb <= 0:
        parser.error("--max-shard-gb must be > 0")
    out = export_checkpoint(args.checkpoint, args.out, merge=args.merge, dtype=args.dtype, config=args.config,
                            overrides=args.overrides, max_shard_gb=args.max_shard_gb)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
