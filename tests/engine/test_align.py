"""align: the fresh vision side learns, without the LLM, to place each image's tokens near the LLM's
embeddings of its caption's words (engine/align.py), before training; a resumed run skips it."""

import logging
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pefomed.engine.align import align_to_captions, caption_scores, contrastive_loss, image_texts, word_embeddings
from pefomed.engine.build import build_model, embedding_rms
from pefomed.engine.checkpoint import VISION_FILE, latest_checkpoint
from pefomed.engine.config import ConfigError, load_config
from pefomed.engine.data.sources import load_run_tokenizer, load_samples
from pefomed.engine.session import train_from_config
from pefomed.train.demo import for_family

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.random_init=true", "model.llm=tiny", "model.vision=tiny", "model.image_size=32", "lora.r=4",
        "lora.alpha=8", "lora.dropout=0.0", "model.llm_overrides={vocab_size: 300}", "optim.lr=2e-4",
        "optim.connector_lr=1e-3", "train.device=cpu", "model.dtype=float32"]  # fmt: skip


def config(tmp_path: Path, *extra: str):
    data = tmp_path / "data"
    return load_config(ROOT / "configs/demo.yaml", [
        *TINY, f"data.train=[{{kind: synthetic, path: {data}, split: train}}]",
        f"data.eval=[{{kind: synthetic, path: {data}, split: test}}]", f"model.tokenizer={data}/tokenizer",
        f"align.data=[{{kind: caption, path: {data}, split: train}}]", "data.synthetic_train=120",
        "data.synthetic_test=4", "train.progress_bar=false", "train.micro_batch_size=4", *extra,
    ])  # fmt: skip


def test_caption_scores_match_a_float64_reference():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 5, 8, generator=g) * 3
    words = torch.nn.functional.normalize(torch.randn(4, 6, 8, generator=g, dtype=torch.float64), dim=-1)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6, [1, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.float64)
    got = caption_scores(tokens, words.float(), mask.float())
    for i in range(3):
        for j in range(4):
            cosines = []
            for w in range(6):
                if mask[j, w]:
                    cosines.append(max(
                        float(tokens[i, t].double() @ words[j, w] / tokens[i, t].double().norm()) for t in range(5)))
            assert got[i, j].item() == pytest.approx(sum(cosines) / len(cosines), abs=1e-6)


def test_contrastive_loss_is_the_symmetric_cross_entropy_of_the_diagonal():
    scores = torch.randn(4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    t = 0.07
    rows = [-math.log(math.exp(scores[i, i] / t) / sum(math.exp(scores[i, k] / t) for k in range(4))) for i in range(4)]
    cols = [-math.log(math.exp(scores[i, i] / t) / sum(math.exp(scores[k, i] / t) for k in range(4))) for i in range(4)]
    assert contrastive_loss(scores, t).item() == pytest.approx((sum(rows) + sum(cols)) / 8, rel=1e-12)


def test_word_embeddings_are_the_tables_rows_normalized_and_an_empty_caption_is_refused():
    class Words:
        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    table = torch.randn(10, 4, generator=torch.Generator().manual_seed(2))
    words, mask = word_embeddings(["a bb", "ccc"], Words(), table)
    assert mask.tolist() == [[1, 1], [1, 0]]
    assert torch.allclose(words[0, 1], table[2] / table[2].norm())
    assert torch.equal(words[1, 1], torch.zeros(4))
    with pytest.raises(ValueError, match="caption 1 is empty"):
        word_embeddings(["a", ""], Words(), table)


def test_an_images_text_is_its_caption_or_its_questions_and_answers():
    from pefomed.engine.data.readers import Sample

    samples = [Sample("a.png", "caption", None, "A red circle."), Sample("b.png", "vqa", "is there a square?", "yes"),
               Sample("b.png", "vqa", "how many objects are there?", "2"), Sample("c.png", "report", None, " Clear. ")]
    assert image_texts(samples) == {"a.png": "A red circle.", "b.png": "is there a square? yes how many objects are there? 2",
                                    "c.png": "Clear."}


@pytest.mark.parametrize("train_vision", [True, False])
def test_alignment_trains_only_the_vision_side_and_learns_to_pick_each_images_caption(tmp_path, train_vision):
    cfg = config(tmp_path, f"model.train_vision={str(train_vision).lower()}")
    load_samples(cfg.data.train, cfg)  # generates the synthetic set, captions included
    samples = load_samples(cfg.align.data, cfg)
    tokenizer = load_run_tokenizer(cfg)
    torch.manual_seed(0)
    model = build_model(cfg, "cpu")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = align_to_captions(model, samples, tokenizer, steps=60, batch_size=16, lr=3e-3, temperature=0.05,
                               image_size=32, seed=0)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(("connector.", "vit.")) for k in changed)
    assert any(k.startswith("vit.") for k in changed) == train_vision
    assert result.last_loss < result.first_loss
    assert result.images == len({s.image_path for s in samples})
    assert result.retrieval > 4 / 16  # chance is 1/16
    # The output is scaled to the embeddings' RMS on the alignment images.
    from pefomed.engine.data.images import load_image

    pixels = torch.stack([load_image(s.image_path, 32) for s in samples[:256]])
    with torch.no_grad():
        rms = model.connector(model.encode_images(pixels)).pow(2).mean().sqrt().item()
    assert rms == pytest.approx(embedding_rms(model.llm), rel=1e-4)
    assert all(p.grad is None for p in model.parameters())


def test_a_run_aligns_once_and_resumes_exactly_without_aligning_again(tmp_path, caplog):
    def run(out, steps):
        cfg = config(tmp_path, f"train.output_dir={tmp_path / out}", f"train.max_steps={steps}", "train.save_every=2",
                     "model.train_vision=true", "align.steps=5", "align.batch_size=8")
        train_from_config(cfg)

    with caplog.at_level(logging.INFO, logger="pefomed.engine.session"):
        run("straight", 3)
        run("resumed", 2)
        caplog.clear()
        run("resumed", 3)  # from its step_2 checkpoint
    assert "align: skipped, the run resumes from its checkpoint" in caplog.text
    straight, resumed = latest_checkpoint(tmp_path / "straight"), latest_checkpoint(tmp_path / "resumed")
    for name in ("projection.safetensors", VISION_FILE):
        a, b = load_file(str(straight / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("extra", "fields"),
    [
        (["align.data=[]"], r"align\.data.*align\.steps=0"),
        (["model.arch=idefics2", "model.llm=tiny-idefics2"], r"align\.steps.*model\.arch=idefics2"),
        (["model.projection_checkpoint=p.safetensors", "model.connector_init=default"],
         r"align\.steps.*model\.projection_checkpoint"),
        (["train.strategy=fsdp2", "model.connector_init=default"], r"align\.steps.*train\.strategy=fsdp2.*single or ddp"),
        (["align.batch_size=1"], r"align\.batch_size=1 is out of range"),
        (["align.data=[{kind: nope, path: x}]"], r"align\.data\[0\]\.kind='nope'"),
    ],
)
def test_align_refuses_what_it_cannot_do(tmp_path, extra, fields):
    with pytest.raises(ConfigError, match=fields):
        config(tmp_path, "align.steps=5", *extra)


def test_the_demo_moves_the_alignment_captions_with_the_family(tmp_path):
    cfg = load_config(ROOT / "configs/demo_smollm2.yaml")
    assert cfg.align.steps > 0
    moved = for_family(cfg, "shapes")
    assert [s.path for s in moved.align.data] == [f"{s.path}_shapes" for s in cfg.align.data]
