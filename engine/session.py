"""From a resolved config to a finished run: process group, model, data, strategy, trainer."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from pefomed.engine import distributed
from pefomed.engine.batches import MicroBatches
from pefomed.engine.build import DTYPES, build_model, n_image_tokens
from pefomed.engine.config import Config, DatasetSpec
from pefomed.engine.trainer import Trainer


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def ensure_synthetic(spec: DatasetSpec, cfg: Config, is_main: bool = True) -> None:
    """Generate the embedded demo dataset on first use (deterministic, so every rank agrees)."""
    from pefomed.engine.data import synthetic

    root = Path(spec.path)
    if not (root / "testset.json").exists() and is_main:
        synthetic.generate(
            root,
            n_train=cfg.data.synthetic_train,
            n_test=cfg.data.synthetic_test,
            image_size=cfg.model.image_size,
            seed=cfg.train.seed,
        )
    if not (root / "tokenizer").exists() and is_main:
        from pefomed.engine.data.tokenizer import build_demo_tokenizer

        build_demo_tokenizer(synthetic.corpus(root), root / "tokenizer")
    distributed.barrier()


def load_samples(specs: list[DatasetSpec], cfg: Config, is_main: bool = True) -> list:
    from pefomed.engine.data import readers

    samples = []
    for spec in specs:
        if spec.kind == "synthetic":
            ensure_synthetic(spec, cfg, is_main)
            samples += readers.read_vqa_rad(spec.path, split=spec.split)
        else:
            samples += readers.read_dataset(spec.kind, spec.path, split=spec.split, image_root=spec.image_root)
    if not samples:
        raise ValueError("data.train names no samples: add at least one dataset")
    return samples


def build_dataset(samples: list, cfg: Config, tokenizer, *, train: bool):
    from pefomed.engine.data.collate import VLMDataset

    return VLMDataset(
        samples,
        tokenizer,
        image_size=cfg.model.image_size,
        n_image_tokens=n_image_tokens(cfg),
        template=cfg.data.template,
        max_length=cfg.data.max_length,
        seed=cfg.train.seed,
        train=train,
        short_prompt_prob=cfg.data.short_prompt_prob if train else 0.0,
    )


def load_run_tokenizer(cfg: Config):
    from pefomed.engine.data.tokenizer import load_tokenizer

    return load_tokenizer(cfg.model.tokenizer or cfg.model.llm)


def fit_vocab_to_tokenizer(cfg: Config, tokenizer) -> None:
    """A random-init LLM (the demo) gets exactly the tokenizer's vocabulary."""
    if cfg.model.random_init and "vocab_size" not in cfg.model.llm_overrides:
        cfg.model.llm_overrides["vocab_size"] = len(tokenizer)


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
