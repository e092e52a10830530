"""One training step of the LLM, ours against Hugging Face transformers + PEFT, in one process.

    python -m pefomed.bench.step                                  # CPU: real SmolLM2, PeFoMed-like batch
    python -m pefomed.bench.step --ac both --out-dir bench/results # + full activation checkpointing
    python -m pefomed.bench.step --case all --layers 4             # CUDA: 7-8B configs at 2 and 4 layers
    pefomed bench step --profile                                   # where each side spends time and bytes

Both sides load the same model folder as users load it (ours through `engine.build.build_llm`,
theirs with `AutoModelForCausalLM.from_pretrained(..., attn_implementation="sdpa")` +
`peft.get_peft_model`, + `BitsAndBytesConfig` NF4 for QLoRA), get the same adapter values (B is
drawn non-zero so that every adapter gradient is), the same batches, the same AdamW
(`engine.trainer.build_optimizer`) and the same seed. The image tokens enter as embeddings that
the connector would have produced: a leaf tensor that needs a gradient (the projection trains),
placed into the token embeddings at the image positions. A step is forward, loss, backward,
AdamW step, `zero_grad(set_to_none=True)`.

- Parity: before timing, one step's loss, adapter gradients and image-embedding gradient of ours
  are compared with HF+PEFT's in fp32 with LoRA dropout off (the two draw their masks
  differently); the run refuses to report speed if they differ by more than 1e-5 relative.
  On CUDA this is done on an fp32 copy at the shallowest measured depth.
- Timing: warm-up steps, then repetitions interleaved (ours, HF, HF, ours, ...) on the same
  batches; CUDA events on CUDA, `time.perf_counter` on the CPU. Median, p20 and p80.
- Memory: on CUDA the peak `max_memory_allocated` of one step, less the bytes that only the other
  side holds. On the CPU: the bytes saved for backward (summed by storage through
  `torch.autograd.graph.saved_tensors_hooks`, each storage once, the parameters' own storages
  excluded, plus the inputs that activation checkpointing keeps) plus parameters, gradients and
  optimizer state.
- Throughput: real (non-padding) tokens per second; on CUDA MFU = the FLOPs the loss needs
  (frozen linears forward and dX, LoRA forward and backward, causal attention, the head on the
  target rows only) per second over the GPU's dense bf16 peak.
- `--layers N` measures at depths N/2 and N, fits `time = a + b * layers` (and the same for
  memory), and reports the extrapolation to the model's full depth next to the measured figures.

On the CPU the model is the real SmolLM2-135M-Instruct (`pefomed fetch smollm2`); on CUDA it is
Llama-2-7B (PeFoMed), Llama-3-8B (BiomedCLIP + LLaMA-3) or Mistral-7B (Med-Idefics) with random
weights in a model folder written once per depth. `--model` takes a model folder or the name of a
config in `models.llama.CONFIGS` instead.

Writes `step-<device>-<date>.json`, `.md` and `.png` under `--out-dir` (bench/results by default),
each with the device, the date and the command. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import json
import logging
import math
import os
import platform
import re
import shlex
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pefomed.errors import UserError, run_cli

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
PARITY_RTOL = 1e-5
DEFAULT_OUT_DIR = "bench/results"

# --------------------------------------------------------------------------- the seeds' batches


@dataclass(frozen=True)
class StepCase:
    """One recipe's micro-batch shape and adapter, as its paper trains it.

    Token counts are those of a LLaMA tokenizer on the recipe's template: the fixed text before
    the image, the fixed text after it (task tag, instruction, end of turn), and the ranges the
    question and the answer (EOS included) are drawn from.
    """

    name: str
    seed: str
    llm: str  # the models.llama config the seed fine-tunes (the CUDA run's model)
    image_tokens: int
    before_image: int
    after_image: int
    question: tuple[int, int]
    answer: tuple[int, int]
    r: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    init: str = "kaiming"
    qlora: bool = False


ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
CASES: dict[str, StepCase] = {
    # "<s>[INST] <Img>" | 256 | "</Img> [vqa] Based on the image, respond to this question with a
    # short answer: {q} [/INST]" | answer </s>. VQA-RAD questions run 5-20 tokens, answers 1-4.
    "pefomed-vqa": StepCase("pefomed-vqa", "PeFoMed stage 2 (VQA-RAD)", "llama2-7b", 256, 6, 27, (5, 20), (2, 5),
                            r=64, alpha=16, dropout=0.05, targets=("q_proj", "v_proj")),  # fmt: skip
    # PeFoMed on IU-Xray / MIMIC-CXR reports: "[report] Describe the given chest x-ray image in
    # detail." and a 60-120 token report.
    "pefomed-report": StepCase("pefomed-report", "PeFoMed report generation", "llama2-7b", 256, 6, 22, (0, 0),
                               (61, 121), r=64, alpha=16, dropout=0.05, targets=("q_proj", "v_proj")),  # fmt: skip
    # LLaVA-style Llama-3 chat turn around 196 BiomedCLIP patch tokens; OmniMedVQA questions made
    # open-ended, short answers; r=8, alpha=32 on every projection (configs/biomedclip_llama3_stage2.yaml).
    "biomedclip-llama3": StepCase("biomedclip-llama3", "BiomedCLIP + LLaMA-3-8B (OmniMedVQA)", "llama3-8b", 196,
                                  5, 7, (8, 30), (2, 13), r=8, alpha=32, dropout=0.05, targets=ALL_LINEAR),  # fmt: skip
    # Idefics2's "User:<fake_token_around_image><image>x64<fake_token_around_image>{q}
    # <end_of_utterance>\nAssistant:" with one crop; QLoRA r=8, alpha=8, dropout 0.1, Gaussian
    # init on every projection of the text model.
    "med-idefics-qlora": StepCase("med-idefics-qlora", "Med-Idefics QLoRA (VQA-RAD)", "mistral-7b", 64, 4, 7,
                                  (5, 20), (2, 5), r=8, alpha=8, dropout=0.1, targets=ALL_LINEAR, init="gaussian",
                                  qlora=True),  # fmt: skip
}
CPU_MODEL = "smollm2"


def make_batch(case: StepCase, batch_size: int, vocab_size: int, seed: int, placeholder: int = 0,
               pad: int = 0) -> dict[str, torch.Tensor]:  # fmt: skip
    """A right-padded training batch in the Batch contract, with the case's length distribution.

    Token ids are random (they change no timing); labels cover the answer tokens only.
    """
    g = torch.Generator().manual_seed(seed)

    def draw(lo_hi: tuple[int, int]) -> int:
        lo, hi = lo_hi
        return int(torch.randint(lo, hi + 1, (1,), generator=g))

    rows = []
    for _ in range(batch_size):
        prompt = 1 + case.before_image + case.image_tokens + case.after_image + draw(case.question)
        rows.append((prompt, max(1, draw(case.answer))))
    length = max(p + a for p, a in rows)
    low = min(3, vocab_size - 1)
    batch = {
        "input_ids": torch.full((batch_size, length), pad, dtype=torch.long),
        "attention_mask": torch.zeros(batch_size, length, dtype=torch.long),
        "labels": torch.full((batch_size, length), IGNORE_INDEX, dtype=torch.long),
        "image_token_mask": torch.zeros(batch_size, length, dtype=torch.bool),
    }
    for i, (prompt, answer) in enumerate(rows):
        n = prompt + answer
        batch["input_ids"][i, :n] = torch.randint(low, vocab_size, (n,), generator=g)
        batch["attention_mask"][i, :n] = 1
        batch["labels"][i, prompt:n] = batch["input_ids"][i, prompt:n]
        start = 1 + case.before_image
        batch["image_token_mask"][i, start : start + case.image_tokens] = True
        batch["input_ids"][i, start : start + case.image_tokens] = placeholder
    return with_host_indices(batch)


def batch_stats(batch: dict[str, torch.Tensor]) -> dict:
    return {
        "batch_size": int(batch["input_ids"].shape[0]),
        "seq_len": int(batch["input_ids"].shape[1]),
        "real_tokens": int(batch["attention_mask"].sum()),
        "target_tokens": int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()),
        "image_tokens": int(batch["image_token_mask"].sum()),
    }


def image_embeddings(batch: dict, hidden: int, scale: float, seed: int, device, dtype) -> torch.Tensor:
    """What the connector would output for the batch's image positions (a leaf that needs grad)."""
    g = torch.Generator().manual_seed(seed + 7919)
    n = int(batch["image_token_mask"].sum())
    feats = torch.randn(n, hidden, generator=g) * scale
    return feats.to(device=device, dtype=dtype).requires_grad_()


