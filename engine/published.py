"""Released MiniGPT-v2 / PeFoMed checkpoints (`.pth`) as pefomed checkpoint folders.

    pefomed convert --checkpoint pefomed_vqarad.pth --config configs/pefomed_stage2_vqa.yaml \\
        --out runs/pefomed_published/vqarad [key=value overrides]
    pefomed eval --checkpoint runs/pefomed_published/vqarad --out runs/pefomed_published/vqarad/eval

The layout, from Vision-CAIR/MiniGPT-4 (`minigpt4/models/minigpt_base.py`, `minigpt_v2.py`, the
runner's `_save_checkpoint`) and jinlHe/PeFoMed (`pefomed/models/pefomed/`, which copies it): the
file is `torch.save({"model": state_dict, "optimizer": ..., "config": ..., "scaler": ...,
"epoch": ...})`, where `state_dict` keeps only the parameters that were trained (and buffers):
- `llama_proj.weight [4096, 5632]`, `llama_proj.bias [4096]`: the grouped projection;
- PEFT's LoRA inside the LLM, which `get_peft_model` wrapped as `llama_model`:
  `llama_model.base_model.model.model.layers.N.self_attn.{q,v}_proj.lora_{A,B}.default.weight`
  (PEFT >= 0.3 puts the adapter name `default` in the key; older releases have none);
- buffers that are not weights (`...rotary_emb.inv_freq` from transformers 4.30), ignored.
Both repositories build LoRA with r=64, alpha=16, dropout 0.05 on q_proj and v_proj; the rank and
the targets are read from the tensors, alpha from the file's own `config.model.lora_alpha` when
it is there (else 16, their default).

The file is read with `torch.load(weights_only=True)`: it is untrusted, and its optimizer state and
config are plain containers that load without unpickling code. The converted folder is a complete
pefomed checkpoint (adapter in PEFT's format, `projection.safetensors`, `config.yaml`, `COMPLETE`)
plus `converted_from.json`; evaluation, `pefomed ask` and `pefomed export` take it like any other.
The base weights (Llama-2-7b-chat, EVA ViT-g) come from the config, as for a trained run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from pefomed.engine.config import Config, load_config
from pefomed.errors import run_cli
from pefomed.models.loading import CheckpointError, read_state_dict

logger = logging.getLogger(__name__)

PROJECTION_KEYS = ("llama_proj.weight", "llama_proj.bias")
_LORA_KEY = re.compile(r"^llama_model\.base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
# Buffers a MiniGPT-v2 state dict may carry beside its trained parameters.
_BUFFER_KEY = re.compile(r"(rotary_emb\.inv_freq|\.(cos|sin)_cached|relative_position_index|position_ids)$")
MINIGPT_V2_LORA_ALPHA = 16.0  # MiniGPT-v2's and PeFoMed's lora_alpha when their config says nothing


@dataclasses.dataclass
class PublishedCheckpoint:
    """A released checkpoint in pefomed's names."""

    projection: dict[str, torch.Tensor]  # llama_proj.weight, llama_proj.bias
    adapter: dict[str, torch.Tensor]  # PEFT keys: base_model.model.<module>.lora_A.weight
    r: int
    target_modules: list[str]
    alpha: float
    alpha_source: str
    ignored: list[str]
    epoch: int | None


