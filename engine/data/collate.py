"""Samples -> token sequences with image placeholders -> padded batches (docs/architecture.md).

The prompt is split at `<ImageHere>`; `n_image_tokens` placeholder ids go in its place, with
`image_token_mask` True there, and the connector's output fills those positions. Labels are
-100 everywhere except the answer and its EOS. A sample that cannot be used (missing or
unreadable image, prompt too long) is returned as `{"bad": reason}` for the trainer to count.
"""

from __future__ import annotations

import random

import torch

from engine.data.images import ImageLoadError, load_image
from engine.data.prompts import IMAGE_PLACEHOLDER, build_prompt
from engine.data.readers import Sample

IGNORE_INDEX = -100


def encode_prompt(tokenizer, prompt: str, n_image_tokens: int) -> tuple[list[int], list[bool]]:
    """Token ids of a prompt with exactly one BOS and `n_image_tokens` placeholder positions."""
    text = prompt[len("<s>"):] if prompt.startswith("<s>") else prompt
    before, sep, after = text.partition(IMAGE_PLACEHOLDER)
    if not sep:
        raise ValueError(f"prompt has no {IMAGE_PLACEHOLDER}: {prompt!r}")
    first = tokenizer(before, add_special_tokens=False)["input_ids"]
    rest = tokenizer(after, add_special_tokens=False)["input_ids"]
    placeholder = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
    ids = [tokenizer.bos_token_id] + first + [placeholder] * n_image_tokens + rest
    mask = [False] * (1 + len(first)) + [True] * n_image_tokens + [False] * len(rest)
    return ids, mask


class VLMDataset(torch.utils.data.Dataset):
    def __init__(
        self,
        samples: list[Sample],
        tokenizer,
        *,
        image_size: int,
        n_image_tokens: int,
        template: str = "minigptv2",
        max_length: int = 512,
        seed: int = 0,
        train: bool = True,
        short_prompt_prob: float = 0.0,
    ) -> None:
        self.samples, self.tokenizer = samples, tokenizer
        self.image_size, self.n_image_tokens = image_size, n_image_tokens
        self.template, self.max_length = template, max_length
        self.seed, self.train, self.short_prompt_prob = seed, train, short_prompt_prob

    def __len__(self) -> int:
        return len(self.samples)

    def prompt(self, index: int) -> str:
        sample = self.samples[index]
        # Seeded by the index, so the drawn prompt form is the same after a resume.
        rng = random.Random(self.seed * 1_000_003 + index) if self.train else None
        return build_prompt(sample.task, sample.question, self.template, rng, self.short_prompt_prob)

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            pixels = load_image(sample.image_path, self.image_size)
        except ImageLoadError as e:
            return {"bad": str(e), "index": index}
        ids, mask = encode_prompt(self.tokenizer, self.prompt(index), self.n_image_tokens)
        if len(ids) >= self.max_length:
            return {"bad": f"{sample.image_path}: prompt of {len(ids)} tokens exceeds data.max_length", "index": index}
        item = {"pixel_values": pixels, "index": index}
        if not self.train:
            item.update(input_ids=torch.tensor(ids), image_token_mask=torch.tensor(mask))
            return item
        answer = self.tokenizer(" " + sample.answer.strip(), add_special_tokens=False)["input_ids"]
        answer = (answer + [self.tokenizer.eos_token_id])[: self.max_length - len(ids)]
        item["input_ids"] = torch.tensor(ids + answer)
        item["labels"] = torch.tensor([IGNORE_INDEX] * len(ids) + answer)
        item["image_token_mask"] = torch.tensor(mask + [False] * len(answer))
        return item


def collate(items: list[dict], pad_token_id: int) -> dict:
    """Right-padded training batch; bad items are dropped and counted."""
    good = [it for it in items if "bad" not in it]
    bad = [it["bad"] for it in items if "bad" in it]
    if not good:
        return {"n_bad": len(bad), "bad": bad}
    length = max(len(it["input_ids"]) for it in good)
    batch = {
        "pixel_values": torch.stack([it["pixel_values"] for it in good]),
        "input_ids": torch.full((len(good), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(good), length, dtype=torch.long),
        "labels": torch.full((len(good), length), IGNORE_INDEX, dtype=torch.long),
        "image_token_mask": torch.zeros(len(good), length, dtype=torch.bool),
    }
    for row, it in enumerate(good):
        n = len(it["input_ids"])
        batch["input_ids"][row, :n] = it["input_ids"]
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = it["labels"]
        batch["image_token_mask"][row, :n] = it["image_token_mask"]
    batch["n_bad"], batch["bad"] = len(bad), bad
    return batch


def generation_batch(items: list[dict], pad_token_id: int) -> dict:
    """Left-padded prompts for greedy decoding (so every row's next token is at the end)."""
    length = max(len(it["input_ids"]) for it in items)
    batch = {
        "pixel_values": torch.stack([it["pixel_values"] for it in items]),
        "input_ids": torch.full((len(items), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(items), length, dtype=torch.long),
        "image_token_mask": torch.zeros(len(items), length, dtype=torch.bool),
        "index": [it["index"] for it in items],
    }
    for row, it in enumerate(items):
        n = len(it["input_ids"])
        batch["input_ids"][row, length - n:] = it["input_ids"]
        batch["attention_mask"][row, length - n:] = 1
        batch["image_token_mask"][row, length - n:] = it["image_token_mask"]
    return batch