def place_images(embed: nn.Module, input_ids: torch.Tensor, image_mask: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
    embeds = embed(input_ids)
    return embeds.masked_scatter(image_mask[..., None], feats.to(embeds.dtype))


# --------------------------------------------------------------------------- model folders


def random_model_folder(model, layers: int, dtype: torch.dtype, root: Path, device: str = "cpu") -> Path:
    """A Hugging Face folder for `model` (a `LlamaConfig`, or a name in `models.llama.CONFIGS`) at
    `layers` depth with random weights.

    Initialized as transformers initializes LLaMA (normal(0, 0.02) linears and embeddings, norms at
    one), so that activations have realistic scales. Written once per (config, depth, dtype).
    """
    from safetensors.torch import save_file

    from pefomed.models.llama import CONFIGS, LlamaForCausalLM

    if isinstance(model, str):
        if model not in CONFIGS:
            raise UserError(f"--model {model}: not a model folder nor a config in models.llama.CONFIGS "
                            f"({', '.join(CONFIGS)})")  # fmt: skip
        name, config = model, CONFIGS[model]
    else:
        config = model
        name = f"{config.model_type}-{config.hidden_size}x{config.intermediate_size}-v{config.vocab_size}"
    config = dataclasses.replace(config, num_hidden_layers=layers)
    folder = root / f"{name}-{layers}l-{str(dtype).removeprefix('torch.')}"
    if (folder / "model.safetensors").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with torch.device("meta"):
        shapes = {n: p.shape for n, p in LlamaForCausalLM(config).state_dict().items()}
    g = torch.Generator(device=device).manual_seed(0)
    tensors = {}
    for key, shape in shapes.items():
        if config.tie_word_embeddings and key == "lm_head.weight":
            continue
        if key.endswith("norm.weight"):
            t = torch.ones(shape, device=device)
        else:
            t = torch.randn(shape, device=device, generator=g) * 0.02
        tensors[key] = t.to(dtype).cpu()
    hf_config = {**config.to_hf_dict(), "torch_dtype": str(dtype).removeprefix("torch.")}
    (folder / "config.json").write_text(json.dumps(hf_config))
    tmp = folder / "model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    return folder


def smollm2_folder() -> Path:
    from pefomed.engine.fetch import MODELS, fetch

    return fetch("smollm2", MODELS["smollm2"].default_out)


# --------------------------------------------------------------------------- the two sides


@dataclass
class Side:
    """One implementation's trainable model, ready to step."""

    name: str
    model: nn.Module  # what the optimizer and the meters see
    embed: nn.Module
    optimizer: torch.optim.Optimizer
    forward_loss: Callable[[torch.Tensor, dict], torch.Tensor]  # (inputs_embeds, batch) -> loss
    adapters: dict[str, nn.Parameter]  # common name (ours) -> parameter
    layers: list[nn.Module]
    set_dropout: Callable[[float], None]
    dropout: float
    notes: list[str] = field(default_factory=list)

    def loss(self, batch: dict, feats: torch.Tensor) -> torch.Tensor:
        embeds = place_images(self.embed, batch["input_ids"], batch["image_token_mask"], feats)
        return self.forward_loss(embeds, batch)

    def step(self, batch: dict, feats: torch.Tensor) -> float:
        loss = self.loss(batch, feats)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        feats.grad = None
        return loss.detach()


class _Holder(nn.Module):
    """What engine.build.freeze_and_cast and engine.distributed expect around an LLM: `.llm`, `.connector`."""

    def __init__(self, llm: nn.Module) -> None:
        super().__init__()
        self.llm = llm
        self.connector = nn.Module()  # the projection is outside this benchmark: its output is the input


def ours_forward_loss(llm: nn.Module) -> Callable[[torch.Tensor, dict], torch.Tensor]:
    """The engine's own LLM loss, as `models.vlm.VisionLanguageModel.forward` computes it."""
    if hasattr(llm, "loss"):  # the lean path: no attention mask, the head on the target rows only
        from pefomed.models.llama import TargetRows

        def lean(embeds: torch.Tensor, batch: dict) -> torch.Tensor:
            targets = TargetRows(batch["target_index"], batch["target_ids"]) if "target_index" in batch else None
            return llm.loss(batch["labels"], inputs_embeds=embeds, targets=targets)[0]

        return lean
    from pefomed.models import vlm

    def plain(embeds: torch.Tensor, batch: dict) -> torch.Tensor:
        logits = llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
        return vlm.target_token_loss(logits, batch["labels"])[0]

    return plain


def with_host_indices(batch: dict) -> dict:
    """The indices the training collate computes on the host (`engine.data.collate.hot_path_indices`:
    image rows, target rows and ids), when this version of the engine has them."""
    from pefomed.engine.data import collate

    add = getattr(collate, "hot_path_indices", None)
    return {**batch, **add(batch)} if add is not None else batch


def lora_config(case: StepCase, dropout: float | None = None):
    from pefomed.engine.config import LoRAConfig

    return LoRAConfig(r=case.r, alpha=case.alpha, dropout=case.dropout if dropout is None else dropout,
                      target_modules=list(case.targets), init=case.init)  # fmt: skip


def build_ours(folder: Path, case: StepCase, dtype: torch.dtype, device: torch.device, ac: bool) -> Side:
    from pefomed.engine.build import build_llm, freeze_and_cast
    from pefomed.engine.config import Config, ModelConfig, OptimConfig
    from pefomed.engine.distributed import apply_activation_checkpointing
    from pefomed.engine.lora import adapter_modules
    from pefomed.engine.ops import kernel_ops
    from pefomed.engine.trainer import build_optimizer

    kernels = "triton" if device.type == "cuda" else "torch"
    cfg = Config(model=ModelConfig(llm=str(folder), dtype=str(dtype).removeprefix("torch."), kernels=kernels,
                                   quantize_llm="nf4" if case.qlora else "none"),
                 lora=lora_config(case))  # fmt: skip
    llm = build_llm(cfg, device, kernel_ops(kernels, device))
    holder = _Holder(llm)
    freeze_and_cast(holder, dtype)
    if ac:
        apply_activation_checkpointing(holder)
    holder.train()
    modules = [m for _, m in adapter_modules(llm)]

    def set_dropout(p: float) -> None:
        for m in modules:
            m.dropout = p

    adapters = {n.removeprefix("llm.").replace("_checkpoint_wrapped_module.", ""): p
                for n, p in holder.named_parameters() if p.requires_grad}  # fmt: skip
    return Side("ours", holder, llm.get_input_embeddings(), build_optimizer(holder, OptimConfig()),
                ours_forward_loss(llm), adapters, list(llm.model.layers), set_dropout, case.dropout,
                notes=[f"kernels={kernels}"])  # fmt: skip


def build_hf(folder: Path, case: StepCase, dtype: torch.dtype, device: torch.device, ac: bool) -> Side:
    """transformers + PEFT as their documentation runs them (eager PyTorch, SDPA attention)."""
    import transformers
    from peft import LoraConfig, get_peft_model

    from pefomed.engine.config import OptimConfig
    from pefomed.engine.trainer import build_optimizer

    kwargs: dict = {"dtype": dtype, "attn_implementation": "sdpa"}
    notes = ["attn_implementation=sdpa"]
    if case.qlora:
        kwargs["quantization_config"] = transformers.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)  # fmt: skip
        kwargs["device_map"] = {"": str(device)}
        notes.append("bitsandbytes NF4, double quant")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    if not case.qlora:
        model.to(device)
    config = LoraConfig(r=case.r, lora_alpha=case.alpha, lora_dropout=case.dropout, target_modules=list(case.targets),
                        init_lora_weights="gaussian" if case.init == "gaussian" else True, bias="none",
                        task_type="CAUSAL_LM")  # fmt: skip
    peft_model = get_peft_model(model, config)
    if ac:
        # Non-reentrant, as ours: the inputs need no requires_grad trick and the RNG is replayed.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        notes.append("gradient_checkpointing (non-reentrant)")
    peft_model.train()
    dropouts = [m for n, m in peft_model.named_modules() if n.endswith("lora_dropout.default")]

    def set_dropout(p: float) -> None:
        for m in dropouts:
            if isinstance(m, nn.Dropout):
                m.p = p

    adapters = {_common_name(n): p for n, p in peft_model.named_parameters() if p.requires_grad}

    def forward_loss(embeds: torch.Tensor, batch: dict) -> torch.Tensor:
        return peft_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"]).loss

    layers = list(peft_model.base_model.model.model.layers)
    return Side("hf+peft", peft_model, peft_model.get_input_embeddings(), build_optimizer(peft_model, OptimConfig()),
                forward_loss, adapters, layers, set_dropout, case.dropout, notes=notes)  # fmt: skip


