"""The training loop: AdamW, warmup + cosine, token-normalized accumulation, clipping, logging.

One loop for every strategy: it drives a `distributed.Runtime` (`TorchRuntime` for single, ddp
and fsdp2; `DeepSpeedRuntime`, whose engine owns the optimizer, its clipping and its state), so
the accumulation, the counts, the checkpoints and the metrics are the same code under each.

Gradient accumulation is normalized by the number of target tokens in the whole optimizer step,
summed across ranks (as torchtune does), not by the number of micro-steps: medical answers run
from one token ("yes") to three hundred (a report), and a per-micro-step mean would weight a
one-word answer like a whole report. Each micro-batch's backward takes
`loss * n_local * grad_divisor / n_global`, where `grad_divisor` undoes the strategy's own
averaging over ranks (1 when the reduction sums, as FSDP2's does here).

Bad samples (unreadable images, prompts too long) are counted across ranks in the same
all-reduce that sums the target tokens, once per optimizer step, so every rank sees the same
totals and decides together: when more than `data.max_bad_fraction` of the samples seen could
not be used (judged from the 20th sample on), or some rank met 50 micro-batches' worth of bad
samples in a row, every rank saves the checkpoint of the step's start and raises
`TooManyBadSamples`. Each rank logs its own bad samples (file and reason) as warnings.

`metrics.jsonl` (rank 0) holds per step: loss, lr, grad_norm, target and input tokens, tokens/s
(input tokens over all ranks per second of the step), peak memory (CUDA: max_memory_allocated of
rank 0; CPU: rank 0's peak RSS) and, on CUDA with a known GPU, MFU. The token counts ride in the
step's one all-reduce, so the metrics add no host synchronization. Library messages go through
`logging` (the `pefomed` logger shows INFO on rank 0 only); rank 0 shows a tqdm progress bar
with the loss, lr and tokens/s when `train.progress_bar` is on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pefomed.engine import checkpoint, distributed
from pefomed.engine.batches import STARVED_AFTER
from pefomed.engine.config import Config, ConfigError, OptimConfig
from pefomed.errors import UserError

logger = logging.getLogger(__name__)

# A few bad files early on should not stop a run: the fraction is judged from this many samples on.
MIN_SAMPLES_JUDGED = 20


class TooManyBadSamples(UserError, RuntimeError):
    """More samples than `data.max_bad_fraction` could not be read."""


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """Linear warmup from 0 to `lr`, then cosine from `lr` to `min_lr` at `max_steps`."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    span = max(max_steps - optim.warmup_steps, 1)
    progress = min(max(step - optim.warmup_steps, 0) / span, 1.0)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LRScheduler):
    """`lr_at` as a scheduler: the lr of optimizer step `last_epoch`, for every group.

    Each group follows the schedule scaled to its own peak (its `lr` when the scheduler is built:
    `optim.lr`, or `optim.connector_lr` for the connector's group, see `param_groups`), so its lr
    at step k is `base * lr_at(k) / optim.lr`, its floor `base * min_lr / lr`. The lr is a function
    of the step alone, so the saved state is the step and a resumed run sets it from its progress
    (`set_step`), whichever strategy saved it; the peaks come from the config, not the checkpoint.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim: OptimConfig, max_steps: int) -> None:
        self.optim, self.max_steps = optim, max_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        factor = lr_at(self.last_epoch, self.optim, self.max_steps) / self.optim.lr
        return [base * factor for base in self.base_lrs]

    def set_step(self, step: int) -> None:
        self.last_epoch = step
        self._last_lr = self.get_lr()
        for group, lr in zip(self.optimizer.param_groups, self._last_lr):
            group["lr"] = lr

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch}

    def load_state_dict(self, state_dict: dict) -> None:
        self.set_step(int(state_dict["last_epoch"]))


def takes_connector_lr(name: str) -> bool:
    """A parameter trained from scratch: the VLM's `connector`, or its `vit` when
    `model.train_vision` trains it (under any wrapper prefix)."""
    return not {"connector", "vit"}.isdisjoint(name.split(".")[:-1])


def param_groups(model: nn.Module, optim: OptimConfig) -> list[dict]:
    """AdamW's groups: weight decay on matrices only (biases and norms are not decayed), and the
    connector's (and a trained ViT's) parameters in groups of their own peak lr when
    `optim.connector_lr` is set."""
    split = optim.connector_lr is not None
    buckets: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            buckets.setdefault((split and takes_connector_lr(name), p.ndim >= 2), []).append(p)
    if not buckets:
        raise ConfigError(
            "the model has no trainable parameters: lora.target_modules matches no linear layer of model.llm"
        )
    groups = []
    for connector in (False, True):
        for decay in (True, False):
            params = buckets.get((connector, decay))
            if params:
                groups.append({
                    "params": params,
                    "weight_decay": optim.weight_decay if decay else 0.0,
                    "lr": optim.connector_lr if connector else optim.lr,
                })
    return groups


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (`param_groups`)."""
    return torch.optim.AdamW(param_groups(model, optim), lr=optim.lr, betas=optim.betas, eps=optim.eps)


