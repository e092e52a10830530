"""Diagnostics behind docs/demo.md's shapes ablations 16-20: the ones the demo command cannot express.

Each subcommand either writes a variant of the shapes data, or runs `pefomed` with one change
made in-process; the demo itself, its data and its scoring are untouched. Run from the checkout:

    python docs/demo_ablations.py features                  # what varies in the shapes features
    python docs/demo_ablations.py flat-data                 # data/x_flat_shapes: one background grey
    python docs/demo_ablations.py caption-data              # data/x_captq_shapes: caption in the question
    python docs/demo_ablations.py align --steps 1500 --out runs/aligned_shapes.pt
    python docs/demo_ablations.py run --centre-pixels -- demo --config configs/demo_smollm2.yaml --family shapes ...
    python docs/demo_ablations.py run --aligned runs/aligned_shapes.pt -- demo --config ... --family shapes ...

`align` trains the fresh tower and grouped projection alone, without the LLM, to match the
LLM's own input embeddings of each image's caption words (a FILIP-style token max-similarity
contrastive loss over batches of 64 images), then scales the projection's output to the
embeddings' RMS; `run --aligned` starts the demo from those weights.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

SHAPES = Path("data/demo_smollm2_shapes")


def features(root: Path, n: int = 400) -> None:
    """How the fresh tower's features (behind ln_vision) vary across the first `n` training images:
    the share of their across-image energy that all tokens of an image share, and the share that
    the image's mean pixel value explains linearly."""
    from pefomed.engine.build import build_model
    from pefomed.engine.config import load_config
    from pefomed.engine.data.images import load_image

    torch.manual_seed(0)
    cfg = load_config("configs/demo_smollm2.yaml")
    model = build_model(cfg).eval()
    names = sorted(p.name for p in (root / "images").glob("*_train_*.png"))[:n]
    pixels = torch.stack([load_image(root / "images" / name, cfg.model.image_size) for name in names])
    with torch.no_grad():
        f = model.encode_images(pixels).double()  # [n, tokens, width]
    varying = f - f.mean(0, keepdim=True)  # what differs from the same token of the average image
    shared = varying.mean(1, keepdim=True)  # the part every token of an image shares
    brightness = pixels.double().mean((1, 2, 3))
    b = brightness - brightness.mean()
    flat = varying.reshape(len(names), -1)
    explained = (b[:, None] * ((flat * b[:, None]).sum(0) / (b * b).sum())[None]).pow(2).sum() / flat.pow(2).sum()
    print(f"{root}: {len(names)} images; across-image share of the feature energy "
          f"{varying.pow(2).sum() / f.pow(2).sum():.3f}, of that shared by all tokens of an image "
          f"{shared.pow(2).sum() * f.shape[1] / varying.pow(2).sum():.3f}, explained by mean brightness {explained:.3f}")


def flat_data(out: Path) -> None:
    """The shapes family with every background at one grey (0.45); same scenes, same questions."""
    from pefomed.engine.data import synthetic, synthetic_shapes

    drawn = synthetic_shapes.sample_scene
    synthetic_shapes.sample_scene = lambda rng: dataclasses.replace(drawn(rng), background=0.45)
    synthetic.generate(out, n_train=3000, n_test=300, image_size=64, seed=0, family="shapes")


def caption_data(out: Path) -> None:
    """The shapes questions with their image's caption written in front of them (an upper bound:
    the LLM given in words what the image shows)."""
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "images").exists():
        os.symlink((SHAPES / "images").resolve(), out / "images")
    for name in ("dataset.json", "captions_train.json", "captions_test.json"):
        shutil.copy(SHAPES / name, out / name)
    for split in ("train", "test"):
        captions = {c["image"]: c["caption"] for c in json.loads((SHAPES / f"captions_{split}.json").read_text())}
        items = json.loads((SHAPES / f"{split}set.json").read_text())
        for item in items:
            item["question"] = f"{captions[item['image_name']]} {item['question']}"
        (out / f"{split}set.json").write_text(json.dumps(items, indent=1) + "\n")