def _common_name(peft_name: str) -> str:
    """`base_model.model.model.layers.0.self_attn.q_proj.lora_A.default.weight` -> ours."""
    return peft_name.removeprefix("base_model.model.").replace(".default.", ".")


def sync_adapters(ours: Side, hf: Side, seed: int) -> None:
    """Give both the same adapter values: ours' A, and a B drawn non-zero (mid-training)."""
    if ours.adapters.keys() != hf.adapters.keys():
        raise RuntimeError(
            f"the two sides adapt different layers: only ours {sorted(ours.adapters.keys() - hf.adapters.keys())[:3]}, "
            f"only HF {sorted(hf.adapters.keys() - ours.adapters.keys())[:3]}"
        )
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.adapters.items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            hf.adapters[name].copy_(p)


def build_pair(folder: Path, case: StepCase, dtype: torch.dtype, device: torch.device, ac: bool,
               seed: int) -> tuple[Side, Side]:  # fmt: skip
    torch.manual_seed(seed)
    ours = build_ours(folder, case, dtype, device, ac)
    torch.manual_seed(seed)
    hf = build_hf(folder, case, dtype, device, ac)
    sync_adapters(ours, hf, seed)
    return ours, hf


# --------------------------------------------------------------------------- parity


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    denominator = b.norm()
    return float((a - b).norm() / denominator) if denominator > 0 else float((a - b).norm())


def one_step_grads(side: Side, batch: dict, feats: torch.Tensor, seed: int) -> tuple[torch.Tensor, dict, torch.Tensor]:
    side.set_dropout(0.0)
    try:
        torch.manual_seed(seed)
        loss = side.loss(batch, feats)
        loss.backward()
    finally:
        side.set_dropout(side.dropout)
    grads = {n: p.grad.detach().clone() for n, p in side.adapters.items()}
    feat_grad = feats.grad.detach().clone()
    side.optimizer.zero_grad(set_to_none=True)
    feats.grad = None
    return loss.detach(), grads, feat_grad


def global_rel_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> float:
    """||got - ref|| / ||ref|| over all tensors taken as one vector."""
    num = sum(float((got[n].double() - ref[n].double()).square().sum()) for n in ref)
    den = sum(float(ref[n].double().square().sum()) for n in ref)
    return math.sqrt(num / den) if den > 0 else math.sqrt(num)


def check_parity(ours: Side, hf: Side, batch: dict, feats: torch.Tensor, seed: int) -> dict:
    """One step's loss and gradients, dropout off, ours against HF+PEFT (no optimizer step).

    Passes when the loss, the adapter gradients (all of them as one vector) and the gradient of
    the image embeddings each agree within PARITY_RTOL relative. The worst single adapter tensor
    is reported too: through a deep fp32 model it carries the rounding of both sides (HF+PEFT's
    own fp32 gradients differ from its float64 ones by about as much, see `fp64_reference`).
    """
    lo, go, fo = one_step_grads(ours, batch, feats, seed)
    lh, gh, fh = one_step_grads(hf, batch, feats, seed)
    grad_errs = {n: rel_err(go[n], gh[n]) for n in go}
    worst = max(grad_errs, key=grad_errs.get)
    result = {
        "dtype": str(feats.dtype).removeprefix("torch."),
        "lora_dropout": 0.0,
        "loss_ours": float(lo),
        "loss_hf": float(lh),
        "loss_rel_err": rel_err(lo, lh),
        "adapter_grad_rel_err": global_rel_err(go, gh),
        "adapter_grad_max_tensor_rel_err": grad_errs[worst],
        "adapter_grad_worst": worst,
        "adapters_compared": len(grad_errs),
        "image_embedding_grad_rel_err": rel_err(fo, fh),
        "tolerance": PARITY_RTOL,
    }
    checked = ("loss_rel_err", "adapter_grad_rel_err", "image_embedding_grad_rel_err")
    result["passed"] = all(result[k] <= PARITY_RTOL for k in checked)
    return result


def fp64_reference(ours: Side, hf: Side, batch: dict, feats: torch.Tensor, seed: int) -> dict:
    """How far each side's fp32 step is from HF+PEFT's in float64 (converts both models: run last).

    transformers' RMSNorm computes in fp32 even in a float64 model, so this reference is float64
    everywhere but there; it still shows whether ours' fp32 error is HF's own fp32 error.
    """
    got = {s.name: one_step_grads(s, batch, feats, seed) for s in (ours, hf)}
    hf.model.double()
    ref = one_step_grads(hf, batch, feats.detach().double().requires_grad_(), seed)
    out = {}
    for name, (loss, grads, fgrad) in got.items():
        out[name] = {"loss_rel_err": rel_err(loss, ref[0]), "adapter_grad_rel_err": global_rel_err(grads, ref[1]),
                     "adapter_grad_max_tensor_rel_err": max(rel_err(grads[n], ref[1][n]) for n in grads),
                     "image_embedding_grad_rel_err": rel_err(fgrad, ref[2])}  # fmt: skip
    return out