def _metadata(path: Path) -> dict:
    """The file's `config` and `epoch` (plain containers), or {} when they cannot be read as such."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - the tensors were read already; only the metadata is optional
        logger.warning("%s: its config cannot be read with weights_only=True (%s); LoRA alpha defaults to %g",
                       path, str(e).splitlines()[0][:200], MINIGPT_V2_LORA_ALPHA)
        return {}
    return data if isinstance(data, dict) else {}


def _lora_alpha(meta: dict) -> tuple[float, str]:
    config = meta.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    alpha = model.get("lora_alpha") if isinstance(model, dict) else None
    if isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and alpha > 0:
        return float(alpha), "config.model.lora_alpha of the file"
    return MINIGPT_V2_LORA_ALPHA, "MiniGPT-v2's default (the file's config does not say)"


def read_published(path: str | Path) -> PublishedCheckpoint:
    """The projection and LoRA of a MiniGPT-v2 / PeFoMed `.pth`, renamed; CheckpointError on anything else."""
    path = Path(path)
    state = read_state_dict(path)  # weights_only=True; unwraps {"model": ...}
    projection: dict[str, torch.Tensor] = {}
    adapter: dict[str, torch.Tensor] = {}
    ignored: list[str] = []
    unknown: list[str] = []
    for key, tensor in state.items():
        lora = _LORA_KEY.match(key)
        if key in PROJECTION_KEYS:
            projection[key] = tensor
        elif lora:
            adapter[f"base_model.model.{lora['module']}.lora_{lora['ab']}.weight"] = tensor
        elif _BUFFER_KEY.search(key):
            ignored.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            f"{path}: {len(unknown)} tensor(s) are neither the projection (llama_proj) nor LoRA weights of the LLM "
            f"(llama_model.base_model.model.*.lora_A/B): {unknown[:5]}; this is not a MiniGPT-v2 / PeFoMed "
            "LoRA checkpoint (a fully fine-tuned model needs a different conversion)")
    missing = [k for k in PROJECTION_KEYS if k not in projection]
    if missing:
        raise CheckpointError(f"{path}: no {' or '.join(missing)}; a MiniGPT-v2 / PeFoMed checkpoint holds the trained "
                              f"projection (found {len(state)} tensors: {list(state)[:4]})")
    if not adapter:
        raise CheckpointError(f"{path}: no LoRA weights (llama_model.base_model.model.*.lora_A.default.weight); "
                              "was the model trained with lora_r > 0?")
    halves = {ab: {k.split(".lora_")[0] for k in adapter if f".lora_{ab}." in k} for ab in "AB"}
    unpaired = sorted(halves["A"] ^ halves["B"])
    if unpaired:
        raise CheckpointError(f"{path}: LoRA weights without their A/B partner: {unpaired[:4]}; the file is incomplete")
    ranks = {t.shape[0] for k, t in adapter.items() if ".lora_A." in k}
    if len(ranks) != 1:
        raise CheckpointError(f"{path}: the LoRA A matrices have different ranks {sorted(ranks)}; one rank is expected")
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter})
    meta = _metadata(path)
    alpha, source = _lora_alpha(meta)
    epoch = meta.get("epoch")
    return PublishedCheckpoint(projection, adapter, ranks.pop(), targets, alpha, source, ignored,
                               epoch if isinstance(epoch, int) else None)


def with_published_lora(cfg: Config, published: PublishedCheckpoint) -> Config:
    """`cfg` with the checkpoint's LoRA shape (rank, alpha, targets); each change is logged."""
    lora = dataclasses.replace(cfg.lora, r=published.r, alpha=published.alpha,
                               target_modules=list(published.target_modules))
    for name in ("r", "alpha", "target_modules"):
        if getattr(cfg.lora, name) != getattr(lora, name):
            logger.info("lora.%s: %s in the config, %s in the checkpoint: the checkpoint's is used",
                        name, getattr(cfg.lora, name), getattr(lora, name))
    return dataclasses.replace(cfg, lora=lora)


