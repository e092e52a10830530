"""From a resolved config to a finished run: process group, model, data, strategy, trainer."""

from __future__ import annotations

import copy
import logging
import random

import numpy as np
import torch

from pefomed.engine import checkpoint, distributed
from pefomed.engine.batches import MicroBatches
from pefomed.engine.build import DTYPES, build_model
from pefomed.engine.config import Config
from pefomed.engine.data.sources import build_dataset, fit_vocab_to_tokenizer, load_run_tokenizer, load_samples
from pefomed.engine.trainer import Trainer

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_config(cfg: Config) -> Config:
    """The config to build the model from.

    A run that will resume from its own checkpoint does not need the files it started from
    (`model.projection_checkpoint`, `model.adapter_checkpoint`): the checkpoint's trainable
    weights replace them, so a stage-2 run resumes even after stage 1's folder is gone.
    """
    if not (cfg.train.resume and checkpoint.start_from(cfg)):
        return cfg
    if checkpoint.latest_checkpoint(cfg.train.output_dir) is None:
        return cfg
    logger.info("resuming: the checkpoint's adapter and projection replace %s", ", ".join(checkpoint.start_from(cfg)))
    return checkpoint.self_contained(copy.deepcopy(cfg))


def align_vision(model, cfg: Config, tokenizer, env: distributed.DistEnv) -> None:
    """`align:` (engine/align.py) on a freshly built model; a run that will resume from its own
    checkpoint skips it, since the checkpoint's connector and tower replace what it would train.
    Every rank aligns alike (same seed, same data); DDP then starts from rank 0's weights."""
    a = cfg.align
    if a.steps == 0:
        return
    if tokenizer is None:
        raise ValueError("align.steps > 0: build_parallel_model needs the run's tokenizer")
    if cfg.train.resume and checkpoint.latest_checkpoint(cfg.train.output_dir) is not None:
        logger.info("align: skipped, the run resumes from its checkpoint")
        return
    from pefomed.engine.align import align_to_captions

    samples = load_samples(a.data, cfg, env.is_main)
    result = align_to_captions(model, samples, tokenizer, steps=a.steps, batch_size=a.batch_size, lr=a.lr,
                               temperature=a.temperature, image_size=cfg.model.image_size, seed=cfg.train.seed,
                               progress=env.is_main and cfg.train.progress_bar)
    if env.is_main:
        logger.info(
            "align: %d steps on %d images with their texts in %.0f s, loss %.3f -> %.3f, in-batch retrieval %.2f; "
            "connector output scaled by %.4f", result.steps, result.images, result.seconds, result.first_loss,
            result.last_loss, result.retrieval, result.output_scale)


def build_parallel_model(cfg: Config, env: distributed.DistEnv, tokenizer=None):
    """The model under `train.strategy`, and the runtime that steps it (None: the trainer's
    `TorchRuntime`). fsdp2 builds on the meta device and loads each rank's shards
    (`engine.sharded_loading`); deepspeed hands the model to `deepspeed.initialize`. With
    `align.steps` (single and ddp only) the fresh vision side is aligned before the strategy
    wraps the model; that needs the run's `tokenizer`."""
    strategy, dtype = cfg.train.strategy, DTYPES[cfg.model.dtype]
    distributed.check_strategy(strategy, env)
    model_cfg = build_config(cfg)
    if strategy == "fsdp2":
        from pefomed.engine import sharded_loading

        why_not = sharded_loading.supports_sharded_loading(model_cfg)
        if why_not is None:
            return sharded_loading.build_sharded_model(
                model_cfg, env, activation_checkpointing=cfg.train.activation_checkpointing != "none"
            ), None
        logger.info("fsdp2: %s is built whole on every rank, then sharded", why_not)
    model = build_model(model_cfg, env.device)
    align_vision(model, cfg, tokenizer, env)
    model = distributed.apply_strategy(
        model,
        strategy,
        env,
        dtype,
        activation_checkpointing=cfg.train.activation_checkpointing,
        ac_every=cfg.train.ac_every,
    )
    if strategy == "deepspeed":
        from pefomed.engine.deepspeed_strategy import DeepSpeedRuntime

        return model, DeepSpeedRuntime(model, cfg, env)
    return model, None


def train_from_config(cfg: Config) -> dict:
    env = distributed.init_distributed(cfg.train.device, cfg.train.strategy)
    with distributed.leaving_together():
        result = run_training(cfg, env)  # the model, its device mesh and the trainer die with that frame
    return result


def run_training(cfg: Config, env: distributed.DistEnv) -> dict:
    seed_everything(cfg.train.seed)
    samples = load_samples(cfg.data.train, cfg, env.is_main)
    tokenizer = load_run_tokenizer(cfg)
    fit_vocab_to_tokenizer(cfg, tokenizer)
    model, runtime = build_parallel_model(cfg, env, tokenizer)
    if cfg.train.compile:  # after the strategy: its hooks stay eager around each compiled layer
        from pefomed.engine.compile import compile_layers

        compile_layers(model)
    from pefomed.engine.data.collate import collate

    dataset = build_dataset(samples, cfg, tokenizer, train=True)
    batches = MicroBatches(
        dataset,
        lambda items: collate(
            items,
            pad_token_id=tokenizer.pad_token_id,
            pack_tokens=cfg.data.pack_tokens if cfg.data.packing else None,
        ),
        micro_batch_size=cfg.train.micro_batch_size,
        seed=cfg.train.seed,
        rank=env.rank,
        world_size=env.world_size,
        num_workers=cfg.data.num_workers,
        pin_memory=env.device.type == "cuda",
    )
    # Dropout masks and prompt draws differ per rank but are reproducible per rank.
    torch.manual_seed(cfg.train.seed + env.rank)
    trainer = Trainer(config=cfg, model=model, batches=batches, env=env, runtime=runtime)
    result = trainer.train()
    if runtime is not None:  # DeepSpeed's: its hooks would keep the engine and its groups alive
        runtime.close()
    return result