# --------------------------------------------------------------------------- memory


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    s = t.untyped_storage()
    return (str(t.device), s.data_ptr())


def tensor_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (views and tied weights counted once)."""
    seen: dict = {}
    for t in tensors:
        if t is None:
            continue
        for part in _plain_tensors(t):
            seen[_storage_key(part)] = part.untyped_storage().nbytes()
    return sum(seen.values())


def _plain_tensors(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain tensors a (possibly subclassed, e.g. NF4) tensor stores its data in."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is None:
        return [t]
    names, _ = flatten()
    out = []
    for n in names:
        inner = getattr(t, n)
        if torch.is_tensor(inner):  # DTensor also names its device mesh
            out += _plain_tensors(inner)
    return out


def state_bytes(side: Side) -> dict:
    """Parameters (every storage once), gradients and optimizer state of one side."""
    params = list(side.model.parameters())
    for module in side.model.modules():  # bitsandbytes keeps NF4 statistics beside the weight
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            params += [v for v in _quant_state_tensors(state)]
    optimizer = [v for s in side.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    trainable = [p for p in side.model.parameters() if p.requires_grad]
    grads = sum(p.numel() * p.element_size() for p in trainable)  # allocated by every backward
    return {"params": tensor_bytes(params), "grads": grads, "optimizer": tensor_bytes(optimizer)}


def _quant_state_tensors(state) -> Iterator[torch.Tensor]:
    for value in vars(state).values():
        if torch.is_tensor(value):
            yield value
        elif hasattr(value, "absmax"):  # the nested (double-quant) state
            yield from _quant_state_tensors(value)


KINDS = ("attention", "mlp", "norm", "lora", "rope", "embeddings", "head+loss", "checkpointed inputs", "other")


class SavedTensorMeter:
    """Bytes that autograd keeps for backward, by storage, attributed to layer and kind.

    Inside `measure()`, every tensor the forward saves goes through a pack hook; its storage is
    counted once, unless it belongs to a parameter or buffer (those are counted as parameters).
    The storages are held until `close()`, so that an address cannot be reused by another
    storage and miscounted. The module being run when a tensor is saved gives its kind
    (attention, MLP, norm, LoRA: by the HF module names both sides share) and its decoder layer.
    A decoder layer whose forward saved nothing while grad was on runs under activation
    checkpointing: what the checkpoint keeps are its tensor inputs, counted as
    "checkpointed inputs".
    """

    LAYER = re.compile(r"(?:^|\.)layers\.(\d+)$")

    def __init__(self, model: nn.Module) -> None:
        self.names = {id(m): n for n, m in model.named_modules()}
        self.lora_modules = {id(m) for m in model.modules() if hasattr(m, "adapter_params")}
        self.excluded = {_storage_key(t) for t in [*model.parameters(), *model.buffers()] for t in _plain_tensors(t)}
        self.stack: list[tuple[int, list, nn.Module]] = []  # (module id, its tensor inputs, module)
        self.saved: dict[tuple, tuple[int, str, int | None]] = {}  # key -> (bytes, kind, layer)
        self.held: list[torch.Tensor] = []
        self.store: list[torch.Tensor] = []  # what the graph saved, by the number it holds instead
        self._layer_saves: dict[int, int] = {}

    def _is_live_parameter(self, t: torch.Tensor) -> bool:
        """A weight of the running module: FSDP2 swaps the gathered (unsharded) weights in for the
        forward as plain tensors, which are not the parameters this meter saw at the start."""
        if not self.stack:
            return False
        key = _storage_key(t)
        for p in self.stack[-1][2].parameters():
            try:
                if _storage_key(p) == key:
                    return True
            except RuntimeError:  # a resharded FSDP2 parameter has no storage now
                continue
        return False

    # attribution --------------------------------------------------------------------------
    def _where(self, t: torch.Tensor) -> tuple[str, int | None]:
        names = [self.names.get(mid, "") for mid, _, _ in self.stack]
        layer = None
        for n in reversed(names):
            m = self.LAYER.search(n.replace("._checkpoint_wrapped_module", ""))
            if m:
                layer = int(m.group(1))
                break
        key = _storage_key(t)
        for mid, inputs, _ in reversed(self.stack):
            n = self.names.get(mid, "")
            leaf = n.rsplit(".", 1)[-1]
            if ".lora_" in f".{n}" or mid in self.lora_modules and key not in {_storage_key(i) for i in inputs}:
                return "lora", layer
            if "rotary" in leaf:
                return "rope", layer
            if leaf.endswith("norm"):
                return "norm", layer
            if leaf in ("self_attn", "attn", "attention"):
                return "attention", layer
            if leaf in ("mlp", "feed_forward"):
                return "mlp", layer
            if leaf in ("embed_tokens",):
                return "embeddings", layer
            if layer is not None and self.LAYER.search(n):
                return "other", layer
        return ("head+loss" if layer is None else "other"), layer

    def _pack(self, t: torch.Tensor) -> int:
        # The graph gets a number, not the tensor: a pack hook that returns a saved output makes a
        # cycle (tensor -> grad_fn -> saved tensor) that no garbage collection breaks.
        self.store.append(t)
        if not (isinstance(t, nn.Parameter) or self._is_live_parameter(t)):
            self._count(t)
        return len(self.store) - 1

    def _unpack(self, key: int) -> torch.Tensor:
        return self.store[key]

    def _count(self, t: torch.Tensor) -> None:
        for part in _plain_tensors(t):
            key = _storage_key(part)
            if key in self.excluded or key in self.saved:
                continue
            top = self.stack[-1] if self.stack else None
            m = self.LAYER.search(self.names.get(top[0], "")) if top else None
            if m and key in {_storage_key(i) for i in top[1]}:
                # A layer's own input saved in the layer's frame, not by an op inside it: what
                # non-reentrant checkpointing keeps to recompute the layer.
                self.saved[key] = (part.untyped_storage().nbytes(), "checkpointed inputs", int(m.group(1)))
                self.held.append(part)
                continue
            kind, layer = self._where(part)
            self.saved[key] = (part.untyped_storage().nbytes(), kind, layer)
            self.held.append(part)
            if layer is not None:
                self._layer_saves[layer] = self._layer_saves.get(layer, 0) + 1

    def _pre(self, module, args):
        inputs = [a for a in args if torch.is_tensor(a)]
        inputs += [t for a in args if isinstance(a, (tuple, list)) for t in a if torch.is_tensor(t)]
        self.stack.append((id(module), inputs, module))
        n = self.names.get(id(module), "")
        m = self.LAYER.search(n)
        if m and torch.is_grad_enabled():
            self._layer_saves.setdefault(int(m.group(1)), 0)

    def _post(self, module, args, *rest):
        mid, inputs, _ = self.stack.pop() if self.stack else (None, [], None)
        n = self.names.get(id(module), "")
        m = self.LAYER.search(n)
        if m and torch.is_grad_enabled() and self._layer_saves.get(int(m.group(1)), 0) == 0:
            # Nothing saved inside: its activations are recomputed in backward from these inputs,
            # which the checkpoint keeps (it may have saved them before the layer's own frame:
            # they are attributed to the layer here).
            layer = int(m.group(1))
            for t in inputs:
                if t.requires_grad or t.grad_fn is not None:
                    for part in _plain_tensors(t):
                        key = _storage_key(part)
                        if key not in self.excluded:
                            if key not in self.saved:
                                self.held.append(part)
                            self.saved[key] = (part.untyped_storage().nbytes(), "checkpointed inputs", layer)

    @contextlib.contextmanager
    def measure(self) -> Iterator[SavedTensorMeter]:
        from torch.nn.modules import module as module_mod

        pre = module_mod.register_module_forward_pre_hook(lambda m, a: self._pre(m, a))
        post = module_mod.register_module_forward_hook(lambda m, a, o: self._post(m, a, o))
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            pre.remove()
            post.remove()

    def close(self) -> None:
        """Drop the meter's references: call it after the backward (the graph reads `store`)."""
        self.held.clear()
        self.store.clear()

    # results -------------------------------------------------------------------------------
    @property
    def total(self) -> int:
        return sum(b for b, _, _ in self.saved.values())

    def by_kind(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for b, kind, _ in self.saved.values():
            out[kind] += b
        return dict(out)

    def by_layer_kind(self) -> dict[int | None, dict[str, int]]:
        out: dict = defaultdict(lambda: defaultdict(int))
        for b, kind, layer in self.saved.values():
            out[layer][kind] += b
        return {k: dict(v) for k, v in out.items()}


def measure_saved(side: Side, batch: dict, feats: torch.Tensor) -> tuple[SavedTensorMeter, dict]:
    """One step with the meter on; returns the meter and the CPU peak (saved + state) in bytes."""
    meter = SavedTensorMeter(side.model)
    with meter.measure():
        loss = side.loss(batch, feats)
    loss.backward()
    side.optimizer.step()
    side.optimizer.zero_grad(set_to_none=True)
    feats.grad = None
    meter.close()
    state = state_bytes(side)
    peak = {"saved_bytes": meter.total, **{f"{k}_bytes": v for k, v in state.items()}}
    peak["peak_bytes"] = meter.total + sum(state.values())
    return meter, peak


def private_bytes(side: Side, other: Side) -> int:
    """What `side` holds that `other` does not share (its own parameters and optimizer state)."""
    mine = {_storage_key(p): p for t in side.model.parameters() for p in _plain_tensors(t)}
    theirs = {_storage_key(p) for t in other.model.parameters() for p in _plain_tensors(t)}
    own = [p for k, p in mine.items() if k not in theirs]
    optimizer = [v for s in side.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return tensor_bytes(own + optimizer)


def saved_bytes_by_op(loss: torch.Tensor, exclude: set) -> dict[str, int]:
    """Bytes saved for backward by each autograd node type, from the graph of `loss` (each storage once)."""
    seen: set = set(exclude)
    out: dict[str, int] = defaultdict(int)
    stack, visited = [loss.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        name = type(node).__name__
        for attr in dir(node):
            if not attr.startswith("_saved_") and attr != "saved_tensors":
                continue
            try:
                value = getattr(node, attr)
            except RuntimeError:  # already freed, or not a tensor slot
                continue
            for t in value if isinstance(value, (tuple, list)) else [value]:
                if torch.is_tensor(t):
                    for part in _plain_tensors(t):
                        key = _storage_key(part)
                        if key not in seen:
                            seen.add(key)
                            out[name] += part.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return dict(out)


# --------------------------------------------------------------------------- FLOPs and devices

def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The GPU's dense tensor-core peak (the trainer's table), None on the CPU or an unknown GPU."""
    from pefomed.engine import trainer

    table = getattr(trainer, "peak_flops", None)
    peak = table(device, dtype) if table is not None else None
    return None if peak is None else peak / 1e12


def step_flops(config, case: StepCase, batch: dict) -> float:
    """The FLOPs one step needs: frozen linears forward + dX, LoRA forward + backward, causal
    attention forward + backward, the head (forward + dX) on the target rows only."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
              "o_proj": (q, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
              "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size)}  # fmt: skip
    tokens = int(batch["attention_mask"].sum())
    frozen = sum(i * o for i, o in shapes.values())
    lora = sum(case.r * (i + o) for n, (i, o) in shapes.items() if n in case.targets)
    per_token = 4 * frozen + 6 * lora  # 2 forward + 2 dX; LoRA 2 forward + 4 (dA, dB and its dX)
    lengths = batch["attention_mask"].sum(1).tolist()
    # QK^T and PV over the causal half: 2 * 2 * T^2/2 * heads * head_dim forward, twice that backward
    attention = sum(3 * 2 * t * t * c.num_attention_heads * c.head_dim for t in lengths)
    targets = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    head = 4 * targets * c.hidden_size * c.vocab_size
    return c.num_hidden_layers * (tokens * per_token + attention) + head


# --------------------------------------------------------------------------- timing


class Clock:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self, fn: Callable[[], object]) -> float:
        """Milliseconds of one call."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3


def quantiles(values: list[float]) -> dict:
    ordered = sorted(values)

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

    return {"median_ms": statistics.median(ordered), "p20_ms": at(0.2), "p80_ms": at(0.8), "runs_ms": values}


def cuda_peak(side: Side, other: Side, batch: dict, feats: torch.Tensor) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    side.step(batch, feats)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - private_bytes(other, side)


@dataclass
class RunOptions:
    case: StepCase
    dtype: torch.dtype
    device: torch.device
    batch_size: int
    ac: bool
    warmup: int
    reps: int
    n_batches: int
    seed: int
    profile: bool = False
    fp64: bool = False


def measure_depth(folder: Path, opts: RunOptions, parity: dict | None) -> dict:
    """Build both sides from `folder`, check parity (CPU / fp32), time and weigh one step each."""
    from pefomed.models.llama import LlamaConfig

    config = LlamaConfig.from_hf(folder)
    ours, hf = build_pair(folder, opts.case, opts.dtype, opts.device, opts.ac, opts.seed)
    sides = [ours, hf]
    scale = float(ours.embed.weight.float().std())
    batches = [make_batch(opts.case, opts.batch_size, config.vocab_size, opts.seed + i) for i in range(opts.n_batches)]
    batches = [{k: v.to(opts.device) for k, v in b.items()} for b in batches]
    feats = [image_embeddings(b, config.hidden_size, scale, opts.seed + i, opts.device, opts.dtype)
             for i, b in enumerate(batches)]  # fmt: skip
    if parity is None:
        parity = check_parity(ours, hf, batches[0], feats[0], opts.seed)
    if not parity["passed"]:
        raise RuntimeError(f"ours and HF+PEFT disagree beyond {PARITY_RTOL:g}: {json.dumps(parity)}")

    clock = Clock(opts.device)
    losses: dict[str, list[float]] = {s.name: [] for s in sides}
    times: dict[str, list[float]] = {s.name: [] for s in sides}
    for rep in range(opts.warmup + opts.reps):
        order = sides if rep % 2 == 0 else sides[::-1]
        i = rep % len(batches)
        for side in order:
            torch.manual_seed(opts.seed + rep)  # the same dropout stream for both, step by step
            box = []
            ms = clock(lambda side=side: box.append(side.step(batches[i], feats[i])))
            if rep >= opts.warmup:
                times[side.name].append(ms)
                losses[side.name].append(float(box[0]))

    stats = batch_stats(batches[0])
    flops = statistics.mean(step_flops(config, opts.case, b) for b in batches)
    tokens = statistics.mean(batch_stats(b)["real_tokens"] for b in batches)
    out: dict = {"layers": config.num_hidden_layers, "batch": stats, "model_flops_per_step": flops}
    peak_flops = peak_tflops(opts.device, opts.dtype)
    for side, other in ((ours, hf), (hf, ours)):
        row = quantiles(times[side.name])
        row["tokens_per_s"] = tokens / (row["median_ms"] / 1e3)
        row["tflops"] = flops / (row["median_ms"] / 1e3) / 1e12
        row["mfu"] = row["tflops"] / peak_flops if peak_flops else None
        row["mean_loss"] = statistics.mean(losses[side.name])
        meter, cpu_peak = measure_saved(side, batches[0], feats[0])
        row.update(cpu_peak)
        row["saved_by_kind"] = meter.by_kind()
        if opts.device.type == "cuda":
            row["peak_bytes"] = cuda_peak(side, other, batches[0], feats[0])
            row["peak_how"] = "torch.cuda.max_memory_allocated minus the other side's private bytes"
        else:
            row["peak_how"] = "saved-for-backward bytes + parameters + gradients + optimizer state"
        row["notes"] = side.notes
        out[side.name] = row
    out["ratios"] = ratios(out["ours"], out["hf+peft"])
    if opts.profile:
        out["profile"] = {s.name: profile_step(s, batches[0], feats[0]) for s in sides}
    if opts.fp64 and opts.dtype == torch.float32 and not opts.ac:
        # A fresh pair: the timed steps have moved the two sides' adapters apart (their dropout
        # masks differ). Checkpointing changes no value, so the plain run's reference is enough.
        del ours, hf, sides
        _free(opts.device)
        fresh = build_pair(folder, opts.case, opts.dtype, opts.device, opts.ac, opts.seed)
        out["fp64_reference"] = fp64_reference(*fresh, batches[0], feats[0], opts.seed)
        del fresh
    out["parity"] = parity
    ours = hf = sides = None  # noqa: F841 (so that _free can release the pair)
    _free(opts.device)
    return out


def ratios(ours: dict, hf: dict) -> dict:
    return {
        "speedup": hf["median_ms"] / ours["median_ms"],
        "saved_bytes": ours["saved_bytes"] / hf["saved_bytes"],
        "peak_bytes": ours["peak_bytes"] / hf["peak_bytes"],
        "loss_rel_diff": abs(ours["mean_loss"] - hf["mean_loss"]) / abs(hf["mean_loss"]),
    }


def profile_step(side: Side, batch: dict, feats: torch.Tensor, top: int = 15) -> dict:
    """Self time by op (torch.profiler) and bytes saved for backward by autograd node, one step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if feats.is_cuda else [])
    with profile(activities=activities) as prof:
        side.step(batch, feats)
    key = "self_cuda_time_total" if feats.is_cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events) or 1
    by_time = [{"op": e.key, "self_ms": getattr(e, key) / 1e3, "share": getattr(e, key) / total, "calls": e.count}
               for e in events[:top]]  # fmt: skip
    exclude = {_storage_key(p) for t in side.model.parameters() for p in _plain_tensors(t)}
    loss = side.loss(batch, feats)
    by_op = saved_bytes_by_op(loss, exclude)
    loss.backward()
    side.optimizer.zero_grad(set_to_none=True)
    feats.grad = None
    ranked = sorted(by_op.items(), key=lambda kv: kv[1], reverse=True)
    return {"self_time_by_op": by_time, "saved_bytes_by_node": dict(ranked[:top]), "saved_total": sum(by_op.values())}


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif sys.platform.startswith("linux"):
        # glibc keeps freed activations in its arenas; give them back so that a long CPU run
        # (several model pairs one after the other) holds one pair's memory, not all of them.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares a + b*x (exact through two points)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    return my - b * mx, b


