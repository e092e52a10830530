"""Samples -> token sequences with image placeholders -> padded batches (docs/architecture.md).

A sequence is `BOS, prompt-before-image, n_image_tokens placeholders, prompt-after-image,
answer, EOS`. The prompt text is split at `<ImageHere>`; the placeholders carry the tokenizer's
unk id (pad where there is no unk) and `image_token_mask` is True exactly there: the
connector's output replaces their embeddings. Labels are -100 everywhere except the answer
tokens and the EOS. Exactly one BOS is emitted: the template's literal `<s>` is dropped and the
pieces are tokenized without special tokens, so a tokenizer that adds BOS itself (LLaMA's) does
not double it.

Too long a sequence loses the end of its answer, never the prompt or the image span; a sample
whose prompt alone reaches `max_length` is a bad sample. `VLMDataset.__getitem__` never raises
for one sample's problem (missing or unreadable image, prompt too long): it returns
`{"bad": "<file>: <reason>", "index": i}`, and `collate` drops such items and reports them as
`n_bad` and `bad`, for the trainer to count against `data.max_bad_fraction`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from pefomed.engine.data.images import ImageLoadError, load_image
from pefomed.engine.data.prompts import BOS_TEXT, IMAGE_PLACEHOLDER, build_prompt, check_template
from pefomed.engine.data.readers import Sample

IGNORE_INDEX = -100


def placeholder_id(tokenizer) -> int:
    """The id written at image positions (its embedding is replaced, so any valid id works)."""
    token_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
    if token_id is None:
        raise ValueError("the tokenizer has neither an unk nor a pad token for the image placeholders")
    return token_id


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_prompt(tokenizer, prompt: str, n_image_tokens: int) -> tuple[list[int], list[bool]]:
    """Token ids of a prompt with exactly one BOS and `n_image_tokens` placeholder positions."""
    text = prompt[len(BOS_TEXT):] if prompt.startswith(BOS_TEXT) else prompt
    before, sep, after = text.partition(IMAGE_PLACEHOLDER)
    if not sep or IMAGE_PLACEHOLDER in after:
        raise ValueError(f"the prompt must hold exactly one {IMAGE_PLACEHOLDER}: {prompt!r}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    first, rest = _ids(tokenizer, before), _ids(tokenizer, after)
    ids = bos + first + [placeholder_id(tokenizer)] * n_image_tokens + rest
    mask = [False] * (len(bos) + len(first)) + [True] * n_image_tokens + [False] * len(rest)
    return ids, mask


def encode_answer(tokenizer, prompt_tail: str, answer: str) -> list[int]:
    """The answer's token ids as they come after the prompt, followed by EOS.

    Tokenizing the answer on its own can differ from how it follows `[/INST]`: sentencepiece
    adds a word-start marker and byte-level BPE folds the space into the first token. So the
    answer ids are the suffix of the tokenized `prompt_tail + " " + answer` beyond the tokenized
    prompt tail; when the prompt's last token merges with the answer (no clean prefix), the
    answer is tokenized alone.
    """
    answer = answer.strip()
    tail_ids = _ids(tokenizer, prompt_tail)
    joined = _ids(tokenizer, f"{prompt_tail} {answer}") if answer else tail_ids
    if joined[: len(tail_ids)] == tail_ids:
        answer_ids = joined[len(tail_ids):]
    else:
        answer_ids = _ids(tokenizer, answer)
    return answer_ids + [tokenizer.eos_token_id]


class VLMDataset(torch.utils.data.Dataset):
    """Samples as model inputs: `{pixel_values [3,S,S], input_ids, labels, image_token_mask}`.

    With `train=False` an item is the prompt only (`pixel_values, input_ids, image_token_mask`)
    for generation, with the fixed long template. With `train=True` the short `[vqa] {q}` form is
    drawn with probability `short_prompt_prob`, from an RNG seeded by (seed, epoch, index), so a
    resumed run draws the same prompts; call `set_epoch` to vary the draw between epochs.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        tokenizer,
        image_size: int,
        n_image_tokens: int,
        template: str = "minigptv2",
        max_length: int = 512,
        seed: int = 0,
        train: bool = True,
        short_prompt_prob: float = 0.0,
    ) -> None:
        if n_image_tokens < 1:
            raise ValueError(f"n_image_tokens={n_image_tokens}: the model needs at least one image position")
        if not 0.0 <= short_prompt_prob <= 1.0:
            raise ValueError(f"short_prompt_prob={short_prompt_prob}: expected a probability in [0, 1]")
        self.samples, self.tokenizer = list(samples), tokenizer
        self.image_size, self.n_image_tokens = image_size, n_image_tokens
        self.template, self.max_length = check_template(template), max_length
        self.seed, self.train, self.short_prompt_prob = seed, train, short_prompt_prob
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prompt(self, index: int) -> str:
        sample = self.samples[index]
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}") if self.train else None
        return build_prompt(sample.prompt_kind, sample.question, self.template, rng, self.short_prompt_prob)

    def _bad(self, index: int, reason: str) -> dict:
        return {"bad": f"{self.samples[index].image_path}: {reason}", "index": index}

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            pixels = load_image(sample.image_path, self.image_size)
        except ImageLoadError as e:
            return {"bad": str(e), "index": index}
        prompt = self.prompt(index)
        ids, mask = encode_prompt(self.tokenizer, prompt, self.n_image_tokens)
        if len(ids) >= self.max_length:
            return self._bad(index, f"the prompt alone is {len(ids)} tokens ({self.n_image_tokens} of them image "
                                    f"positions), not below data.max_length={self.max_length}; raise max_length")
        item = {"pixel_values": pixels, "index": index}
        if not self.train:
            item.update(input_ids=torch.tensor(ids, dtype=torch.long), image_token_mask=torch.tensor(mask))
            return item
        tail = prompt.partition(IMAGE_PLACEHOLDER)[2]
        answer = encode_answer(self.tokenizer, tail, sample.answer)[: self.max_length - len(ids)]
        item["input_ids"] = torch.tensor(ids + answer, dtype=torch.long)
        item["labels"] = torch.tensor([IGNORE_INDEX] * len(ids) + answer, dtype=torch.long)
        item["image_token_mask"] = torch.tensor(mask + [False] * len(answer))
        return item


