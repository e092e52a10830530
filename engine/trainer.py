"""The training loop: AdamW, warmup + cosine, token-normalized accumulation, clipping, logging.

Gradient accumulation is normalized by the number of target tokens in the whole optimizer step,
summed across ranks (as torchtune does), not by the number of micro-steps: medical answers run
from one token ("yes") to three hundred (a report), and a per-micro-step mean would weight a
one-word answer like a whole report.

Bad samples (unreadable images, prompts too long) are counted across ranks in the same
all-reduce that sums the target tokens, once per optimizer step, so every rank sees the same
totals and decides together: when more than `data.max_bad_fraction` of the samples seen could
not be used (judged from the 20th sample on), or some rank met 50 micro-batches' worth of bad
samples in a row, every rank saves the checkpoint of the step's start and raises
`TooManyBadSamples`. Each rank logs its own bad samples (file and reason) as warnings.

Library messages go through `logging` (the `pefomed` logger shows INFO on rank 0 only); rank 0
shows a tqdm progress bar when `train.progress_bar` is on.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
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


def build_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (biases and norms are not decayed)."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ConfigError(
            "the model has no trainable parameters: lora.target_modules matches no linear layer of model.llm"
        )
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)


def count_targets(batch: dict) -> int:
    if "labels" not in batch:  # a starved batch: every sample was bad
        return 0
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum())


def count_samples(batch: dict) -> int:
    """Samples a micro-batch drew from the data order: the usable ones and the bad ones."""
    usable = int(batch["input_ids"].shape[0]) if "input_ids" in batch else 0
    return usable + int(batch.get("n_bad", 0))


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
    def __init__(
        self,
        *,
        config: Config,
        model: nn.Module,
        batches,
        env: distributed.DistEnv,
    ) -> None:
        self.config = config
        self.model = model
        self.batches = batches  # engine.batches.MicroBatches: iterable, .position, .skip_to()
        self.env = env
        self.optimizer = build_optimizer(model, config.optim)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        out = Path(config.train.output_dir)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(out / "metrics.jsonl", enabled=env.is_main)
        self.progress = Progress(init_from=checkpoint.start_from(config))
        self.recent_bad: list[str] = []  # this rank's last bad samples, for the error message
        self.saved_step: int | None = None  # the step of the checkpoint that holds the current state

    # --- resume ------------------------------------------------------------------------------

    def maybe_resume(self) -> None:
        """Continue from output_dir's latest complete checkpoint (train.resume), or start at step 0."""
        path = checkpoint.latest_checkpoint(self.config.train.output_dir) if self.config.train.resume else None
        if path is None:
            self.metrics.truncate_after(0)
            return
        saved = checkpoint.load_checkpoint(path, model=self.model, optimizer=self.optimizer, env=self.env)
        positions = saved.get("data_positions") or [saved.get("data_position", 0)]
        self.progress = Progress(
            **{k: v for k, v in saved.items() if k in Progress.__dataclass_fields__ and k != "init_from"},
            init_from=saved.get("init_from") or self.progress.init_from,
        )
        self.progress.data_position = int(positions[self.env.rank])
        self.batches.skip_to(self.progress.data_position)
        self.saved_step = self.progress.step
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
            model=self.model,
            optimizer=self.optimizer,
            config=self.config,
            step=progress.step,
            progress=record,
            env=self.env,
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
                loss_sum = self._accumulate(micro, counts.target_tokens)
                grad_norm = self._clip()
                lr = lr_at(self.progress.step, self.config.optim, cfg.max_steps)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self.progress.step += 1
                elapsed = time.perf_counter() - started
                last = {
                    "step": self.progress.step,
                    "loss": loss_sum / max(counts.target_tokens, 1),
                    "lr": lr,
                    "grad_norm": grad_norm,
                    "target_tokens": counts.target_tokens,
                    "bad_samples": self.progress.bad_samples,
                    "samples_seen": self.progress.samples_seen,
                    "step_time_s": elapsed,
                }
                self.metrics.write(last)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
                elif self.env.is_main and self.progress.step % max(cfg.log_every, 1) == 0:
                    logger.info("step %d: loss %.4f lr %.2e", self.progress.step, last["loss"], lr)
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
        """Target tokens, bad samples, samples and starved ranks of this step over all ranks:
        one all-reduce."""
        local = [
            sum(count_targets(b) for b in micro),
            sum(int(b.get("n_bad", 0)) for b in micro),
            sum(count_samples(b) for b in micro),
            int(any(b.get("starved", False) for b in micro)),
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
        # DDP and FSDP average gradients over ranks; scale back up so the result is the
        # gradient of (sum of token losses over all ranks) / (target tokens over all ranks).
        scale = self.env.world_size / max(global_tokens, 1)
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        for i, batch in enumerate(micro):
            distributed.set_gradient_sync(self.model, i == len(micro) - 1)
            batch = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            loss, n = self.model(batch)
            (loss * n * scale).backward()
            loss_sum += loss.detach().double() * n
        total = distributed.all_reduce_sum(loss_sum)
        return float(total.item())

    def _clip(self) -> float:
        clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)
