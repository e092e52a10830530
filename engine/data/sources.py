"""Where a run's samples, tokenizer and datasets come from, for training and evaluation alike.

Training (`engine/session.py`) and evaluation (`evaluate/run.py`) both read data through these
functions, so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from pefomed.engine import distributed
from pefomed.engine.build import model_inputs, n_image_tokens
from pefomed.engine.config import Config, DatasetSpec


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
    """The samples of every dataset in `specs`, each read at its split; a dataset that gives none
    is an error, since a run or an evaluation over nothing is never what was asked for."""
    from pefomed.engine.data import readers

    if not specs:
        raise readers.DataError("no dataset to read: add one to data.train (or data.eval), e.g. "
                                "[{kind: vqa_rad, path: /data/vqa_rad, split: train}]")
    samples = []
    for spec in specs:
        if spec.kind == "synthetic":
            ensure_synthetic(spec, cfg, is_main)
        found = readers.read_dataset(spec.kind, spec.path, split=spec.split, image_root=spec.image_root,
                                     allow_outside_root=cfg.data.allow_outside_root)
        if not found:
            raise readers.DataError(f"{spec.path}: the {spec.split!r} split of {spec.kind} holds no samples; "
                                    "check the split and the dataset file")
        mark_restricted(found, spec)
        samples += found
    return samples


def mark_restricted(samples: list, spec: DatasetSpec) -> None:
    """Mark every sample of a `restricted: true` dataset as credentialed data.

    The flag travels with each sample into predictions.jsonl, where the GPT judge refuses to send
    restricted items to an endpoint that is not local. It can only be added here: a reader that
    marks its own samples (MIMIC-CXR) keeps them marked, and only the judge config's explicit
    `restricted_data_ok` statement lets them go to another endpoint.
    """
    if spec.restricted:
        for sample in samples:
            sample.meta["restricted"] = True


def build_dataset(samples: list, cfg: Config, tokenizer, *, train: bool):
    from pefomed.engine.data.augment import make_augment
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
        augment=make_augment(cfg.data.augment, cfg.model.image_size) if train else None,
        inputs=model_inputs(cfg),  # Idefics2's own image processing and image token span; None otherwise
    )


def load_run_tokenizer(cfg: Config):
    from pefomed.engine.data.tokenizer import load_tokenizer

    return load_tokenizer(cfg.model.tokenizer or cfg.model.llm)


def fit_vocab_to_tokenizer(cfg: Config, tokenizer) -> None:
    """A random-init LLM (the demo) gets exactly the tokenizer's vocabulary."""
    if cfg.model.random_init and "vocab_size" not in cfg.model.llm_overrides:
        cfg.model.llm_overrides["vocab_size"] = len(tokenizer)
