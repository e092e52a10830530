"""The training loop: AdamW, warmup + cosine, token-normalized accumulation, clipping, logging.

Gradient accumulation is normalized by the number of target tokens in the whole optimizer step,
summed across ranks (as torchtune does), not by the number of micro-steps: medical answers run
from one token ("yes") to three hundred (a report), and a per-micro-step mean would weight a
one-word answer like a whole report.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from pefomed.engine import checkpoint, distributed
from pefomed.engine.config import Config, OptimConfig
from pefomed.errors import UserError


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
        raise ValueError("no trainable parameters: check lora.target_modules")
    groups = [{"params": decay, "weight_decay": optim.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=optim.lr, betas=optim.betas, eps=optim.eps)


def count_targets(batch: dict) -> int:
    labels = batch["labels"]
    return int((labels[:, 1:] != -100).sum())


@dataclass
class Progress:
    """What a resumed run needs besides weights, optimizer and RNG."""

    step: int = 0
    data_position: int = 0  # samples this rank has drawn from its shard of the data order
    samples_seen: int = 0
    bad_samples: int = 0
    bad_examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class MetricsLog:
    """Append-only JSONL of per-step metrics; a resumed run drops the lines past its step."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.exists():
            return
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

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
        log=print,
    ) -> None:
        self.config = config
        self.model = model
        self.batches = batches  # engine.batches.MicroBatches: iterable, .position, .skip_to()
        self.env = env
        self.log = log if env.is_main else (lambda *_: None)
        self.optimizer = build_optimizer(model, config.optim)
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        out = Path(config.train.output_dir)
        if env.is_main:
            out.mkdir(parents=True, exist_ok=True)
        self.metrics = MetricsLog(out / "metrics.jsonl", enabled=env.is_main)
        self.progress = Progress()

    # --- resume ------------------------------------------------------------------------------

    def maybe_resume(self) -> None:
        if not self.config.train.resume:
            return
        path = checkpoint.latest_checkpoint(self.config.train.output_dir)
        if path is None:
            return
        saved = checkpoint.load_checkpoint(path, model=self.model, optimizer=self.optimizer, env=self.env)
        self.progress = Progress(**{k: v for k, v in saved.items() if k in Progress.__dataclass_fields__})
        self.batches.skip_to(self.progress.data_position)
        self.metrics.truncate_after(self.progress.step)
        self.log(f"resumed from {path} at step {self.progress.step}")

    def save(self) -> Path:
        path = checkpoint.save_checkpoint(
            model=self.model,
            optimizer=self.optimizer,
            config=self.config,
            step=self.progress.step,
            progress=self.progress.as_dict(),
            env=self.env,
        )
        self.log(f"saved {path}")
        return path

    # --- the loop ----------------------------------------------------------------------------

    def train(self) -> dict:
        cfg = self.config.train
        self.maybe_resume()
        stream = iter(self.batches)
        bar = self._progress_bar()
        last = {}
        while self.progress.step < cfg.max_steps:
            started = time.perf_counter()
            micro = [self._next_batch(stream) for _ in range(cfg.grad_accum)]
            loss_sum, n_tokens = self._accumulate(micro)
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
                "loss": loss_sum / max(n_tokens, 1),
                "lr": lr,
                "grad_norm": grad_norm,
                "target_tokens": n_tokens,
                "bad_samples": self.progress.bad_samples,
                "step_time_s": elapsed,
            }
            self.metrics.write(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.4f}", lr=f"{lr:.2e}")
            elif self.progress.step % max(cfg.log_every, 1) == 0:
                self.log(f"step {self.progress.step}: loss {last['loss']:.4f} lr {lr:.2e}")
            if cfg.save_every and self.progress.step % cfg.save_every == 0 and self.progress.step < cfg.max_steps:
                self.save()
        if bar is not None:
            bar.close()
        self.save()
        return last

    def _progress_bar(self):
        if not (self.env.is_main and self.config.train.progress_bar):
            return None
        from tqdm import tqdm

        return tqdm(total=self.config.train.max_steps, initial=self.progress.step, desc="train", dynamic_ncols=True)

    def _next_batch(self, stream: Iterator[dict]) -> dict:
        batch = next(stream)
        self.progress.data_position = self.batches.position
        n_bad = int(batch.get("n_bad", 0))
        self.progress.samples_seen += int(batch["input_ids"].shape[0]) + n_bad
        if n_bad:
            self.progress.bad_samples += n_bad
            messages = list(batch.get("bad", []))
            for message in messages:
                self.log(f"skipped a bad sample: {message}")
            self.progress.bad_examples = (self.progress.bad_examples + messages)[-5:]
            self._check_bad_fraction()
        return batch

    def _check_bad_fraction(self) -> None:
        limit = self.config.data.max_bad_fraction
        seen = max(self.progress.samples_seen, 1)
        # A few bad files early on should not stop a run: judge the fraction after 20 samples.
        if seen >= 20 and self.progress.bad_samples / seen > limit:
            self.save()
            raise TooManyBadSamples(
                f"{self.progress.bad_samples} of {seen} samples could not be used "
                f"(more than data.max_bad_fraction={limit}); last ones: {self.progress.bad_examples}. "
                f"Training so far is saved in {self.config.train.output_dir}/checkpoints; fix or "
                "remove those files, or raise data.max_bad_fraction, and rerun to resume."
            )

    def _accumulate(self, micro: list[dict]) -> tuple[float, int]:
        device = self.env.device
        local_tokens = sum(count_targets(b) for b in micro)
        global_tokens = int(distributed.all_reduce_sum(torch.tensor(local_tokens, device=device)).item())
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
        return float(total.item()), global_tokens

    def _clip(self) -> float:
        clip = self.config.optim.grad_clip
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, clip if clip > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):
            norm = norm.full_tensor()
        return float(norm)