FIT_FIELDS = ("median_ms", "peak_bytes", "saved_bytes")


def extrapolate(depths: list[dict], full_layers: int) -> dict:
    """time / memory = a + b * layers for each side, evaluated at the full depth."""
    xs = [d["layers"] for d in depths]
    out: dict = {"layers": full_layers, "measured_at": xs}
    for side in ("ours", "hf+peft"):
        row = {}
        for f in FIT_FIELDS:
            a, b = fit_line(xs, [d[side][f] for d in depths])
            row[f] = a + b * full_layers
            row[f"{f}_fit"] = {"a": a, "b_per_layer": b}
        flops_a, flops_b = fit_line(xs, [d["model_flops_per_step"] for d in depths])
        flops = flops_a + flops_b * full_layers
        row["tokens_per_s"] = depths[-1][side]["tokens_per_s"] * depths[-1][side]["median_ms"] / row["median_ms"]
        row["tflops"] = flops / (row["median_ms"] / 1e3) / 1e12
        mfu = depths[-1][side].get("mfu")
        row["mfu"] = None if mfu is None else row["tflops"] / (depths[-1][side]["tflops"] / mfu)
        out[side] = row
    out["ratios"] = {
        "speedup": out["hf+peft"]["median_ms"] / out["ours"]["median_ms"],
        "saved_bytes": out["ours"]["saved_bytes"] / out["hf+peft"]["saved_bytes"],
        "peak_bytes": out["ours"]["peak_bytes"] / out["hf+peft"]["peak_bytes"],
    }
    return out