def count_targets(batch: dict) -> int:
    if "labels" not in batch:  # a starved batch: every sample was bad
        return 0
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum())


def count_samples(batch: dict) -> int:
    """Samples a micro-batch drew from the data order: the usable ones and the bad ones."""
    return int(sequence_lengths(batch).numel()) + int(batch.get("n_bad", 0))


def sequence_lengths(batch: dict) -> torch.Tensor:
    """Real (unpadded) tokens of each sample, read on the host before the batch moves: a padded
    batch's row lengths, or a packed batch's segments that are not padding."""
    if "input_ids" not in batch:
        return torch.zeros(0, dtype=torch.long)
    mask = batch.get("attention_mask")
    if mask is None:
        ids = batch["input_ids"]
        return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long)
    if "seq_lens" in batch:
        real = mask.reshape(-1).split([int(n) for n in batch["seq_lens"]])
        lengths = torch.stack([segment.sum() for segment in real]).long()
        return lengths[lengths > 0]
    return mask.sum(dim=1).long()


# ---------------------------------------------------------------- throughput and utilization

# Dense (no sparsity) tensor-core peaks in FLOP/s from the vendors' data sheets: (bf16/fp16, tf32).
PEAK_FLOPS = {
    "H200": (989e12, 494e12),
    "H100 SXM": (989e12, 494e12),
    "H100 NVL": (835e12, 418e12),
    "H100 PCIe": (756e12, 378e12),
    "H100": (989e12, 494e12),
    "A100": (312e12, 156e12),
    "A40": (149.7e12, 74.8e12),
    "L40S": (362e12, 183e12),
    "A10": (125e12, 62.5e12),
}


def peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's dense peak for `dtype` (fp32 runs on TF32 tensor cores), or None if unknown."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, (half, tf32) in PEAK_FLOPS.items():  # the longer names come first
        if key in name:
            return tf32 if dtype == torch.float32 else half
    return None


@dataclass(frozen=True)
class ModelFlops:
    """Model FLOPs of one frozen-base PEFT step, from parameter counts and token counts.

    Only matmul weights count (2-D, and the ViT's patch convolution); a matmul costs 2 FLOPs per
    weight per token forward. Per real LLM token: frozen decoder weights `4 N` (forward, and the
    input gradient that must flow down to the lowest adapter and to the connector's positions),
    adapters `6 N` (forward, input and weight gradients). The head runs on target rows only:
    `4 N_head` per target token. The connector `4 N` per image token (forward and weight
    gradient; the frozen ViT below needs no input gradient). The frozen ViT runs forward only:
    `2 N` per ViT token (its patch embedding per patch). Attention adds `12 L d` per token per token of its sequence in the LLM
    (forward QK^T and AV, backward twice that) and `4 L d` in the ViT. Padding is not work.
    """

    llm_frozen: int
    llm_adapters: int
    head: int
    connector: int
    llm_layers: int
    llm_width: int
    vit: int
    vit_patch: int
    vit_layers: int
    vit_width: int
    vit_tokens: int

    @classmethod
    def of(cls, model: nn.Module) -> ModelFlops | None:
        """The counts of a VisionLanguageModel (None for any other module: no MFU is logged)."""
        llm = getattr(model, "llm", None)
        config = getattr(llm, "config", None)
        if not (hasattr(config, "num_hidden_layers") and hasattr(getattr(llm, "model", None), "layers")):
            return None

        def shape(p: torch.Tensor) -> tuple[int, ...]:
            return tuple(getattr(p, "ds_shape", None) or p.shape)  # ZeRO-3 keeps the full shape aside

        def matmul_numel(params) -> int:
            return sum(math.prod(shape(p)) for p in params if len(shape(p)) in (2, 4))

        body = list(llm.model.layers.parameters())
        vit = getattr(model, "vit", None)
        vc = getattr(vit, "config", None)
        return cls(
            llm_frozen=matmul_numel(p for p in body if not p.requires_grad),
            llm_adapters=matmul_numel(p for p in body if p.requires_grad),
            head=matmul_numel([llm.lm_head.weight]),
            connector=matmul_numel(p for p in model.connector.parameters() if p.requires_grad),
            llm_layers=llm.config.num_hidden_layers,
            llm_width=llm.config.hidden_size,
            vit=sum(math.prod(shape(p)) for p in vit.parameters() if len(shape(p)) == 2) if vit is not None else 0,
            vit_patch=sum(math.prod(shape(p)) for p in vit.parameters() if len(shape(p)) == 4)
            if vit is not None
            else 0,
            vit_layers=vc.depth if vc is not None else 0,
            vit_width=vc.hidden_size if vc is not None else 0,
            vit_tokens=vc.grid * vc.grid + 1 if vc is not None else 0,
        )

    def step(self, counts: StepCounts) -> float:
        llm = counts.input_tokens * (4 * self.llm_frozen + 6 * self.llm_adapters)
        llm += 12 * self.llm_layers * self.llm_width * counts.squared_lengths
        head = counts.target_tokens * 4 * self.head
        connector = counts.image_tokens * 4 * self.connector
        vit = counts.images * (
            self.vit_tokens * (2 * self.vit + 4 * self.vit_layers * self.vit_width * self.vit_tokens)
            + (self.vit_tokens - 1) * 2 * self.vit_patch  # the patch embedding sees patches, not CLS
        )
        return float(llm + head + connector + vit)


