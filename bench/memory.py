"""Where a run's GPU memory goes, and whether a recipe fits its hardware.

    python -m pefomed.bench.memory --config configs/pefomed_stage1.yaml
    pefomed bench memory --config configs/pefomed_stage1.yaml --strategy fsdp2 --gpus 4 --gpu-mem 48GB
    pefomed bench memory --config X --strategy all --gpus 2 --gpu-mem 40GB --global-batch 128 [key=value ...]

For a run config it reports, for ours and for HF+PEFT side by side:

- frozen weights: the LLM (bf16, or NF4 under `model.quantize_llm: nf4`), the vision tower and
  the connector's frozen parts;
- the trained parameters (adapters and connector), their gradients and AdamW's state;
- activations: per decoder layer by kind (attention, MLP, norms, LoRA, what activation
  checkpointing keeps), the head and the loss (logits), and the connector's (ViT features);
- per GPU, for each strategy (single, ddp, fsdp2, DeepSpeed ZeRO-2 and ZeRO-3) and each
  activation-checkpointing mode (none, full): parameters, gradients, optimizer state, gathered
  parameters and buffers, activations, the backward's working set, the total, and whether it
  fits `--gpu-mem` (and, if not, the micro-batch that does).

How the figures are obtained. The LLM is built twice per side, at 1 and 2 decoder layers, with
random weights at the config's real width and dtype (a model folder written for the purpose;
both sides load it as users do), and one forward of a fixed-length batch at micro-batch 1 and 2
is run with every tensor saved for backward counted by storage
(`bench.step.SavedTensorMeter`; on CUDA also `torch.cuda.memory` snapshots, written next to the
report). Every quantity is then fitted exactly as `c0 + c1*L + c2*B + c3*L*B` and evaluated at the
full depth and the run's micro-batch. Parameters and their gradients and optimizer state are
counted from the built modules (the vision tower and connector on the meta device, from
`engine.build.build_model`); the connector's activations are measured by running it on random
features of the vision tower's output shape. Strategies transform these per-rank figures; their
assumptions are printed in the report.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import re
import shlex
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pefomed.bench import step as stepbench
from pefomed.errors import UserError, run_cli

logger = logging.getLogger(__name__)

STRATEGIES = ("single", "ddp", "fsdp2", "zero2", "zero3")
AC_MODES = ("none", "full")
SIDES = ("ours", "hf+peft")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GIB = 2**30
CUDA_CONTEXT_BYTES = GIB  # the CUDA context and cuBLAS workspaces, outside max_memory_allocated
ALLOCATOR_SLACK = 0.05  # fragmentation in the caching allocator
# Folder names that users give for the seeds' LLMs, when the folder is not on this machine.
LLM_ALIASES = {
    "llama-2-7b": "llama2-7b", "llama-2-7b-hf": "llama2-7b", "llama-2-7b-chat": "llama2-7b-chat",
    "llama-2-7b-chat-hf": "llama2-7b-chat", "meta-llama-3-8b": "llama3-8b", "llama-3-8b": "llama3-8b",
    "meta-llama-3-8b-instruct": "llama3-8b-instruct", "llama-3-8b-instruct": "llama3-8b-instruct",
    "llama-3.1-8b": "llama3.1-8b", "meta-llama-3.1-8b": "llama3.1-8b", "mistral-7b-v0.1": "mistral-7b",
    "mistral-7b": "mistral-7b", "idefics2-8b": "idefics2-8b",
}  # fmt: skip


# --------------------------------------------------------------------------- the run's model


@dataclass
class Plan:
    """What the report is about: the resolved config and the shapes of one micro-batch."""

    cfg: object  # engine.config.Config, resolved so that it builds on this machine
    source: str
    notes: list[str]
    dtype: torch.dtype
    llm_config: object  # models.llama.LlamaConfig at full depth
    seq_len: int
    image_tokens: int
    answer_tokens: int
    micro_batch: int


def resolve(cfg, source: str, llm: str | None) -> tuple[object, list[str]]:
    """A copy of `cfg` whose LLM builds here: its folder, or the named config its folder stands for."""
    from pefomed.models import idefics2, llama

    m = cfg.model
    notes: list[str] = []
    names = idefics2.CONFIGS if m.arch == "idefics2" else llama.CONFIGS
    chosen = llm
    if chosen is None and not m.random_init and not Path(m.llm).is_dir():
        base = Path(m.llm).name.lower()
        chosen = LLM_ALIASES.get(base) or LLM_ALIASES.get(base.removesuffix("-hf"))
        if chosen is None:
            raise UserError(
                f"{source}: model.llm={m.llm} is not a folder on this machine and its name matches no known "
                f"config; pass --llm with one of {', '.join(names)}"
            )
        notes.append(f"model.llm={m.llm} is not on this machine: its published shapes ({chosen}) are used")
    if chosen is not None:
        if chosen not in names:
            raise UserError(f"--llm {chosen}: expected one of {', '.join(names)} for model.arch={m.arch}")
        m = dataclasses.replace(m, llm=chosen, random_init=True, llm_overrides={}, adapter_checkpoint=None,
                                projection_checkpoint=None, vision_checkpoint=None)  # fmt: skip
    return dataclasses.replace(cfg, model=m), notes


def text_config(cfg):
    from pefomed.engine import build

    if cfg.model.arch == "idefics2":
        return build.idefics2_config(cfg).text
    return build.llm_config(cfg)


def lora_case(cfg) -> stepbench.StepCase:
    """The adapters of the LLM as a bench.step case (LLM targets only; "all-linear" expanded)."""
    lora = cfg.lora
    targets = stepbench.ALL_LINEAR if "all-linear" in lora.target_modules else tuple(
        t for t in lora.target_modules if t in stepbench.ALL_LINEAR)  # fmt: skip
    if not lora.enabled or not targets:
        raise UserError("lora.enabled=false or no LLM projection in lora.target_modules: this report compares "
                        "adapter training, enable LoRA on the LLM")  # fmt: skip
    return stepbench.StepCase("run", "run config", "", 0, 0, 0, (0, 0), (0, 0), r=lora.r, alpha=lora.alpha,
                              dropout=lora.dropout, targets=targets, init=lora.init,
                              qlora=cfg.model.quantize_llm == "nf4")  # fmt: skip


def fixed_batch(batch: int, seq_len: int, image_tokens: int, answer_tokens: int, vocab: int, seed: int) -> dict:
    """`batch` samples of exactly `seq_len` tokens: the worst case a padded batch reaches."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(3, vocab - 1), vocab, (batch, seq_len), generator=g)
    labels = torch.full_like(ids, stepbench.IGNORE_INDEX)
    labels[:, seq_len - answer_tokens :] = ids[:, seq_len - answer_tokens :]
    image = torch.zeros(batch, seq_len, dtype=torch.bool)
    image[:, 1 : 1 + image_tokens] = True
    ids[image] = 0
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "image_token_mask": image}
    return stepbench.with_host_indices(batch)