def align(out: Path, steps: int, loss_kind: str = "contrastive", root: Path = SHAPES, batch: int = 64, lr: float = 1e-3,
          temperature: float = 0.05) -> None:
    """`contrastive`: each image against the batch's captions, scored by the mean over a caption's
    words of its best token's cosine. `words`: for every token id of the captions' vocabulary, is it
    in this image's caption? (binary cross-entropy on the best token's cosine, a bias per word)."""
    from transformers import AutoTokenizer

    from pefomed.engine.build import build_model
    from pefomed.engine.config import load_config
    from pefomed.engine.data.images import load_image

    torch.manual_seed(0)
    cfg = load_config("configs/demo_smollm2.yaml")
    model = build_model(cfg)
    tokenizer = AutoTokenizer.from_pretrained(cfg.model.llm)
    captions = json.loads((root / "captions_train.json").read_text())
    pixels = torch.stack([load_image(root / "images" / c["image"], cfg.model.image_size) for c in captions])
    table = model.llm.get_input_embeddings().weight.detach()
    ids = [tokenizer(c["caption"], add_special_tokens=False)["input_ids"] for c in captions]
    words = torch.zeros(len(ids), max(map(len, ids)), table.shape[1])
    mask = torch.zeros(words.shape[:2])
    for i, row in enumerate(ids):
        words[i, : len(row)], mask[i, : len(row)] = table[row], 1.0
    words = F.normalize(words, dim=-1)
    vocab = sorted({t for row in ids for t in row})
    present = torch.zeros(len(ids), len(vocab))
    for i, row in enumerate(ids):
        present[i, [vocab.index(t) for t in set(row)]] = 1.0
    vocab_words = F.normalize(table[vocab], dim=-1)
    bias = torch.zeros(len(vocab), requires_grad=True)
    params = [*model.vit.parameters(), *model.connector.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW([*params, bias], lr=lr, weight_decay=0.0)
    start = time.time()
    for step in range(steps):
        pick = torch.randint(len(ids), (batch,))
        tokens = F.normalize(model.connector(model._vit_features(pixels[pick])), dim=-1)
        if loss_kind == "words":
            best = torch.einsum("itd,wd->iwt", tokens, vocab_words).max(-1).values  # [image, word]
            logits = best / temperature + bias
            loss = F.binary_cross_entropy_with_logits(logits, present[pick])
            score = logits @ (2 * present[pick] - 1).T  # agreement with each caption, for the retrieval figure
        else:
            best = torch.einsum("itd,jwd->ijwt", tokens, words[pick]).max(-1).values  # each word's best token
            score = (best * mask[pick]).sum(-1) / mask[pick].sum(-1)  # [image, caption]
            loss = (F.cross_entropy(score / temperature, torch.arange(batch))
                    + F.cross_entropy(score.T / temperature, torch.arange(batch))) / 2
        target = torch.arange(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 250 == 0 or step == steps - 1:
            hit = (score.argmax(1) == target).float().mean().item()
            print(f"step {step}: loss {loss.item():.3f}, in-batch retrieval {hit:.2f}, {time.time() - start:.0f} s")
    with torch.no_grad():
        rms = model.connector(model._vit_features(pixels[:256])).pow(2).mean().sqrt()
        last = [m for m in model.connector.modules() if isinstance(m, torch.nn.Linear)][-1]
        factor = (table.pow(2).mean().sqrt() / rms).item()
        last.weight.mul_(factor)
        if last.bias is not None:
            last.bias.mul_(factor)
    state = {f"vit.{k}": v for k, v in model.vit.state_dict().items()}
    state |= {f"connector.{k}": v for k, v in model.connector.state_dict().items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, out)
    print(f"wrote {out}; projection output scaled by {factor:.4f} to the embeddings' RMS")


def run(args: list[str], centre_pixels: bool, aligned: str | None) -> int:
    from pefomed.engine import build
    from pefomed.engine.data import images

    if centre_pixels:  # each image minus its own mean over pixels and channels
        to_tensor = images.to_tensor
        images.to_tensor = lambda img, size: (lambda x: x - x.mean())(to_tensor(img, size))
    if aligned:
        build_model = build.build_model

        def with_aligned(cfg, *a, **k):
            model = build_model(cfg, *a, **k)
            state = torch.load(aligned, weights_only=True)
            model.vit.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("vit.")})
            model.connector.load_state_dict({k[10:]: v for k, v in state.items() if k.startswith("connector.")})
            print(f"the tower and projection start from {aligned}", flush=True)
            return model

        build.build_model = with_aligned
    from pefomed.cli import main

    return main(args)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("features").add_argument("--data", type=Path, default=SHAPES)
    sub.add_parser("flat-data").add_argument("--out", type=Path, default=Path("data/x_flat_shapes"))
    sub.add_parser("caption-data").add_argument("--out", type=Path, default=Path("data/x_captq_shapes"))
    a = sub.add_parser("align")
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--steps", type=int, default=1500)
    a.add_argument("--loss", choices=("contrastive", "words"), default="contrastive")
    a.add_argument("--data", type=Path, default=SHAPES, help="a synthetic folder with captions_train.json")
    r = sub.add_parser("run")
    r.add_argument("--centre-pixels", action="store_true")
    r.add_argument("--aligned")
    r.add_argument("rest", nargs=argparse.REMAINDER)
    ns = parser.parse_args()
    if ns.command == "features":
        features(ns.data)
    elif ns.command == "flat-data":
        flat_data(ns.out)
    elif ns.command == "caption-data":
        caption_data(ns.out)
    elif ns.command == "align":
        align(ns.out, ns.steps, ns.loss, ns.data)
    else:
        sys.exit(run([x for x in ns.rest if x != "--"], ns.centre_pixels, ns.aligned))