def peak_memory_bytes(device: torch.device) -> int:
    """This process's peak: CUDA `max_memory_allocated`, or the peak resident set on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) * (1 if sys.platform == "darwin" else 1024)  # Linux reports KiB


@dataclass
class Progress:
    """What a resumed run needs besides weights, optimizer and RNG.

    `data_position` is this rank's; the counters are totals over all ranks. `init_from` names the
    files the run started from (stage 2 from stage 1), for provenance only.
    """

    step: int = 0
    data_position: int = 0  # samples this rank has drawn from its shard of the data order
    samples_seen: int = 0
    bad_samples: int = 0
    init_from: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class StepCounts:
    """One optimizer step's totals over all ranks."""

    target_tokens: int
    bad: int
    samples: int
    starved_ranks: int
    input_tokens: int = 0  # real (unpadded) tokens fed to the LLM
    squared_lengths: int = 0  # sum over samples of (real tokens)^2, for attention FLOPs
    images: int = 0
    image_tokens: int = 0  # LLM positions the connector fills


class MetricsLog:
    """Append-only JSONL of per-step metrics; a resumed run drops the lines past its step.

    A run killed while writing leaves a torn last line: resuming drops it with a warning that names
    the file and the line. A malformed line elsewhere is not a torn write and stops the run.
    """

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        lines = self.path.read_text().splitlines()
        last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
        kept, dropped = [], 0
        for i, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not a JSON object")
            except ValueError as e:
                if i == last:
                    logger.warning(
                        "%s: line %d is cut short (%r), from a run killed mid-write; dropped it",
                        self.path,
                        i + 1,
                        line[:80],
                    )
                    continue
                raise UserError(
                    f"{self.path}: line {i + 1} is not a JSON object ({e}) and is not the last line, so "
                    "it is not a torn write; fix or delete that line (or move the file away) and rerun"
                ) from e
            if record.get("step", 0) <= step:
                kept.append(line)
            else:
                dropped += 1
        if dropped:
            logger.info("%s: dropped %d lines after step %d, which will be trained again", self.path, dropped, step)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()