# --------------------------------------------------------------------------- runs


def run_case(model: str, opts: RunOptions, layers: int | None, scratch: Path) -> dict:
    from pefomed.models.llama import CONFIGS, LlamaConfig

    if Path(model).is_dir():
        base = LlamaConfig.from_hf(model)
    elif model == CPU_MODEL:
        model = str(smollm2_folder())
        base = LlamaConfig.from_hf(model)
    elif model in CONFIGS:
        base = CONFIGS[model]
    else:
        raise UserError(f"--model {model}: not a model folder, 'smollm2', nor a config in models.llama.CONFIGS "
                        f"({', '.join(CONFIGS)})")  # fmt: skip
    full = base.num_hidden_layers
    if layers is not None and not 1 <= layers <= full:
        raise UserError(f"--layers {layers}: must be between 1 and the model's {full} layers")
    if layers is not None and layers < 2:
        raise UserError(f"--layers {layers}: the fit needs two depths, N/2 and N; give N >= 2")
    depths = [layers // 2, layers] if layers else [full]
    record: dict = {"model": model, "case": opts.case.name, "seed": opts.case.seed, "full_layers": full,
                    "ac": "full" if opts.ac else "none", "dtype": str(opts.dtype).removeprefix("torch."),
                    "lora": {"r": opts.case.r, "alpha": opts.case.alpha, "dropout": opts.case.dropout,
                             "targets": list(opts.case.targets), "init": opts.case.init, "qlora": opts.case.qlora},
                    "depths": []}  # fmt: skip
    parity = None
    for depth in depths:
        folder = _folder_at(model, depth, full, opts.dtype, scratch, opts.device)
        if opts.dtype != torch.float32 and parity is None:
            fp32 = dataclasses.replace(opts, dtype=torch.float32)
            parity = parity_only(_folder_at(model, depth, full, torch.float32, scratch, opts.device), fp32)
        logger.info("%s %s: %d layers, ac=%s", model, opts.case.name, depth, record["ac"])
        result = measure_depth(folder, opts, parity)
        parity = result["parity"]
        record["depths"].append(result)
    record["parity"] = parity
    if len(depths) > 1:
        record["extrapolated"] = extrapolate(record["depths"], full)
    return record


def parity_only(folder: Path, opts: RunOptions) -> dict:
    from pefomed.models.llama import LlamaConfig

    config = LlamaConfig.from_hf(folder)
    ours, hf = build_pair(folder, opts.case, opts.dtype, opts.device, opts.ac, opts.seed)
    batch = {k: v.to(opts.device) for k, v in make_batch(opts.case, opts.batch_size, config.vocab_size, opts.seed).items()}
    feats = image_embeddings(batch, config.hidden_size, float(ours.embed.weight.float().std()), opts.seed, opts.device,
                             opts.dtype)  # fmt: skip
    result = check_parity(ours, hf, batch, feats, opts.seed)
    del ours, hf
    _free(opts.device)
    return result


def _folder_at(model: str, depth: int, full: int, dtype: torch.dtype, scratch: Path, device: torch.device) -> Path:
    if Path(model).is_dir():
        if depth == full:
            return Path(model)
        return truncated_folder(Path(model), depth, scratch)
    return random_model_folder(model, depth, dtype, scratch, "cuda" if device.type == "cuda" else "cpu")


def truncated_folder(folder: Path, layers: int, scratch: Path) -> Path:
    """The first `layers` decoder layers of a model folder (the same weights), for depth fits."""
    from safetensors.torch import save_file

    from pefomed.models.loading import iter_state_dict

    out = scratch / f"{folder.name}-{layers}l"
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    config = json.loads((folder / "config.json").read_text())
    config["num_hidden_layers"] = layers
    keep = {}
    for key, t in iter_state_dict(folder):
        m = re.search(r"\blayers\.(\d+)\.", key)
        if m is None or int(m.group(1)) < layers:
            keep[key] = t.contiguous()
    (out / "config.json").write_text(json.dumps(config))
    save_file(keep, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# --------------------------------------------------------------------------- targets and report


def _target(name: str, value: float | None, ok: bool | None, unit: str = "") -> dict:
    status = "not measured" if value is None else ("PASS" if ok else "MISS")
    return {"target": name, "value": value, "unit": unit, "status": status}


def evaluate_targets(runs: list[dict]) -> list[dict]:
    """Issue 9 section 4's CPU targets, from the runs that match their conditions (never asserted)."""

    def find(ac: str) -> dict | None:
        for r in runs:
            d = r["depths"][-1]
            if (r["case"] == "pefomed-vqa" and r["ac"] == ac and r["dtype"] == "float32" and "smollm2" in r["model"]
                    and d["layers"] == r["full_layers"] and d["batch"]["batch_size"] == 4):  # fmt: skip
                return d
        return None

    plain, ac = find("none"), find("full")
    speed = plain["ratios"]["speedup"] if plain else None
    saved = plain["ratios"]["saved_bytes"] if plain else None
    loss = plain["parity"]["loss_rel_err"] if plain else None
    peak = ac["ratios"]["peak_bytes"] if ac else None
    where = "SmolLM2, B=4, PeFoMed-like, r=64 q,v, p=0.05, fp32"
    return [
        _target(f"step speed >= 1.5x HF+PEFT ({where}, no checkpointing)", speed, speed is not None and speed >= 1.5, "x"),
        _target("saved-for-backward bytes <= 0.5x HF+PEFT's (same run)", saved, saved is not None and saved <= 0.5, "x"),
        _target("the same loss (fp32, dropout off, relative)", loss, loss is not None and loss <= PARITY_RTOL, ""),
        _target(f"peak <= 0.6x HF+PEFT's with full activation checkpointing on both ({where})", peak,
                peak is not None and peak <= 0.6, "x"),  # fmt: skip
    ]


def _mib(b: float | None) -> str:
    return "-" if b is None else f"{b / 2**20:,.1f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def markdown(result: dict) -> str:
    lines = [f"# Training step: ours vs HF+PEFT ({result['device']})", "",
             f"- date: {result['date']}", f"- command: `{result['command']}`",
             f"- torch {result['versions']['torch']}, transformers {result['versions']['transformers']}, "
             f"peft {result['versions']['peft']}", f"- timing: {result['timing']}",
             f"- peak memory: {result['peak_how']}", ""]  # fmt: skip
    lines += ["| case | model | layers | AC | B x T (real tok) | side | median ms (p20-p80) | tokens/s | MFU | saved MiB "
              "| peak MiB | speedup | saved ratio | peak ratio |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in result["runs"]:
        rows = [(d, str(d["layers"])) for d in run["depths"]]
        if "extrapolated" in run:
            rows.append((run["extrapolated"], f"{run['full_layers']} (fit)"))
        for d, label in rows:
            b = run["depths"][-1]["batch"]
            for side in ("ours", "hf+peft"):
                s = d[side]
                spread = f" ({s['p20_ms']:.0f}-{s['p80_ms']:.0f})" if "p20_ms" in s else ""
                r = d["ratios"]
                ratio_cells = (f"{r['speedup']:.2f}x | {r['saved_bytes']:.2f} | {r['peak_bytes']:.2f}"
                               if side == "ours" else " | | ")  # fmt: skip
                lines.append(
                    f"| {run['case']} | {Path(run['model']).name} | {label} | {run['ac']} | {b['batch_size']} x "
                    f"{b['seq_len']} ({b['real_tokens']}) | {side} | {s['median_ms']:.1f}{spread} | "
                    f"{s['tokens_per_s']:,.0f} | {_pct(s.get('mfu'))} | {_mib(s.get('saved_bytes'))} | "
                    f"{_mib(s.get('peak_bytes'))} | {ratio_cells} |"
                )
    lines += ["", "## Parity (one step, fp32, LoRA dropout off)", "",
              "| case | AC | loss ours | loss HF | loss rel err | adapter grads rel err (all) | worst adapter tensor "
              "| image-embedding grad rel err |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for run in result["runs"]:
        p = run["parity"]
        lines.append(f"| {run['case']} | {run['ac']} | {p['loss_ours']:.6f} | {p['loss_hf']:.6f} | {p['loss_rel_err']:.1e} "
                     f"| {p['adapter_grad_rel_err']:.1e} | {p['adapter_grad_max_tensor_rel_err']:.1e} "
                     f"| {p['image_embedding_grad_rel_err']:.1e} |")  # fmt: skip
    refs = [(run, run["depths"][-1]["fp64_reference"]) for run in result["runs"] if "fp64_reference" in run["depths"][-1]]
    if refs:
        lines += ["", "## Against HF+PEFT in float64 (one step, dropout off)", "",
                  "| case | AC | side (fp32) | loss rel err | adapter grads rel err (all) | worst adapter tensor "
                  "| image-embedding grad rel err |", "|---|---|---|---|---|---|---|"]  # fmt: skip
        for run, ref in refs:
            for side, r in ref.items():
                lines.append(f"| {run['case']} | {run['ac']} | {side} | {r['loss_rel_err']:.1e} | "
                             f"{r['adapter_grad_rel_err']:.1e} | {r['adapter_grad_max_tensor_rel_err']:.1e} | "
                             f"{r['image_embedding_grad_rel_err']:.1e} |")  # fmt: skip
    lines += ["", "## Saved for backward by kind (MiB, deepest measured depth)", ""]
    kinds = [k for k in KINDS if any(d.get(s, {}).get("saved_by_kind", {}).get(k) for r in result["runs"]
                                     for d in r["depths"][-1:] for s in ("ours", "hf+peft"))]  # fmt: skip
    lines += ["| case | AC | side | " + " | ".join(kinds) + " |", "|---|---|---|" + "---|" * len(kinds)]
    for run in result["runs"]:
        d = run["depths"][-1]
        for side in ("ours", "hf+peft"):
            by = d[side]["saved_by_kind"]
            lines.append(f"| {run['case']} | {run['ac']} | {side} | " + " | ".join(_mib(by.get(k, 0)) for k in kinds) + " |")
    if result["targets"]:
        lines += ["", "## Targets (issue 9, section 4, CPU part)", ""]
        for t in result["targets"]:
            value = "-" if t["value"] is None else f"{t['value']:.3g}{t['unit']}"
            lines.append(f"- **{t['status']}** {t['target']}: {value}")
    for run in result["runs"]:
        prof = run["depths"][-1].get("profile")
        if not prof:
            continue
        lines += ["", f"## Profile: {run['case']}, AC {run['ac']} (one step)", ""]
        for side, p in prof.items():
            lines += [f"### {side}: self time by op", "", "| op | self ms | share | calls |", "|---|---|---|---|"]
            lines += [f"| `{e['op']}` | {e['self_ms']:.1f} | {_pct(e['share'])} | {e['calls']} |" for e in p["self_time_by_op"]]
            lines += ["", f"### {side}: saved for backward by autograd node (total {_mib(p['saved_total'])} MiB)", "",
                      "| node | MiB |", "|---|---|"]  # fmt: skip
            lines += [f"| `{k}` | {_mib(v)} |" for k, v in p["saved_bytes_by_node"].items()]
            lines.append("")
    return "\n".join(lines) + "\n"


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, times, peaks = [], {"ours": [], "hf+peft": []}, {"ours": [], "hf+peft": []}
    for run in result["runs"]:
        d = run.get("extrapolated") or run["depths"][-1]
        labels.append(f"{run['case']}\n{Path(run['model']).name}, AC {run['ac']}")
        for side in times:
            times[side].append(d[side]["median_ms"])
            peaks[side].append(d[side]["peak_bytes"] / 2**30)
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 3 * len(labels)), 4.5))
    x = range(len(labels))
    for ax, values, title in ((axes[0], times, "step time (ms)"), (axes[1], peaks, "peak memory (GiB)")):
        for j, (side, color) in enumerate((("ours", "tab:blue"), ("hf+peft", "tab:gray"))):
            ax.bar([i + (j - 0.5) * 0.38 for i in x], values[side], width=0.38, label=side, color=color)
        ax.set_xticks(list(x), labels, fontsize=7)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"{result['device']}, {result['date'][:10]}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def versions() -> dict:
    import peft
    import transformers

    out = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}
    try:
        import bitsandbytes

        out["bitsandbytes"] = bitsandbytes.__version__
    except Exception:  # noqa: BLE001 (a missing CUDA library raises more than ImportError)
        out["bitsandbytes"] = None
    return out