def _split_bad(items: list[dict]) -> tuple[list[dict], list[str]]:
    return [it for it in items if "bad" not in it], [it["bad"] for it in items if "bad" in it]


def collate(items: list[dict], pad_token_id: int) -> dict:
    """Right-padded training batch in the Batch contract; bad items dropped, counted in `n_bad`.

    When every item is bad the batch holds only `n_bad` and `bad`.
    """
    good, bad = _split_bad(items)
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
    batch["index"] = [it.get("index") for it in good]
    batch["n_bad"], batch["bad"] = len(bad), bad
    return batch


def generation_batch(items: list[dict], pad_token_id: int) -> dict:
    """Left-padded prompts for greedy decoding, so every row's next token comes at the end."""
    good, bad = _split_bad(items)
    if not good:
        raise ValueError(f"no usable prompt to generate from ({len(bad)} bad: {bad[:3]})")
    length = max(len(it["input_ids"]) for it in good)
    batch = {
        "pixel_values": torch.stack([it["pixel_values"] for it in good]),
        "input_ids": torch.full((len(good), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(good), length, dtype=torch.long),
        "image_token_mask": torch.zeros(len(good), length, dtype=torch.bool),
        "index": [it.get("index") for it in good],
        "n_bad": len(bad),
        "bad": bad,
    }
    for row, it in enumerate(good):
        n = len(it["input_ids"])
        batch["input_ids"][row, length - n:] = it["input_ids"]
        batch["attention_mask"][row, length - n:] = 1
        batch["image_token_mask"][row, length - n:] = it["image_token_mask"]
    return batch


def prompt_for_generation(tokenizer, pixel_values: torch.Tensor, prompts: Sequence[str], n_image_tokens: int) -> dict:
    """The left-padded generation batch for images `[B,3,S,S]` and their full prompt texts
    (from `engine.data.prompts.build_prompt`): pixel_values, input_ids, attention_mask,
    image_token_mask."""
    if pixel_values.dim() != 4 or pixel_values.shape[0] != len(prompts):
        raise ValueError(f"pixel_values {tuple(pixel_values.shape)} must be [B,3,S,S] with B = {len(prompts)} prompts")
    items = []
    for i, prompt in enumerate(prompts):
        ids, mask = encode_prompt(tokenizer, prompt, n_image_tokens)
        items.append({"pixel_values": pixel_values[i], "input_ids": torch.tensor(ids, dtype=torch.long),
                      "image_token_mask": torch.tensor(mask), "index": i})
    return generation_batch(items, tokenizer.pad_token_id)
