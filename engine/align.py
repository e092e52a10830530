"""Align a fresh vision side to the LLM's words before training (`align:` in the config).

A random tower and a fresh connector give image tokens that mean nothing to the frozen LLM, and
the only teacher in VQA training is a one- or two-token answer, back through every layer of the
LLM. Where the answers depend on what the whole image looks like, that is enough; where they
depend on a few tokens of it (which colour, which shape, where), the LLM learns the answers'
priors and never reads the image (docs/demo.md, ablations 14-22). This stage teaches the vision
side first, without the LLM: the connector (and the tower, when `model.train_vision` trains it)
learns to place, for each image, tokens near the LLM's own input embeddings of the words of its
caption, against the other captions of the batch. A VQA set without captions can stand in: an
image's questions and answers are then its text (`image_texts`).

The loss is a token-wise contrastive one (FILIP's late interaction): caption j scores image i by
the mean over its words of the best cosine between that word's embedding and any of the image's
tokens, and a symmetric cross-entropy over the batch asks each image to pick its own caption and
each caption its own image. The LLM runs not at all, so a step costs the tower and one matrix
product. Afterwards the connector's output is scaled to the RMS of the LLM's input embeddings on
the alignment images, as `model.connector_init: match_embeddings` does for a fresh one.

Only what the checkpoint carries is aligned (the connector; the tower only when it trains), so
a resumed run, an evaluation and an export see exactly the aligned weights. A run that resumes
from its own checkpoint skips this stage.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pefomed.engine.build import scale_connector_to_embeddings
from pefomed.engine.data.images import ImageLoadError, load_image

logger = logging.getLogger(__name__)


def word_embeddings(captions: list[str], tokenizer, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit-norm input embeddings of each caption's tokens, `[N, W, D]`, zero-padded, and
    the mask of real tokens `[N, W]`. An empty caption is an error naming it."""
    ids = [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in captions]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(f"caption {empty[0]} is empty: every image of align.data needs a caption with words")
    words = torch.zeros(len(ids), max(map(len, ids)), table.shape[1], dtype=torch.float32)
    mask = torch.zeros(words.shape[:2], dtype=torch.float32)
    for i, row in enumerate(ids):
        words[i, : len(row)] = table[row].float()
        mask[i, : len(row)] = 1.0
    return F.normalize(words, dim=-1), mask


def caption_scores(tokens: torch.Tensor, words: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`[images, captions]`: caption j scores image i by the mean over j's words of the best cosine
    between the word and any of i's tokens. `tokens` [B, T, D] (any norm), `words` [C, W, D]
    unit-norm, `mask` [C, W]."""
    tokens = F.normalize(tokens.float(), dim=-1)
    best = torch.einsum("itd,jwd->ijwt", tokens, words).amax(-1)  # [B, C, W]
    return (best * mask).sum(-1) / mask.sum(-1)


def contrastive_loss(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric cross-entropy of a square score matrix whose diagonal holds the true pairs."""
    target = torch.arange(scores.shape[0], device=scores.device)
    logits = scores / temperature
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@dataclass
class AlignResult:
    steps: int
    images: int  # the distinct images aligned with their texts
    first_loss: float
    last_loss: float
    retrieval: float  # in-batch image -> caption top-1 accuracy over the last 10% of the steps
    output_scale: float
    seconds: float


def image_texts(samples) -> dict[str, str]:
    """Each image's text to align with: its caption or report, or, for a VQA dataset without
    captions, its questions and answers ("is there a red object? no ..."), in the order read. An
    image named by several samples gets their texts joined."""
    texts: dict[str, list[str]] = {}
    for sample in samples:
        text = f"{sample.question} {sample.answer}" if sample.prompt_kind == "vqa" else sample.answer
        texts.setdefault(sample.image_path, []).append(text.strip())
    return {path: " ".join(parts) for path, parts in texts.items()}


def _images(samples, image_size: int) -> tuple[torch.Tensor, list[str]]:
    pixels, captions = [], []
    for path, text in image_texts(samples).items():
        try:
            pixels.append(load_image(path, image_size))
        except ImageLoadError as e:
            logger.warning("align: skipped %s", e)
            continue
        captions.append(text)
    if len(captions) < 2:
        raise ValueError(f"align.data gives {len(captions)} readable images with text; the contrastive "
                         "alignment needs at least 2")
    return torch.stack(pixels), captions


def align_to_captions(model, samples, tokenizer, *, steps: int, batch_size: int, lr: float, temperature: float,
                      image_size: int, seed: int, progress: bool = False) -> AlignResult:
    """Train `model.connector` (and `model.vit` when `model.train_vit`) for `steps` on the images of
    `samples` and their texts (`image_texts`: captions, or a VQA set's questions and answers), then scale the connector's output to the
    embeddings' RMS. The LLM is not touched. Deterministic for a given `seed`."""
    start = time.perf_counter()
    device = next(model.connector.parameters()).device
    pixels, captions = _images(samples, image_size)
    table = model.llm.get_input_embeddings().weight.detach()
    words, mask = word_embeddings(captions, tokenizer, table)
    words, mask = words.to(device), mask.to(device)
    params = [*model.connector.parameters(), *(model.vit.parameters() if model.train_vit else ())]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    batch = min(batch_size, len(captions))
    was_training = model.training
    model.train()
    losses, hits = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=steps, desc="align", dynamic_ncols=True)
    for _ in range(steps):
        pick = torch.randperm(len(captions), generator=generator)[:batch]
        with torch.enable_grad():
            feats = model.encode_images(pixels[pick].to(device))  # with the tower's gradient when it trains
            scores = caption_scores(model.connector(feats), words[pick], mask[pick])
            loss = contrastive_loss(scores, temperature)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        hits.append((scores.detach().argmax(1) == torch.arange(batch, device=device)).float().mean().item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.3f}", retrieval=f"{hits[-1]:.2f}", refresh=False)
    if bar is not None:
        bar.close()
    model.train(was_training)
    optimizer.zero_grad(set_to_none=True)  # the last gradients are not part of the training run
    factor = scale_connector_to_embeddings(model, pixels[:256], "the alignment images")
    tail = max(1, steps // 10)
    return AlignResult(steps=steps, images=len(captions), first_loss=losses[0] if losses else float("nan"),
                       last_loss=sum(losses[-tail:]) / len(losses[-tail:]) if losses else float("nan"),
                       retrieval=sum(hits[-tail:]) / len(hits[-tail:]) if hits else float("nan"),
                       output_scale=factor, seconds=time.perf_counter() - start)
