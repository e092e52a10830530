"""From a resolved config to a finished run: process group, model, data, strategy, trainer."""

from __future__ import annotations

import random

import numpy as np
import torch

from pefomed.engine import distributed
from pefomed.engine.batches import MicroBatches
from pefomed.engine.build import DTYPES, build_model
from pefomed.engine.config import Config
from pefomed.engine.data.sources import build_dataset, fit_vocab_to_tokenizer, load_run_tokenizer, load_samples
from pefomed.engine.trainer import Trainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_from_config(cfg: Config) -> dict:
    env = distributed.init_distributed(cfg.train.device)
    try:
        seed_everything(cfg.train.seed)
        samples = load_samples(cfg.data.train, cfg, env.is_main)
        tokenizer = load_run_tokenizer(cfg)
        fit_vocab_to_tokenizer(cfg, tokenizer)
        model = build_model(cfg, env.device, log=print if env.is_main else (lambda *_: None))
        model = distributed.apply_strategy(model, cfg.train.strategy, env, DTYPES[cfg.model.dtype])
        from pefomed.engine.data.collate import collate

        dataset = build_dataset(samples, cfg, tokenizer, train=True)
        batches = MicroBatches(
            dataset,
            lambda items: collate(items, pad_token_id=tokenizer.pad_token_id),
            micro_batch_size=cfg.train.micro_batch_size,
            seed=cfg.train.seed,
            rank=env.rank,
            world_size=env.world_size,
        )
        # Dropout masks and prompt draws differ per rank but are reproducible per rank.
        torch.manual_seed(cfg.train.seed + env.rank)
        trainer = Trainer(config=cfg, model=model, batches=batches, env=env)
        return trainer.train()
    finally:
        distributed.shutdown_distributed()