def check_against_model(cfg: Config, published: PublishedCheckpoint, source: Path) -> None:
    """The adapter and projection fit the model that `cfg` builds (checked on the meta device)."""
    from pefomed.engine.build import llm_config, vision_config
    from pefomed.engine.lora import PEFT_PREFIX, lora_parameter_names, make_linear_factory
    from pefomed.models import llama

    config = llm_config(cfg)
    with torch.device("meta"):
        llm = llama.LlamaForCausalLM(config, linear_factory=make_linear_factory(cfg.lora))
    params = dict(llm.named_parameters())
    expected = {PEFT_PREFIX + n: params[n].shape for n in lora_parameter_names(llm)}
    missing = sorted(expected.keys() - published.adapter.keys())
    extra = sorted(published.adapter.keys() - expected.keys())
    wrong = sorted(k for k in expected.keys() & published.adapter.keys() if published.adapter[k].shape != expected[k])
    if missing or extra or wrong:
        shapes = [f"{k}: {list(published.adapter[k].shape)} vs {list(expected[k])}" for k in wrong[:2]]
        raise CheckpointError(
            f"{source}: its LoRA does not fit the LLM of the config (model.llm={cfg.model.llm}): missing {missing[:2]}, "
            f"unexpected {extra[:2]}, wrong shapes {shapes}; give the config of the base it was trained on "
            "(Llama-2-7b-chat for MiniGPT-v2 and PeFoMed)")
    vision = vision_config(cfg)
    want = [config.hidden_size, cfg.model.group * vision.hidden_size]
    got = list(published.projection["llama_proj.weight"].shape)
    if got != want:
        raise CheckpointError(
            f"{source}: llama_proj.weight is {got} but the config's model needs {want} (LLM width {config.hidden_size}, "
            f"{cfg.model.group} x vision width {vision.hidden_size} of model.vision={cfg.model.vision}); use "
            "model.vision=eva-g-14 and model.group=4 for MiniGPT-v2 / PeFoMed")


def convert_published(path: str | Path, config: str | Path, out: str | Path, overrides: list[str] | tuple = ()) -> Path:
    """Write the pefomed checkpoint folder of a released `.pth` to `out`; returns `out`."""
    from pefomed.engine.checkpoint import COMPLETE_MARK, self_contained
    from pefomed.engine.config import save_config
    from pefomed.engine.export import atomic_folder
    from pefomed.engine.fetch import sha256
    from pefomed.engine.lora import peft_adapter_config, write_adapter_config

    path = Path(path)
    published = read_published(path)
    cfg = with_published_lora(load_config(config, list(overrides)), published)
    check_against_model(cfg, published, path)
    out = Path(out)
    with atomic_folder(out) as folder:
        save_file({k: v.contiguous() for k, v in published.adapter.items()}, str(folder / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        write_adapter_config(folder / "adapter_config.json",
                             peft_adapter_config(cfg.lora, cfg.model.llm, published.adapter))
        save_file({k: v.contiguous() for k, v in published.projection.items()}, str(folder / "projection.safetensors"),
                  metadata={"format": "pt"})
        save_config(self_contained(cfg), folder / "config.yaml")
        (folder / "converted_from.json").write_text(json.dumps({
            "file": str(path.resolve()), "sha256": sha256(path), "format": "MiniGPT-v2 / PeFoMed .pth",
            "epoch": published.epoch, "lora_r": published.r, "lora_alpha": published.alpha,
            "lora_alpha_from": published.alpha_source, "target_modules": published.target_modules,
            "ignored_buffers": published.ignored,
        }, indent=2))
        (folder / COMPLETE_MARK).write_text("0")
    logger.info("converted %s -> %s (LoRA r=%d alpha=%g on %s, %d adapter tensors)", path, out, published.r,
                published.alpha, ", ".join(published.target_modules), len(published.adapter))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Convert a released MiniGPT-v2 / PeFoMed .pth into a pefomed checkpoint folder")
    parser.add_argument("--checkpoint", required=True, help="the released .pth file")
    parser.add_argument("--config", required=True,
                        help="a run config naming the base weights (e.g. configs/pefomed_stage2_vqa.yaml)")
    parser.add_argument("--out", required=True, help="the checkpoint folder to write (must not exist)")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. model.llm=/models/Llama-2-7b-chat-hf")
    args = parser.parse_args(argv)
    print(convert_published(args.checkpoint, args.config, args.out, args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
