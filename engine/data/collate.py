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

The batch also carries what the model's hot path would otherwise find on the device (each a
host sync there): `image_rows` (the placeholders' flat row indices), `target_index` and
`target_ids` (the rows whose next token is a target, and that token), and `image_keys` (a hash of
each image's preprocessed pixels, for the frozen tower's feature cache; None under random
augmentation). With `pack_tokens`, `collate` packs the samples into rows of at most that many
tokens (first-fit decreasing) with per-sample `position_ids`, and `cu_seqlens`, `max_seqlen` and
`seq_lens` describe the segments (docs/hot_path.md).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence

import torch

from pefomed.engine.data.images import ImageLoadError, load_image, open_image, to_tensor
from pefomed.engine.data.prompts import BOS_TEXT, IMAGE_PLACEHOLDER, build_prompt, check_template
from pefomed.engine.data.readers import Sample
from pefomed.models.llama import TargetRows

IGNORE_INDEX = -100


def placeholder_id(tokenizer) -> int:
    """The id written at image positions (its embedding is replaced, so any valid id works)."""
    token_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else tokenizer.pad_token_id
    if token_id is None:
        raise ValueError("the tokenizer has neither an unk nor a pad token for the image placeholders")
    return token_id


def image_key(pixels: torch.Tensor) -> str:
    """A key for the frozen tower's output on these pixels: a hash of the preprocessed tensor
    (shape, dtype and bytes), so the same file under the same preprocessing gets the same key and
    any change of either gets another."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{tuple(pixels.shape)}/{pixels.dtype}/".encode())
    h.update(pixels.detach().cpu().contiguous().view(torch.uint8).numpy().data)
    return h.hexdigest()


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def encode_prompt(
    tokenizer, prompt: str, n_image_tokens: int, image_span: tuple[list[int], list[bool]] | None = None
) -> tuple[list[int], list[bool]]:
    """Token ids of a prompt with exactly one BOS and `n_image_tokens` placeholder positions.

    `image_span` (ids, mask) replaces the run of placeholders when the model frames its image
    tokens with others (Idefics2's `<fake_token_around_image>`); mask is True where the image goes.
    """
    text = prompt[len(BOS_TEXT):] if prompt.startswith(BOS_TEXT) else prompt
    before, sep, after = text.partition(IMAGE_PLACEHOLDER)
    if not sep or IMAGE_PLACEHOLDER in after:
        raise ValueError(f"the prompt must hold exactly one {IMAGE_PLACEHOLDER}: {prompt!r}")
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    first, rest = _ids(tokenizer, before), _ids(tokenizer, after)
    span, span_mask = image_span or ([placeholder_id(tokenizer)] * n_image_tokens, [True] * n_image_tokens)
    ids = bos + first + span + rest
    mask = [False] * (len(bos) + len(first)) + span_mask + [False] * len(rest)
    return ids, mask


def encode_answer(tokenizer, prompt_tail: str, answer: str, end_id: int | None = None) -> list[int]:
    """The answer's token ids as they come after the prompt, followed by EOS (or `end_id`, the
    token that ends the model's turn, Idefics2's `<end_of_utterance>`).

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
    return answer_ids + [tokenizer.eos_token_id if end_id is None else end_id]


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
        augment=None,  # engine.data.augment.Augment: crop and laterality-aware flip, training only
        # models.idefics2.Idefics2Inputs (engine.build.model_inputs): the model's own image
        # processing, image token span, chat format and end-of-turn token; None: one square image.
        inputs=None,
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
        self.augment = augment if train else None
        self.inputs = inputs
        self.image_span = inputs.image_span(tokenizer) if inputs is not None else None
        self.end_id = inputs.end_id(tokenizer) if inputs is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def prompt(self, index: int, sample: Sample | None = None) -> str:
        sample = self.samples[index] if sample is None else sample
        rng = random.Random(f"{self.seed}/{self.epoch}/{index}") if self.train else None
        chat = {"chat": self.inputs.chat} if self.inputs is not None else {}
        return build_prompt(sample.prompt_kind, sample.question, self.template, rng, self.short_prompt_prob, **chat)

    def _bad(self, index: int, reason: str) -> dict:
        return {"bad": f"{self.samples[index].image_path}: {reason}", "index": index}

    def __getitem__(self, index: int) -> dict:
        sample = self.samples[index]
        try:
            if self.augment is None:
                pixels = (load_image(sample.image_path, self.image_size) if self.inputs is None
                          else self.inputs.process(open_image(sample.image_path)))
            else:  # a flip may swap the sample's sides, so the prompt and answer come from its result
                image, sample = self.augment(open_image(sample.image_path), sample, seed=self.seed,
                                             epoch=self.epoch, index=index)
                pixels = to_tensor(image, self.image_size) if self.inputs is None else self.inputs.process(image)
        except ImageLoadError as e:
            return {"bad": str(e), "index": index}
        prompt = self.prompt(index, sample)
        ids, mask = encode_prompt(self.tokenizer, prompt, self.n_image_tokens, self.image_span)
        if len(ids) >= self.max_length:
            return self._bad(index, f"the prompt alone is {len(ids)} tokens ({self.n_image_tokens} of them image "
                                    f"positions), not below data.max_length={self.max_length}; raise max_length")
        item = {"pixel_values": pixels, "index": index}
        if self.augment is None and isinstance(pixels, torch.Tensor):
            item["image_key"] = image_key(pixels)  # a random crop would make every draw another image
        if not self.train:
            item.update(input_ids=torch.tensor(ids, dtype=torch.long), image_token_mask=torch.tensor(mask))
            return item
        tail = prompt.partition(IMAGE_PLACEHOLDER)[2]
        answer = encode_answer(self.tokenizer, tail, sample.answer, self.end_id)[: self.max_length - len(ids)]
        item["input_ids"] = torch.tensor(ids + answer, dtype=torch.long)
        item["labels"] = torch.tensor([IGNORE_INDEX] * len(ids) + answer, dtype=torch.long)
        item["image_token_mask"] = torch.tensor(mask + [False] * len(answer))
        return item


def _pixels(good: list[dict]) -> dict:
    """The batch's images: stacked squares, or (Idefics2: per sample a list of images of their
    own sizes) `pixel_values [B, n, 3, H, W]` padded with `pixel_attention_mask [B, n, H, W]`."""
    if isinstance(good[0]["pixel_values"], torch.Tensor):
        return {"pixel_values": torch.stack([it["pixel_values"] for it in good])}
    from pefomed.models.idefics2 import pad_images

    return pad_images([it["pixel_values"] for it in good])


def _split_bad(items: list[dict]) -> tuple[list[dict], list[str]]:
    return [it for it in items if "bad" not in it], [it["bad"] for it in items if "bad" in it]


def collate(items: list[dict], pad_token_id: int, pack_tokens: int | None = None) -> dict:
    """Right-padded training batch in the Batch contract; bad items dropped, counted in `n_bad`.

    With `pack_tokens`, the samples are packed into rows of at most that many tokens instead
    (`pack`). When every item is bad the batch holds only `n_bad` and `bad`.
    """
    good, bad = _split_bad(items)
    if not good:
        return {"n_bad": len(bad), "bad": bad}
    if pack_tokens is not None:
        batch = pack(good, pad_token_id, pack_tokens)
        batch["n_bad"], batch["bad"] = len(bad), bad
        return batch
    length = max(len(it["input_ids"]) for it in good)
    batch = {
        **_pixels(good),
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
    batch.update(hot_path_indices(batch))
    batch["image_keys"] = [it.get("image_key") for it in good]
    return batch


def hot_path_indices(batch: dict) -> dict:
    """`image_rows`, `target_index`, `target_ids` of a training batch, found here on the host so
    that the model's forward need not find them on the device (see models/vlm.py)."""
    targets = TargetRows.from_labels(batch["labels"], batch.get("position_ids"))
    return {
        "image_rows": batch["image_token_mask"].reshape(-1).nonzero().squeeze(1),
        "target_index": targets.index,
        "target_ids": targets.ids,
    }


def pack_rows(lengths: Sequence[int], pack_tokens: int) -> list[list[int]]:
    """First-fit decreasing: the sample indices of each row, rows of at most `pack_tokens` tokens.

    Longest samples first, each into the first row with room; within a row the samples keep
    their order in the micro-batch. Deterministic, so a resumed run packs the same rows.
    """
    too_long = [n for n in lengths if n > pack_tokens]
    if too_long:
        raise ValueError(
            f"a sample of {max(too_long)} tokens does not fit data.pack_tokens={pack_tokens}; raise "
            "data.pack_tokens to at least data.max_length"
        )
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(pack_tokens - lengths[i])
    return [sorted(row) for row in rows]


def pack(good: list[dict], pad_token_id: int, pack_tokens: int) -> dict:
    """Samples end to end in rows of at most `pack_tokens` tokens (padded to the longest row).

    Positions restart at 0 for each sample; a row's padding tail is a segment of its own (so the
    segments cover every token, as flash-attn's varlen kernel wants, and padding attends only to
    padding). `cu_seqlens` (int32) are the segment offsets into the flattened rows, `seq_lens`
    and `max_seqlen` the same on the host. `pixel_values`, `index` and `image_keys` follow the
    packed order of the samples, which is the order of their image rows.
    """
    if not isinstance(good[0]["pixel_values"], torch.Tensor):
        raise ValueError("data.packing packs one square image per sample; this model's inputs cannot be packed")
    lengths = [len(it["input_ids"]) for it in good]
    rows = pack_rows(lengths, pack_tokens)
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    batch = {
        "input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(shape, dtype=torch.long),
        "labels": torch.full(shape, IGNORE_INDEX, dtype=torch.long),
        "image_token_mask": torch.zeros(shape, dtype=torch.bool),
        "position_ids": torch.zeros(shape, dtype=torch.long),
    }
    order, seq_lens = [], []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            it, n = good[i], lengths[i]
            end = start + n
            batch["input_ids"][r, start:end] = it["input_ids"]
            batch["attention_mask"][r, start:end] = 1
            batch["labels"][r, start:end] = it["labels"]
            batch["image_token_mask"][r, start:end] = it["image_token_mask"]
            batch["position_ids"][r, start:end] = torch.arange(n)
            order.append(i)
            seq_lens.append(n)
            start = end
        if start < width:
            batch["position_ids"][r, start:] = torch.arange(width - start)
            seq_lens.append(width - start)
    offsets = [0]
    for n in seq_lens:
        offsets.append(offsets[-1] + n)
    batch.update(
        pixel_values=torch.stack([good[i]["pixel_values"] for i in order]),
        cu_seqlens=torch.tensor(offsets, dtype=torch.int32),
        max_seqlen=max(seq_lens),
        seq_lens=seq_lens,
        index=[good[i].get("index") for i in order],
        image_keys=[good[i].get("image_key") for i in order],
    )
    batch.update(hot_path_indices(batch))
    return batch


def generation_batch(items: list[dict], pad_token_id: int) -> dict:
    """Left-padded prompts for greedy decoding, so every row's next token comes at the end."""
    good, bad = _split_bad(items)
    if not good:
        raise ValueError(f"no usable prompt to generate from ({len(bad)} bad: {bad[:3]})")
    length = max(len(it["input_ids"]) for it in good)
    batch = {
        **_pixels(good),
        "input_ids": torch.full((len(good), length), pad_token_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(good), length, dtype=torch.long),
        "image_token_mask": torch.zeros(len(good), length, dtype=torch.bool),
        "index": [it.get("index") for it in good],
        "image_keys": [it.get("image_key") for it in good],
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