def write_outputs(result: dict, out_dir: Path, stem: str) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    _atomic_write(paths["json"], json.dumps(result, indent=2) + "\n")
    _atomic_write(paths["md"], markdown(result))
    chart(result, paths["png"])
    return paths


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="pefomed bench step", description=__doc__.splitlines()[0])
    parser.add_argument("--case", default=None, help=f"one of {', '.join(CASES)} or 'all' "
                        "(default: pefomed-vqa on the CPU, all on CUDA)")  # fmt: skip
    parser.add_argument("--model", help="model folder, 'smollm2', or a models.llama config name with random weights "
                        "(default: smollm2 on the CPU, each case's seed LLM on CUDA)")  # fmt: skip
    parser.add_argument("--layers", type=int, help="measure at N/2 and N layers and extrapolate to the full depth")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--ac", choices=("none", "full", "both"), default="none", help="activation checkpointing, both sides")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: float32 on the CPU, bfloat16 on CUDA")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batches", type=int, default=2, help="distinct batches, cycled")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="add a torch.profiler table and saved bytes by op")
    parser.add_argument("--fp64-reference", action="store_true",
                        help="also compare both sides' fp32 gradients with HF+PEFT's in float64 (fp32 runs)")  # fmt: skip
    parser.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--scratch", help="where random-weight model folders go (default: a temporary folder)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    case_arg = args.case or ("all" if device.type == "cuda" else "pefomed-vqa")
    names = list(CASES) if case_arg == "all" else case_arg.split(",")
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"--case {','.join(unknown)}: choose from {', '.join(CASES)} or all")
    for name, value in (("--batch-size", args.batch_size), ("--reps", args.reps), ("--batches", args.batches)):
        if value < 1:
            parser.error(f"{name} {value}: must be at least 1")
    ac_modes = {"none": [False], "full": [True], "both": [False, True]}[args.ac]

    with contextlib.ExitStack() as stack:
        scratch = Path(args.scratch) if args.scratch else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-step-")))
        runs = []
        for name in names:
            case = CASES[name]
            model = args.model or (case.llm if device.type == "cuda" else CPU_MODEL)
            for ac in ac_modes:
                opts = RunOptions(case, dtype, device, args.batch_size, ac, args.warmup, args.reps, args.batches,
                                  args.seed, args.profile, args.fp64_reference)  # fmt: skip
                runs.append(run_case(model, opts, args.layers, scratch))
    now = datetime.datetime.now(datetime.UTC)
    command = "python -m pefomed.bench.step " + shlex.join(sys.argv[1:] if argv is None else argv)
    if os.environ.get("OMP_NUM_THREADS"):  # the thread count changes the figures: say how it was set
        command = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} {command}"
    result = {
        "device": device_name(device),
        "date": now.isoformat(timespec="seconds"),
        "command": command.strip(),
        "versions": versions(),
        "timing": ("CUDA events" if device.type == "cuda" else "time.perf_counter")
        + f", {args.warmup} warm-up + {args.reps} interleaved repetitions per side",
        "peak_how": runs[0]["depths"][0]["ours"]["peak_how"] if runs else "",
        "runs": runs,
        "targets": evaluate_targets(runs) if device.type == "cpu" else [],
    }
    print(markdown(result))
    if not args.no_write:
        stem = f"step-{device.type}-{now.strftime('%Y%m%d-%H%M%S')}"
        paths = write_outputs(result, Path(args.out_dir), stem)
        result["written"] = {k: str(v) for k, v in paths.items()}
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