# --------------------------------------------------------------------------- inventory (meta)


@dataclass
class Part:
    frozen_bytes: int = 0
    trainable_numel: int = 0
    frozen_numel: int = 0


def inventory(cfg) -> dict[str, Part]:
    """Vision tower and connector, counted on the meta device from the engine's own build."""
    from pefomed.engine.build import build_model
    from pefomed.engine.ops import torch_ops

    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize_llm="none"))
    with torch.device("meta"):
        model = build_model(plain, "meta", ops=torch_ops())
    parts = {"vision": Part(), "connector": Part()}
    for name, p in model.named_parameters():
        kind = _part_of(name, cfg.model.arch)
        if kind is None:
            continue
        part = parts[kind]
        if p.requires_grad:
            part.trainable_numel += p.numel()
        else:
            part.frozen_numel += p.numel()
            part.frozen_bytes += p.numel() * p.element_size()
    return parts


def _part_of(name: str, arch: str) -> str | None:
    if arch == "idefics2":
        if ".vision_model." in f".{name}":
            return "vision"
        if ".connector." in f".{name}":
            return "connector"
        return None
    if name.startswith(("vit.", "ln_vision.")):
        return "vision"
    if name.startswith("connector."):
        return "connector"
    return None


def connector_activations(cfg, dtype: torch.dtype) -> tuple[int, str]:
    """Bytes the connector saves for backward for one sample's images (measured on the CPU)."""
    from pefomed.engine.build import build_model, vision_config
    from pefomed.engine.ops import torch_ops

    plain = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, quantize_llm="none"))
    with torch.device("meta"):
        model = build_model(plain, "meta", ops=torch_ops())
    if cfg.model.arch == "idefics2":
        from pefomed.engine.build import idefics2_config

        config = idefics2_config(cfg)
        connector = model.llm.model.connector
        images = 5 if cfg.model.image_splitting else 1
        side = cfg.model.image_size // config.vision.patch_size
        shape = (images, side * side, config.vision.hidden_size)

        def run(feats: torch.Tensor) -> torch.Tensor:
            return connector(feats, None)

        how = f"Idefics2 connector on {images} image(s) of {side}x{side} SigLIP patches (the largest image side)"
    else:
        connector = model.connector
        v = vision_config(cfg)
        grid = v.image_size // v.patch_size
        shape = (1, grid * grid + 1, v.hidden_size)  # the ViT's output keeps its CLS row

        def run(feats: torch.Tensor) -> torch.Tensor:
            return connector(feats)

        how = f"{cfg.model.connector} connector on {shape[1]} x {shape[2]} vision features"
    connector.to_empty(device="cpu")
    with torch.no_grad():
        for p in connector.parameters():
            p.normal_(0, 0.02)
    meter = stepbench.SavedTensorMeter(connector)
    feats = torch.randn(shape, dtype=dtype)
    with meter.measure():
        out = run(feats)
    saved = meter.total
    meter.close()
    del out
    return saved, how


# --------------------------------------------------------------------------- measurement