class Trainer:
    """The loop over optimizer steps of one run.

    `runtime` is the strategy's step (`distributed.Runtime`); without one, `model` (single, ddp
    or fsdp2, already wrapped) gets a `TorchRuntime` with our AdamW and schedule.
    """

    def __init__(
        self,
        *,
        config: Config,
        model: nn.Module | None = None,
        batches,
        env: distributed.DistEnv,
        runtime: distributed.Runtime | None = None,
    ) -> None:
        self.config = config
        if runtime is None:
            optimizer = build_optimizer(model, config.optim)
            scheduler = WarmupCosine(optimizer, config.optim, config.train.max_steps)
            runtime = distributed.TorchRuntime(model, optimizer, scheduler, env, config.optim.grad_clip)
        self.runtime = runtime
        self.model = runtime.model
        self.batches = batches  # engine.batches.MicroBatches: iterable, .position, .skip_to()
        self.env = env
        out = Path(config.train.output_dir)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(out / "metrics.jsonl", enabled=env.is_main)
        self.progress = Progress(init_from=checkpoint.start_from(config))
        self.recent_bad: list[str] = []  # this rank's last bad samples, for the error message
        self.saved_step: int | None = None  # the step of the checkpoint that holds the current state
        self.flops = ModelFlops.of(runtime.module)
        from pefomed.engine.build import DTYPES

        peak = peak_flops(env.device, DTYPES[config.model.dtype])
        self.peak_flops = peak * env.world_size if peak else None

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self.runtime.optimizer

    # --- resume ------------------------------------------------------------------------------

    def maybe_resume(self) -> None:
        """Continue from output_dir's latest complete checkpoint (train.resume), or start at step 0."""
        path = checkpoint.latest_checkpoint(self.config.train.output_dir) if self.config.train.resume else None
        if path is None:
            self.metrics.truncate_after(0)
            return
        saved = checkpoint.load_checkpoint(
            path, runtime=self.runtime, env=self.env, config=self.config, n_samples=len(self.batches.dataset)
        )
        self.progress = Progress(
            **{k: v for k, v in saved.items() if k in Progress.__dataclass_fields__ and k != "init_from"},
            init_from=saved.get("init_from") or self.progress.init_from,
        )
        self.progress.data_position = int(saved["data_positions"][self.env.rank])
        self.batches.skip_to(self.progress.data_position)
        self.runtime.set_schedule_step(self.progress.step)
        self.saved_step = self.progress.step if saved["world_size"] == self.env.world_size else None
        self.metrics.truncate_after(self.progress.step)
        logger.info("resumed from %s at step %d", path, self.progress.step)

    def save(self, progress: Progress | None = None) -> Path:
        """Write the checkpoint of `progress` (the current one by default); every rank calls this.

        A step whose checkpoint this run already wrote or resumed from is not written again.
        """
        progress = progress or self.progress
        if progress.step == self.saved_step:
            return checkpoint.checkpoints_dir(self.config.train.output_dir) / f"step_{progress.step}"
        record = progress.as_dict()
        record["data_positions"] = distributed.gather_ints(progress.data_position, self.env)
        path = checkpoint.save_checkpoint(
            runtime=self.runtime, config=self.config, step=progress.step, progress=record, env=self.env
        )
        self.saved_step = progress.step
        logger.info("saved %s", path)
        return path

    # --- the loop ----------------------------------------------------------------------------

    def train(self) -> dict:
        cfg = self.config.train
        self.maybe_resume()
        stream = iter(self.batches)
        bar = self._progress_bar()
        last = {}
        try:
            while self.progress.step < cfg.max_steps:
                started = time.perf_counter()
                at_start = dataclasses.replace(self.progress)
                micro = [self._next_batch(stream) for _ in range(cfg.grad_accum)]
                counts = self._reduce_counts(micro)
                self.progress.samples_seen += counts.samples
                self.progress.bad_samples += counts.bad
                self._stop_if_too_many_bad(counts, at_start)
                lr = self.runtime.lr()
                loss_sum = self._accumulate(micro, counts.target_tokens)
                grad_norm = float(self.runtime.step())
                self.progress.step += 1
                elapsed = time.perf_counter() - started
                last = self._record(counts, loss_sum, lr, grad_norm, elapsed)
                self.metrics.write(last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}", tok_s=f"{last['tokens_per_s']:.0f}")
                elif self.env.is_main and self.progress.step % max(cfg.log_every, 1) == 0:
                    logger.info(
                        "step %d: loss %.4f lr %.2e %.0f tokens/s", self.progress.step, last["loss"], lr,
                        last["tokens_per_s"],
                    )  # fmt: skip
                if cfg.save_every and self.progress.step % cfg.save_every == 0 and self.progress.step < cfg.max_steps:
                    self.save()
        finally:
            if bar is not None:
                bar.close()
        self.save()
        if self.progress.bad_samples:
            logger.info(
                "%d of %d samples could not be used and were skipped (the warnings above name them)",
                self.progress.bad_samples,
                self.progress.samples_seen,
            )
        return last

    def _record(self, counts: StepCounts, loss_sum: float, lr: float, grad_norm: float, elapsed: float) -> dict:
        record = {
            "step": self.progress.step,
            "loss": loss_sum / max(counts.target_tokens, 1),
            "lr": lr,
            "grad_norm": grad_norm,
            "target_tokens": counts.target_tokens,
            "input_tokens": counts.input_tokens,
            "bad_samples": self.progress.bad_samples,
            "samples_seen": self.progress.samples_seen,
            "step_time_s": elapsed,
            "tokens_per_s": counts.input_tokens / elapsed if elapsed > 0 else 0.0,
            "peak_memory_gib": peak_memory_bytes(self.env.device) / 2**30,
        }
        if self.peak_flops and self.flops is not None:
            flops = self.flops.step(counts)
            record["mfu"] = flops / elapsed / self.peak_flops if elapsed > 0 else 0.0
        return record

    def _progress_bar(self):
        if not (self.env.is_main and self.config.train.progress_bar):
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.train.max_steps, initial=self.progress.step, desc="train", dynamic_ncols=True)

    def _next_batch(self, stream: Iterator[dict]) -> dict:
        batch = next(stream)
        self.progress.data_position = self.batches.position
        bad = list(batch.get("bad", []))
        for message in bad:
            logger.warning("rank %d: skipped a bad sample: %s", self.env.rank, message)
        self.recent_bad = (self.recent_bad + bad)[-5:]
        return batch

    def _reduce_counts(self, micro: list[dict]) -> StepCounts:
        """Target tokens, bad samples, samples, starved ranks, input tokens, squared lengths,
        images and image tokens of this step over all ranks: one all-reduce."""
        lengths = [sequence_lengths(b) for b in micro]
        local = [
            sum(count_targets(b) for b in micro),
            sum(int(b.get("n_bad", 0)) for b in micro),
            sum(count_samples(b) for b in micro),
            int(any(b.get("starved", False) for b in micro)),
            sum(int(n.sum()) for n in lengths),
            sum(int((n * n).sum()) for n in lengths),
            sum(int(n.numel()) for n in lengths),
            sum(int(b["image_token_mask"].sum()) for b in micro if "image_token_mask" in b),
        ]
        total = distributed.all_reduce_sum(torch.tensor(local, dtype=torch.long, device=self.env.device))
        return StepCounts(*(int(v) for v in total.tolist()))

    def _stop_if_too_many_bad(self, counts: StepCounts, at_start: Progress) -> None:
        """Every rank gets the same counts, so every rank takes the same branch: save the step's
        starting point (a resume redraws this step's samples), then raise everywhere."""
        limit = self.config.data.max_bad_fraction
        seen, bad = self.progress.samples_seen, self.progress.bad_samples
        too_many = seen >= MIN_SAMPLES_JUDGED and bad / seen > limit
        if not (too_many or counts.starved_ranks):
            return
        examples = [m for rank_bad in distributed.all_gather_object(self.recent_bad) for m in rank_bad]
        path = self.save(at_start)
        if too_many:
            what = f"{bad} of {seen} samples could not be used, more than data.max_bad_fraction={limit}"
        else:
            what = (
                f"{counts.starved_ranks} rank(s) read {STARVED_AFTER} micro-batches' worth of samples in a "
                "row and none could be used"
            )
        last = (
            f"last ones: {examples}"
            if examples
            else "none since this process started: see the log of the run before the resume"
        )
        raise TooManyBadSamples(
            f"{what} (over {self.env.world_size} rank(s)); {last}. Training up to step "
            f"{at_start.step} is saved in {path}; fix or remove those files, or raise "
            "data.max_bad_fraction, and rerun the same command to resume."
        )

    def _accumulate(self, micro: list[dict], global_tokens: int) -> float:
        """Forward and backward of the step's micro-batches; returns the loss summed over all
        ranks' target tokens. `global_tokens` is the step's target count over all ranks."""
        device = self.env.device
        scale = self.runtime.grad_divisor / max(global_tokens, 1)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        for i, batch in enumerate(micro):
            self.runtime.set_boundary(i == len(micro) - 1)
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, n = self.model(batch)
            self.runtime.backward(loss * n * scale)
            loss_sum += loss.detach().double() * n
        total = distributed.all_reduce_sum(loss_sum)
        return float(total.item())