def triton_lora_bytes(rows: int, k: int, n: int, r: int, dropout: float, x_dtype: torch.dtype,
                      adapter_dtype: torch.dtype = torch.float32) -> int:  # fmt: skip
    """What `kernels.lora.LoRALinearFunction` saves for backward besides its input and the frozen
    weight: the bit-packed dropout mask (ceil(K/8) bytes a row) and its seed, `xa` (rows x r,
    fp32), and the adapters cast to the activations' dtype (once per step).

    The CPU measures ours with `model.kernels: torch`, whose dropout keeps the dropped input and
    a byte mask; a run with `kernels: triton` keeps this instead (tests/bench/test_memory.py
    checks the formula against the kernel itself, in Triton's interpreter).
    """
    mask = rows * -(-k // 8) + 8 if dropout > 0 else 0
    casts = (r * k + n * r) * x_dtype.itemsize if adapter_dtype != x_dtype else 0
    return mask + rows * r * 4 + casts


def adapted_shapes(config, case: stepbench.StepCase) -> list[tuple[int, int]]:
    """(in, out) of each adapted projection of one decoder layer."""
    c = config
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {"q_proj": (c.hidden_size, q), "k_proj": (c.hidden_size, kv), "v_proj": (c.hidden_size, kv),
              "o_proj": (q, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
              "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size)}  # fmt: skip
    return [shapes[t] for t in case.targets]


@dataclass
class Point:
    layers: int
    batch: int
    saved: dict[str, int]  # by kind
    params: int
    trainable: int  # bytes of the trained parameters (fp32)
    layer_param_bytes: int = 0

    @property
    def activations(self) -> int:
        return sum(self.saved.values())


def measure_llm(plan: Plan, side_name: str, ac: bool, layers: int, batches: list[int], scratch: Path,
                device: torch.device, seed: int = 0) -> list[Point]:  # fmt: skip
    """Saved-for-backward bytes by kind of one forward at each micro-batch, at `layers` depth."""
    config = dataclasses.replace(plan.llm_config, num_hidden_layers=layers)
    folder = stepbench.random_model_folder(config, layers, plan.dtype, scratch)
    case = lora_case(plan.cfg)
    build = stepbench.build_ours if side_name == "ours" else stepbench.build_hf
    torch.manual_seed(seed)
    side = build(folder, case, plan.dtype, device, ac)
    state = stepbench.state_bytes(side)
    trainable = sum(p.numel() * p.element_size() for p in side.model.parameters() if p.requires_grad)
    points = []
    for b in batches:
        batch = fixed_batch(b, plan.seq_len, plan.image_tokens, plan.answer_tokens, config.vocab_size, seed)
        batch = {k: v.to(device) for k, v in batch.items()}
        feats = stepbench.image_embeddings(batch, config.hidden_size, 0.02, seed, device, plan.dtype)
        meter = stepbench.SavedTensorMeter(side.model)
        with meter.measure():
            loss = side.loss(batch, feats)
        saved = meter.by_kind()
        if saved.get("lora") and plan.cfg.model.kernels == "triton" and side_name == "ours" and device.type != "cuda":
            rows = b * plan.seq_len
            saved["lora"] = layers * sum(triton_lora_bytes(rows, k, n, case.r, case.dropout, plan.dtype)
                                         for k, n in adapted_shapes(config, case))  # fmt: skip
        points.append(Point(layers, b, saved, state["params"], trainable))
        meter.close()
        del loss
        if device.type == "cuda":
            _snapshot(side, batch, feats, scratch / f"cuda-{side_name}-{'ac' if ac else 'noac'}-{layers}l-b{b}.pickle")
    del side
    stepbench._free(device)
    return points


def _snapshot(side, batch, feats, path: Path) -> None:
    """A CUDA memory snapshot of one step (open it at https://pytorch.org/memory_viz)."""
    torch.cuda.memory._record_memory_history(max_entries=200_000)
    try:
        side.step(batch, feats)
        torch.cuda.synchronize()
        torch.cuda.memory._dump_snapshot(str(path))
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)


def bilinear(points: list[Point], value) -> tuple[float, float, float, float]:
    """Exact `c0 + c1 L + c2 B + c3 L B` through the four (L, B) corners."""
    by = {(p.layers, p.batch): value(p) for p in points}
    (l1, l2), (b1, b2) = sorted({p.layers for p in points}), sorted({p.batch for p in points})
    q11, q21, q12, q22 = by[l1, b1], by[l2, b1], by[l1, b2], by[l2, b2]
    dl, db = l2 - l1, b2 - b1
    c3 = (q22 - q21 - q12 + q11) / (dl * db)
    c1 = (q21 - q11) / dl - c3 * b1
    c2 = (q12 - q11) / db - c3 * l1
    c0 = q11 - c1 * l1 - c2 * b1 - c3 * l1 * b1
    return c0, c1, c2, c3


def evaluate(coeffs: tuple[float, float, float, float], layers: int, batch: int) -> float:
    c0, c1, c2, c3 = coeffs
    return c0 + c1 * layers + c2 * batch + c3 * layers * batch


@dataclass
class SideModel:
    """One side's fitted memory model: every quantity as a function of (layers, micro-batch)."""

    name: str
    ac: bool
    kinds: dict[str, tuple]  # kind -> bilinear coefficients of its saved bytes
    params: tuple  # bilinear (c2 = c3 = 0)
    trainable: tuple
    points: list[Point] = field(default_factory=list)

    def activations(self, layers: int, batch: int) -> dict[str, float]:
        return {k: max(0.0, evaluate(c, layers, batch)) for k, c in self.kinds.items()}

    def per_layer(self, batch: int) -> dict[str, float]:
        return {k: c[1] + c[3] * batch for k, c in self.kinds.items()}


def fit_side(points: list[Point], name: str, ac: bool) -> SideModel:
    kinds = sorted({k for p in points for k in p.saved})
    return SideModel(
        name,
        ac,
        {k: bilinear(points, lambda p, k=k: p.saved.get(k, 0)) for k in kinds},
        bilinear(points, lambda p: p.params),
        bilinear(points, lambda p: p.trainable),
        points,
    )


def measure_all(plan: Plan, scratch: Path, device: torch.device, layers=(1, 2), batches=(1, 2), sides=SIDES,
                ac_modes=(False, True)) -> dict:  # fmt: skip
    """Fitted models for each side and each checkpointing mode."""
    models = {}
    for side in sides:
        for ac in ac_modes:
            points = []
            for n in layers:
                logger.info("measuring %s, %d layer(s), activation checkpointing %s", side, n, "on" if ac else "off")
                points += measure_llm(plan, side, ac, n, list(batches), scratch, device)
            models[side, ac] = fit_side(points, side, ac)
    return models


# --------------------------------------------------------------------------- per-rank prediction


@dataclass
class Breakdown:
    """Per-rank bytes of one (side, strategy, checkpointing) combination."""

    side: str
    strategy: str
    ac: str
    gpus: int
    micro_batch: int
    frozen: float
    trainable: float
    grads: float
    optimizer: float
    gathered: float  # unsharded parameters in flight, communication buckets
    activations: dict[str, float]
    connector_activations: float
    working_set: float  # the backward's transient buffers
    supported: bool = True
    note: str = ""

    @property
    def static(self) -> float:
        return self.frozen + self.trainable + self.grads + self.optimizer + self.gathered

    @property
    def activation_total(self) -> float:
        return sum(self.activations.values()) + self.connector_activations

    @property
    def total(self) -> float:
        return self.static + self.activation_total + self.working_set

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(static=self.static, activation_total=self.activation_total, total=self.total)
        return d


@dataclass
class Sizes:
    """Full-depth sizes of one side, in bytes (trained parameters in fp32)."""

    frozen_llm: float
    frozen_vision: float
    frozen_connector: float
    adapters: float
    connector_trainable: float
    layer: float  # one decoder layer's parameters
    embed: float
    head: float
    largest_adapter: float
    compute_itemsize: int

    @property
    def frozen(self) -> float:
        return self.frozen_llm + self.frozen_vision + self.frozen_connector

    @property
    def trainable(self) -> float:
        return self.adapters + self.connector_trainable


def sizes_of(model: SideModel, plan: Plan, parts: dict[str, Part]) -> Sizes:
    c = plan.llm_config
    layers = c.num_hidden_layers
    params = evaluate(model.params, layers, 1)
    adapters = evaluate(model.trainable, layers, 1)
    itemsize = plan.dtype.itemsize
    embed = c.vocab_size * c.hidden_size * itemsize
    head = 0 if c.tie_word_embeddings else c.vocab_size * c.hidden_size * itemsize
    case = lora_case(plan.cfg)
    largest = max(case.r * c.hidden_size, case.r * c.intermediate_size) * 4
    return Sizes(
        frozen_llm=params - adapters,
        frozen_vision=parts["vision"].frozen_bytes,
        frozen_connector=parts["connector"].frozen_bytes,
        adapters=adapters,
        connector_trainable=parts["connector"].trainable_numel * 4,
        layer=model.params[1],
        embed=embed,
        head=head + c.hidden_size * itemsize,
        largest_adapter=largest,
        compute_itemsize=itemsize,
    )


def predict(model: SideModel, sizes: Sizes, plan: Plan, strategy: str, gpus: int, micro_batch: int,
            connector_per_sample: float, no_ac: SideModel | None = None) -> Breakdown:  # fmt: skip
    """Per-rank memory of `strategy` on `gpus` GPUs at `micro_batch` (see STRATEGY_NOTES)."""
    c = plan.llm_config
    acts = model.activations(c.num_hidden_layers, micro_batch)
    head = acts.get("head+loss", 0.0)
    working = head  # the logits' gradient lives while their saved tensors do
    if model.ac and no_ac is not None:
        working += sum(no_ac.per_layer(micro_batch).values())  # one layer recomputed in backward
    n = max(gpus, 1)
    t = sizes.trainable
    half = sizes.compute_itemsize < 4
    b = Breakdown(model.name, strategy, "full" if model.ac else "none", gpus, micro_batch, sizes.frozen, t, t, 2 * t,
                  0.0, acts, connector_per_sample * micro_batch, working)  # fmt: skip
    if strategy == "single":
        if gpus != 1:
            b.supported, b.note = False, "single runs on one GPU; use ddp, fsdp2 or zero* for more"
    elif strategy == "ddp":
        b.gathered = t  # DDP's flat gradient buckets, a second copy of the gradients
    elif strategy == "fsdp2":
        b.frozen, b.trainable, b.grads, b.optimizer = sizes.frozen / n, t / n, t / n, 2 * t / n
        # Units: vision tower, embeddings, each decoder layer, norm + head; the unit computed and
        # the one prefetched are unsharded at once, in the compute dtype. At the peak (the end of
        # the forward, the start of the backward) those are the last layers and the head; the
        # vision tower's gather comes and goes before any activation exists.
        layer = sizes.layer + sizes.adapters / c.num_hidden_layers * (sizes.compute_itemsize / 4 - 1)
        units = [2 * layer, layer + sizes.head]
        # The root (connector, ln_vision) stays gathered through forward and backward.
        root = sizes.connector_trainable * sizes.compute_itemsize / 4 + sizes.frozen_connector
        b.gathered = (max(units) + root) * (1 - 1 / n)
    elif strategy in ("zero2", "zero3"):
        b.frozen = sizes.frozen / (n if strategy == "zero3" else 1)
        model_copy = t / 2 if half else t  # DeepSpeed casts the module to bf16, masters stay fp32
        master = t if half else 0.0
        b.trainable = model_copy / (n if strategy == "zero3" else 1) + master / n
        b.grads = model_copy / n
        b.optimizer = 2 * t / n
        bucket = _ds_bucket_bytes(sizes, plan)
        b.gathered = 2 * bucket  # the contiguous reduce buffer, double-buffered
        if strategy == "zero3":
            b.gathered += 2 * sizes.layer + sizes.adapters / 2  # live layers; adapters persist whole
            if plan.cfg.model.quantize_llm != "none":
                b.supported, b.note = False, "ZeRO-3 cannot partition NF4 weights (engine.config refuses it)"
    else:
        raise UserError(f"--strategy {strategy}: expected one of {', '.join(STRATEGIES)} or all")
    return b


def _ds_bucket_bytes(sizes: Sizes, plan: Plan) -> float:
    """engine.deepspeed_strategy's reduce bucket (a quarter of the trained parameters), in the grads' dtype."""
    elements = sizes.trainable / 4
    bucket = min(500_000_000, max(sizes.largest_adapter / 4, math.ceil(elements / 4)))
    return bucket * sizes.compute_itemsize


STRATEGY_NOTES = {
    "single": "everything on one GPU",
    "ddp": "as single, plus DDP's gradient buckets (a second copy of the trained parameters' gradients)",
    "fsdp2": "parameters, gradients and AdamW state sharded 1/N; at the peak the last decoder layers and the head "
             "unsharded, and the root (connector) throughout (units: vision tower, embeddings, each decoder layer, "
             "norm + head)",
    "zero2": "DeepSpeed ZeRO-2: frozen weights and the bf16 module copy whole; fp32 masters, gradients and AdamW "
             "state 1/N; double-buffered reduce bucket of engine.deepspeed_strategy's size",
    "zero3": "DeepSpeed ZeRO-3: everything 1/N; two live decoder layers gathered; adapters persist whole",
}  # fmt: skip


# --------------------------------------------------------------------------- fit verdict


def parse_bytes(text: str) -> int:
    """`40GB` (1e9), `40GiB` / `40G` (2^30), `48000MB`, or a plain number of GiB."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([KMGT]i?B?|)\s*", text, re.IGNORECASE)
    if not m:
        raise UserError(f"--gpu-mem {text!r}: expected a size like 40GB, 80GiB or 48")
    value, unit = float(m.group(1)), m.group(2).upper()
    if not unit:
        return int(value * GIB)
    power = "KMGT".index(unit[0]) + 1
    base = 1000 if unit.endswith("B") and "I" not in unit else 1024
    return int(value * base**power)


def usable(gpu_mem: int) -> float:
    return (gpu_mem - CUDA_CONTEXT_BYTES) * (1 - ALLOCATOR_SLACK)


def max_micro_batch(at1: Breakdown, at2: Breakdown, budget: float) -> int:
    """The largest micro-batch whose predicted total fits `budget` (totals are linear in it)."""
    per_sample = at2.total - at1.total
    fixed = at1.total - per_sample
    if per_sample <= 0:
        return 0
    return max(0, int((budget - fixed) // per_sample))


# --------------------------------------------------------------------------- report


def _gib(x: float) -> str:
    return f"{x / GIB:,.2f}"


def build_report(plan: Plan, models: dict, parts: dict[str, Part], connector: tuple[int, str], strategies: list[str],
                 gpus: int, gpu_mem: int | None, global_batch: int | None) -> dict:  # fmt: skip
    c = plan.llm_config
    sizes = {s: sizes_of(models[s, False], plan, parts) for s in SIDES}
    rows, plans = [], []
    for side in SIDES:
        for ac in (False, True):
            model = models[side, ac]
            for strategy in strategies:
                n = 1 if strategy == "single" else gpus
                args = (sizes[side], plan, strategy, n)
                kw = {"connector_per_sample": connector[0], "no_ac": models[side, False]}
                b = predict(model, *args, plan.micro_batch, **kw)
                row = b.as_dict()
                if gpu_mem is not None and b.supported:
                    budget = usable(gpu_mem)
                    row["fits"] = b.total <= budget
                    row["max_micro_batch"] = max_micro_batch(predict(model, *args, 1, **kw),
                                                             predict(model, *args, 2, **kw), budget)  # fmt: skip
                    if global_batch:
                        row["grad_accum"] = _accumulation(global_batch, n, row["max_micro_batch"])
                rows.append(row)
    per_layer = {f"{s}, AC {'full' if ac else 'none'}": models[s, ac].per_layer(plan.micro_batch)
                 for s in SIDES for ac in (False, True)}  # fmt: skip
    return {
        "llm": {"layers": c.num_hidden_layers, "hidden": c.hidden_size, "intermediate": c.intermediate_size,
                "heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads, "vocab": c.vocab_size},
        "micro_batch": plan.micro_batch, "seq_len": plan.seq_len, "image_tokens": plan.image_tokens,
        "answer_tokens": plan.answer_tokens, "dtype": str(plan.dtype).removeprefix("torch."),
        "quantize_llm": plan.cfg.model.quantize_llm, "sizes": {s: dataclasses.asdict(v) for s, v in sizes.items()},
        "vision": dataclasses.asdict(parts["vision"]), "connector": dataclasses.asdict(parts["connector"]),
        "connector_activations_per_sample": connector[0], "connector_how": connector[1],
        "per_layer_activations": per_layer, "predictions": rows, "gpus": gpus, "gpu_mem": gpu_mem,
        "usable_gpu_mem": usable(gpu_mem) if gpu_mem else None, "global_batch": global_batch,
        "strategy_notes": {s: STRATEGY_NOTES[s] for s in strategies},
        "measured_points": {f"{s}, AC {'full' if ac else 'none'}": [dataclasses.asdict(p) for p in m.points]
                            for (s, ac), m in models.items()},
    }  # fmt: skip


def _accumulation(global_batch: int, gpus: int, micro: int) -> dict | None:
    """The largest micro-batch <= `micro` that divides the per-GPU batch, and its accumulation."""
    per_gpu, rest = divmod(global_batch, gpus)
    if rest or micro < 1:
        return None
    for m in range(min(micro, per_gpu), 0, -1):
        if per_gpu % m == 0:
            return {"micro_batch": m, "grad_accum": per_gpu // m}
    return None


KIND_ORDER = ("attention", "mlp", "norm", "lora", "rope", "embeddings", "other", "checkpointed inputs", "head+loss")


def markdown(result: dict) -> str:
    r = result["report"]
    lines = [f"# Memory report: {result['config']}", "",
             f"- date: {result['date']}", f"- command: `{result['command']}`", f"- measured on: {result['device']}",
             f"- LLM: {r['llm']['layers']} layers, width {r['llm']['hidden']}, MLP {r['llm']['intermediate']}, heads "
             f"{r['llm']['heads']}/{r['llm']['kv_heads']}, vocab {r['llm']['vocab']}; {r['dtype']}"
             f"{', NF4 frozen linears' if r['quantize_llm'] == 'nf4' else ''}",
             f"- micro-batch {r['micro_batch']} x {r['seq_len']} tokens ({r['image_tokens']} image, {r['answer_tokens']} "
             f"answer tokens per sample: the longest a padded batch gets)"]  # fmt: skip
    lines += [f"- note: {n}" for n in result["notes"]]
    lines += ["", "## Where the memory goes (one GPU, no sharding), GiB", "",
              "| | ours | HF+PEFT |", "|---|---|---|"]  # fmt: skip
    s = r["sizes"]
    single = {(p["side"], p["ac"]): p for p in r["predictions"] if p["strategy"] == "single"}
    if not single:
        single = {(p["side"], p["ac"]): p for p in r["predictions"]}
    rows = [
        ("frozen LLM weights", s["ours"]["frozen_llm"], s["hf+peft"]["frozen_llm"]),
        ("frozen vision tower (+ ln_vision)", s["ours"]["frozen_vision"], s["hf+peft"]["frozen_vision"]),
        ("frozen connector parts", s["ours"]["frozen_connector"], s["hf+peft"]["frozen_connector"]),
        ("adapters (fp32)", s["ours"]["adapters"], s["hf+peft"]["adapters"]),
        ("trained connector (fp32)", s["ours"]["connector_trainable"], s["hf+peft"]["connector_trainable"]),
        ("gradients of the trained parameters", s["ours"]["adapters"] + s["ours"]["connector_trainable"],
         s["hf+peft"]["adapters"] + s["hf+peft"]["connector_trainable"]),
        ("AdamW state", 2 * (s["ours"]["adapters"] + s["ours"]["connector_trainable"]),
         2 * (s["hf+peft"]["adapters"] + s["hf+peft"]["connector_trainable"])),
    ]  # fmt: skip
    for ac in AC_MODES:
        o, h = single[("ours", ac)], single[("hf+peft", ac)]
        kinds = [k for k in KIND_ORDER if o["activations"].get(k) or h["activations"].get(k)]
        for k in kinds:
            label = "logits and loss" if k == "head+loss" else f"activations: {k}"
            rows.append((f"{label} (AC {ac})", o["activations"].get(k, 0), h["activations"].get(k, 0)))
        rows.append((f"connector / ViT features (AC {ac})", o["connector_activations"], h["connector_activations"]))
        rows.append((f"backward working set (AC {ac})", o["working_set"], h["working_set"]))
        rows.append((f"**total, one GPU (AC {ac})**", o["total"], h["total"]))
    lines += [f"| {name} | {_gib(a)} | {_gib(b)} |" for name, a, b in rows]
    lines += ["", f"Connector activations: {r['connector_how']}.", "",
              f"## Activations per decoder layer at micro-batch {r['micro_batch']}, MiB", ""]  # fmt: skip
    per_layer = r["per_layer_activations"]
    kinds = [k for k in KIND_ORDER if any(v.get(k) for v in per_layer.values())]
    lines += ["| | " + " | ".join(kinds) + " | total |", "|---|" + "---|" * (len(kinds) + 1)]
    for name, v in per_layer.items():
        lines.append(f"| {name} | " + " | ".join(f"{v.get(k, 0) / 2**20:,.1f}" for k in kinds)
                     + f" | {sum(v.values()) / 2**20:,.1f} |")  # fmt: skip
    mem = r["gpu_mem"]
    title = f"## Per GPU: {r['gpus']} GPU(s)" + (f" of {mem / 1e9:g} GB ({_gib(r['usable_gpu_mem'])} GiB usable)" if mem else "")
    lines += ["", title + ", GiB", "",
              "| side | strategy | AC | params | grads | AdamW | gathered/buffers | activations | working set | total "
              "| fits | largest micro-batch |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in r["predictions"]:
        if not p["supported"]:
            lines.append(f"| {p['side']} | {p['strategy']} | {p['ac']} | {p['note']} | | | | | | | | |")
            continue
        fits = "-" if "fits" not in p else ("yes" if p["fits"] else "**no**")
        micro = p.get("max_micro_batch", "-")
        if p.get("grad_accum"):
            micro = f"{micro} (x{r['gpus'] if p['strategy'] != 'single' else 1} GPUs: micro {p['grad_accum']['micro_batch']}, accumulate {p['grad_accum']['grad_accum']})"
        lines.append(f"| {p['side']} | {p['strategy']} | {p['ac']} | {_gib(p['frozen'] + p['trainable'])} | "
                     f"{_gib(p['grads'])} | {_gib(p['optimizer'])} | {_gib(p['gathered'])} | {_gib(p['activation_total'])} | "
                     f"{_gib(p['working_set'])} | {_gib(p['total'])} | {fits} | {micro} |")  # fmt: skip
    lines += ["", "Strategies:"] + [f"- {k}: {v}" for k, v in r["strategy_notes"].items()]
    lines += ["", "The usable memory is the GPU's less 1 GiB for the CUDA context and 5% allocator slack. The backward "
              "working set is the logits' gradient (and, with checkpointing, one layer recomputed)."]  # fmt: skip
    if result.get("verdict"):
        lines += ["", "## Verdict", ""] + [f"- {v}" for v in result["verdict"]]
    return "\n".join(lines) + "\n"


def verdicts(report: dict, strategy: str | None) -> list[str]:
    """One line per (side, strategy, AC) that the user asked about: fits, or what it needs."""
    out = []
    mem = report["gpu_mem"]
    if mem is None:
        return out
    budget = report["usable_gpu_mem"]
    for p in report["predictions"]:
        if strategy not in (None, "all") and p["strategy"] != strategy:
            continue
        where = f"{p['side']}, {p['strategy']}, AC {p['ac']}, micro-batch {p['micro_batch']}"
        if not p["supported"]:
            out.append(f"{where}: not possible ({p['note']})")
        elif p["fits"]:
            out.append(f"{where}: fits, {_gib(p['total'])} of {_gib(budget)} GiB usable per GPU")
        else:
            need = p["total"] / (1 - ALLOCATOR_SLACK) + CUDA_CONTEXT_BYTES
            out.append(f"{where}: does not fit: needs {_gib(p['total'])} GiB per GPU (a {need / 1e9:.0f} GB GPU); "
                       f"micro-batch {p.get('max_micro_batch', 0)} fits")  # fmt: skip
    return out


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = result["report"]
    preds = [p for p in r["predictions"] if p["supported"]]
    labels = [f"{p['strategy']}\nAC {p['ac']}\n{'ours' if p['side'] == 'ours' else 'HF'}" for p in preds]
    stacks = {
        "frozen weights": [p["frozen"] for p in preds],
        "trained params": [p["trainable"] for p in preds],
        "gradients": [p["grads"] for p in preds],
        "AdamW state": [p["optimizer"] for p in preds],
        "gathered / buckets": [p["gathered"] for p in preds],
        "activations (LLM)": [sum(p["activations"].values()) - p["activations"].get("head+loss", 0) for p in preds],
        "logits + loss": [p["activations"].get("head+loss", 0) for p in preds],
        "ViT features / connector": [p["connector_activations"] for p in preds],
        "backward working set": [p["working_set"] for p in preds],
    }
    fig, ax = plt.subplots(figsize=(max(8, 0.55 * len(preds)), 5))
    bottom = [0.0] * len(preds)
    for name, values in stacks.items():
        gib = [v / GIB for v in values]
        ax.bar(range(len(preds)), gib, bottom=bottom, label=name)
        bottom = [a + b for a, b in zip(bottom, gib)]
    if r["usable_gpu_mem"]:
        ax.axhline(r["usable_gpu_mem"] / GIB, color="red", linestyle="--", label="usable GPU memory")
    ax.set_xticks(range(len(preds)), labels, fontsize=6)
    ax.set_ylabel("GiB per GPU")
    ax.set_title(f"{Path(result['config']).name}: {r['gpus']} GPU(s), micro-batch {r['micro_batch']}", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def make_plan(config: str, overrides: list[str], llm: str | None, seq_len: int | None, answer_tokens: int | None,
              micro_batch: int | None) -> Plan:  # fmt: skip
    from pefomed.engine.build import n_image_tokens
    from pefomed.engine.config import load_config

    cfg = load_config(config, overrides)
    cfg, notes = resolve(cfg, config, llm)
    if cfg.model.kernels == "triton" and not torch.cuda.is_available():
        notes.append("measured on the CPU with the torch kernels; ours' LoRA activations are those of the Triton "
                     "kernels the config names (bit-packed dropout mask and xa, bench.memory.triton_lora_bytes)")  # fmt: skip
    dtype = DTYPES[cfg.model.dtype]
    image_tokens = n_image_tokens(cfg)
    t = seq_len or cfg.data.max_length
    answer = answer_tokens if answer_tokens is not None else max(1, t - image_tokens - 40)
    if image_tokens + answer + 1 > t:
        raise UserError(f"--seq-len {t}: must hold the {image_tokens} image tokens, the answer ({answer}) and BOS")
    return Plan(cfg, config, notes, dtype, text_config(cfg), t, image_tokens, answer,
                micro_batch or cfg.train.micro_batch_size)  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="pefomed bench memory", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="a run config (YAML)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for pefomed train")
    parser.add_argument("--strategy", default="all", help=f"one of {', '.join(STRATEGIES)}, or all")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs (ranks) the run uses")
    parser.add_argument("--gpu-mem", help="memory of one GPU, e.g. 40GB, 80GiB")
    parser.add_argument("--global-batch", type=int, help="the recipe's global batch: report micro-batch x accumulation")
    parser.add_argument("--micro-batch", type=int, help="default: train.micro_batch_size")
    parser.add_argument("--seq-len", type=int, help="tokens per sample (default: data.max_length)")
    parser.add_argument("--answer-tokens", type=int, help="target tokens per sample (default: all after the prompt)")
    parser.add_argument("--llm", help="a models.llama (or models.idefics2) config name standing for model.llm")
    parser.add_argument("--device", choices=("cpu", "cuda"), help="where to measure (default: cuda when available)")
    parser.add_argument("--out-dir", default=stepbench.DEFAULT_OUT_DIR)
    parser.add_argument("--name", help="file stem (default: memory-<config name>-<date>)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    strategies = list(STRATEGIES) if args.strategy == "all" else [args.strategy]
    if any(s not in STRATEGIES for s in strategies):
        parser.error(f"--strategy {args.strategy}: choose from {', '.join(STRATEGIES)} or all")
    if args.gpus < 1:
        parser.error(f"--gpus {args.gpus}: must be at least 1")
    if args.strategy == "single" and args.gpus != 1:
        parser.error(f"--strategy single runs on one GPU, not --gpus {args.gpus}")
    gpu_mem = parse_bytes(args.gpu_mem) if args.gpu_mem else None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))

    plan = make_plan(args.config, args.overrides, args.llm, args.seq_len, args.answer_tokens, args.micro_batch)
    parts = inventory(plan.cfg)
    connector = connector_activations(plan.cfg, plan.dtype)
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-memory-")))
        models = measure_all(plan, scratch, device)
        report = build_report(plan, models, parts, connector, strategies, args.gpus, gpu_mem, args.global_batch)
        snapshots = sorted(scratch.glob("*.pickle"))
        now = datetime.datetime.now(datetime.UTC)
        command = "python -m pefomed.bench.memory " + shlex.join(sys.argv[1:] if argv is None else argv)
        result = {
            "config": args.config,
            "date": now.isoformat(timespec="seconds"),
            "command": command.strip(),
            "device": stepbench.device_name(device),
            "versions": stepbench.versions(),
            "notes": plan.notes,
            "report": report,
            "verdict": verdicts(report, args.strategy),
        }
        print(markdown(result))
        if not args.no_write:
            out = Path(args.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            stem = args.name or f"memory-{Path(args.config).stem}-{now.strftime('%Y%m%d-%H%M%S')}"
            for snap in snapshots:
                snap.replace(out / f"{stem}-{snap.name}")
            stepbench._atomic_write(out / f"{stem}.json", json.dumps(result, indent=2) + "\n")
            stepbench._atomic_write(out / f"{stem}.md", markdown(result))
            chart(result, out / f"{stem}.png")
            result["written"] = [str(out / f"{stem}.{ext}") for ext in ("json", "md", "png")]
            print("wrote " + ", ".join(result["written"]))
    return result


if __name__ == "__main__":
    sys.exit(run_cli(main))
