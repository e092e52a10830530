"""Prompts, the demo tokenizer, the dataset and collate: label masking, image span, one BOS,
truncation, bad samples, generation batches."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
from transformers import AutoTokenizer

from pefomed.engine.data import synthetic
from pefomed.engine.data.collate import (
    IGNORE_INDEX,
    VLMDataset,
    collate,
    encode_answer,
    encode_prompt,
    generation_batch,
    prompt_for_generation,
)
from pefomed.engine.data.images import load_image
from pefomed.engine.data.prompts import CAPTION_INSTRUCTIONS, build_prompt
from pefomed.engine.data.readers import Sample, read_dataset
from pefomed.engine.data.tokenizer import build_demo_tokenizer, load_tokenizer

N_IMG = 5


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    synthetic.generate(root, n_train=60, n_test=12, image_size=32, seed=3)
    build_demo_tokenizer(synthetic.corpus(root), root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def tok(demo):
    return load_tokenizer(demo / "tokenizer")


@pytest.fixture(scope="module")
def samples(demo):
    return read_dataset("vqa_rad", demo, "train")


def test_minigptv2_prompt_text():
    assert build_prompt("vqa", "is it?") == (
        "<s>[INST] <Img><ImageHere></Img> [vqa] Based on the image, respond to this question with a short answer: is it? [/INST]"
    )
    assert build_prompt("vqa", "is it?", "expert").startswith(
        "<s>[INST] <Img><ImageHere></Img> [vqa] You are an expert radiologist evaluating the case,"
    )
    assert build_prompt("vqa", "is it?", rng=random.Random(0), short_prompt_prob=1.0) == (
        "<s>[INST] <Img><ImageHere></Img> [vqa] is it? [/INST]"
    )
    assert build_prompt("caption") == f"<s>[INST] <Img><ImageHere></Img> [caption] {CAPTION_INSTRUCTIONS[0]} [/INST]"
    assert "[report]" in build_prompt("report")
    with pytest.raises(ValueError, match="prompt template 'nope'"):
        build_prompt("vqa", "q", "nope")
    with pytest.raises(ValueError, match="task 'chat'"):
        build_prompt("chat", "q")


def short_fraction_bounds(p: float, n: int) -> tuple[float, float]:
    """4.5 standard deviations of a Binomial(n, p) share: a correct draw falls outside once in ~150,000 runs."""
    sd = (p * (1 - p) / n) ** 0.5
    return p - 4.5 * sd, p + 4.5 * sd


@pytest.mark.parametrize("p", [0.0, 0.3, 0.7, 1.0])
def test_short_prompt_is_drawn_with_its_probability(p):
    n = 3000
    draws = [build_prompt("vqa", "q?", rng=random.Random(i), short_prompt_prob=p) for i in range(n)]
    short = sum(d.endswith("[vqa] q? [/INST]") for d in draws)
    low, high = short_fraction_bounds(p, n)
    assert low * n <= short <= high * n
    # every draw is one of the two forms, whatever p
    long_form = build_prompt("vqa", "q?")
    assert all(d in (long_form, "<s>[INST] <Img><ImageHere></Img> [vqa] q? [/INST]") for d in draws)


DRAW_IN_A_FRESH_PROCESS = """
import json, sys
from pefomed.engine.data.collate import VLMDataset
from pefomed.engine.data.readers import Sample
samples = [Sample(f"{i}.png", "vqa" if i % 3 else "caption", "is it?" if i % 3 else None, "yes") for i in range(600)]
ds = VLMDataset(samples, None, 32, 5, seed=int(sys.argv[1]), short_prompt_prob=0.5)
ds.set_epoch(int(sys.argv[2]))
print(json.dumps([ds.prompt(i) for i in range(len(samples))]))
"""


def prompts_in_a_fresh_process(seed: int, epoch: int, hash_seed: str) -> list[str]:
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    done = subprocess.run([sys.executable, "-c", DRAW_IN_A_FRESH_PROCESS, str(seed), str(epoch)], env=env,
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout)


def test_prompt_draw_depends_on_seed_epoch_and_index_only():
    samples = [Sample(f"{i}.png", "vqa" if i % 3 else "caption", "is it?" if i % 3 else None, "yes") for i in range(600)]
    ds = VLMDataset(samples, None, 32, 5, seed=1, short_prompt_prob=0.5)
    here = [ds.prompt(i) for i in range(len(samples))]
    # the same seed and epoch in another process, with another str-hash seed, draws the same prompts
    assert prompts_in_a_fresh_process(1, 0, "12345") == here
    # each draw is a fair coin per vqa sample and a uniform pick from the caption pool
    vqa = [p for i, p in enumerate(here) if i % 3]
    low, high = short_fraction_bounds(0.5, len(vqa))
    assert low * len(vqa) <= sum("[vqa] is it?" in p for p in vqa) <= high * len(vqa)
    captions = [p for i, p in enumerate(here) if i % 3 == 0]
    picks = [sum(text in p for p in captions) for text in CAPTION_INSTRUCTIONS]
    assert sum(picks) == len(captions)
    low, high = short_fraction_bounds(1 / len(CAPTION_INSTRUCTIONS), len(captions))
    assert all(low * len(captions) <= k <= high * len(captions) for k in picks), picks
    # another seed or another epoch draws differently: at about half of the 400 vqa samples
    other_seed = [VLMDataset(samples, None, 32, 5, seed=2, short_prompt_prob=0.5).prompt(i) for i in range(len(samples))]
    ds.set_epoch(1)
    other_epoch = [ds.prompt(i) for i in range(len(samples))]
    for other in (other_seed, other_epoch):
        changed = sum(a != b for a, b in zip(here, other) if "[vqa]" in a)
        assert 100 < changed < 300, changed
    # reading an item does not advance anything: the draw for index 7 is the same before and after others
    ds.set_epoch(0)
    assert [ds.prompt(7)] + [ds.prompt(i) for i in range(20)] + [ds.prompt(7)] == [here[7]] + here[:20] + [here[7]]


def test_demo_tokenizer_loads_with_autotokenizer_offline(demo):
    tok = AutoTokenizer.from_pretrained(str(demo / "tokenizer"), local_files_only=True)
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == ("<s>", "</s>", "<unk>", "<pad>")
    assert len({tok.bos_token_id, tok.eos_token_id, tok.unk_token_id, tok.pad_token_id}) == 4
    ids = tok("<Img><ImageHere></Img>", add_special_tokens=False)["input_ids"]
    assert ids.count(tok.convert_tokens_to_ids("<ImageHere>")) == 1 and tok.unk_token_id not in ids
    config = json.loads((demo / "tokenizer" / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == 1024
    # like LLaMA's, it adds BOS itself when asked for special tokens
    assert tok("is there a lesion?")["input_ids"][0] == tok.bos_token_id


def test_demo_tokenizer_knows_every_prompt_word(tok, demo):
    questions = [s.question for s in read_dataset("vqa_rad", demo, "test")]
    for task in ("vqa", "caption", "report"):
        for template in ("minigptv2", "expert", "short"):
            for instruction_draw in range(8):
                prompt = build_prompt(task, questions[0], template, random.Random(instruction_draw), 0.5)
                ids = tok(prompt, add_special_tokens=False)["input_ids"]
                assert tok.unk_token_id not in ids, prompt
                assert tok.convert_tokens_to_ids(task) in ids  # the task tag is a word of its own
    for text in questions + [c.answer for c in read_dataset("caption", demo, "test")]:
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text


def test_load_tokenizer_errors_and_pad_fallback(demo, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "none")
    folder = tmp_path / "nopad"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_text((demo / "tokenizer" / name).read_text())
    config = json.loads((folder / "tokenizer_config.json").read_text())
    del config["pad_token"]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(folder)
    assert tok.pad_token == "<unk>"


def test_labels_cover_exactly_the_answer_and_eos(tok, samples):
    ds = VLMDataset(samples, tok, 32, N_IMG, "minigptv2", 128, 0, True)
    for i in range(10):
        item = ds[i]
        ids, labels = item["input_ids"], item["labels"]
        target = labels != IGNORE_INDEX
        # the labelled tokens are a suffix: the answer then EOS
        assert target.nonzero().min() == len(ids) - int(target.sum())
        assert tok.decode(labels[target].tolist()) == f"{samples[i].answer.lower()} </s>"
        assert torch.equal(labels[target], ids[target])


def test_image_span_and_one_bos(tok, samples):
    ds = VLMDataset(samples, tok, 32, N_IMG, "minigptv2", 128, 0, True)
    item = ds[0]
    ids, mask = item["input_ids"].tolist(), item["image_token_mask"]
    assert int(mask.sum()) == N_IMG
    where = mask.nonzero().flatten().tolist()
    assert where == list(range(where[0], where[0] + N_IMG))  # one contiguous span
    assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    # Reference: the tokenizer on the whole text, with the image span cut out, gives the same ids.
    text = ds.prompt(0).replace("<ImageHere>", " ") + " " + samples[0].answer + "</s>"
    reference = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[: where[0]] + ids[where[-1] + 1:] == reference
    assert tok.convert_ids_to_tokens(ids[where[0] - 1]) == ">" and tok.convert_ids_to_tokens(ids[where[-1] + 1]) == "</"


def test_answer_ids_follow_the_prompt_with_a_byte_level_tokenizer(tmp_path):
    """Byte-level BPE folds the space into the answer's first token: decoding the whole sequence
    must give back the text, and the answer ids must decode to ' answer'."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    corpus = ["[INST] <Img></Img> [vqa] how many lesions? [/INST] three", "yes no left right"] * 5
    raw.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>", "<unk>", "<ImageHere>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>",
                                  additional_special_tokens=["<ImageHere>"])
    answer = encode_answer(tok, "</Img> [vqa] how many lesions? [/INST]", "three")
    assert answer[-1] == tok.eos_token_id
    assert tok.decode(answer[:-1]) == " three"
    assert tok.decode(tok(" three", add_special_tokens=False)["input_ids"]) == " three"
    ids, mask = encode_prompt(tok, "<s>[INST] <Img><ImageHere></Img> [vqa] how many lesions? [/INST]", 3)
    kept = [t for t, m in zip(ids, mask) if not m]
    assert tok.decode(kept + answer) == "<s>[INST] <Img></Img> [vqa] how many lesions? [/INST] three</s>"


def test_truncation_cuts_the_answer_never_the_prompt(tok, demo):
    caption = read_dataset("caption", demo, "train")[:1]
    # the training prompt draws its caption instruction from a seeded pool: measure that one
    prompt_len = len(encode_prompt(tok, VLMDataset(caption, tok, 32, N_IMG).prompt(0), N_IMG)[0])
    item = VLMDataset(caption, tok, 32, N_IMG, max_length=prompt_len + 3)[0]
    assert len(item["input_ids"]) == prompt_len + 3
    labelled = item["labels"][item["labels"] != IGNORE_INDEX].tolist()
    full = tok(" " + caption[0].answer, add_special_tokens=False)["input_ids"]
    assert labelled == full[:3]
    assert int(item["image_token_mask"].sum()) == N_IMG
    bad = VLMDataset(caption, tok, 32, N_IMG, max_length=prompt_len)[0]
    assert "max_length" in bad["bad"] and bad["index"] == 0 and caption[0].image_path in bad["bad"]


def test_collate_pads_right_and_counts_bad_samples(tok, samples, tmp_path):
    chosen = [Sample(s.image_path, s.prompt_kind, s.question, s.answer, dict(s.meta)) for s in samples[:4]]
    chosen[1].image_path = str(tmp_path / "missing.png")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    chosen[3].image_path = str(broken)
    ds = VLMDataset(chosen, tok, 32, N_IMG, max_length=128)
    items = [ds[i] for i in range(4)]
    assert items[1]["bad"].startswith(str(tmp_path / "missing.png")) and "not found" in items[1]["bad"]
    assert "broken.png" in items[3]["bad"]
    batch = collate(items, tok.pad_token_id)
    assert batch["n_bad"] == 2 and len(batch["bad"]) == 2
    assert batch["input_ids"].shape[0] == 2 and batch["pixel_values"].shape == (2, 3, 32, 32)
    assert batch["image_token_mask"].dtype == torch.bool and batch["labels"].dtype == torch.long
    assert batch["image_token_mask"].sum(1).tolist() == [N_IMG, N_IMG]
    for row, source in enumerate((items[0], items[2])):
        n = len(source["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (batch["input_ids"].shape[1] - n)
        assert torch.equal(batch["input_ids"][row, :n], source["input_ids"])
        assert (batch["input_ids"][row, n:] == tok.pad_token_id).all() and (batch["labels"][row, n:] == IGNORE_INDEX).all()
    torch.testing.assert_close(batch["pixel_values"][1], load_image(chosen[2].image_path, 32))
    assert collate([items[1]], tok.pad_token_id) == {"n_bad": 1, "bad": [items[1]["bad"]]}


def test_generation_batches_are_left_padded(tok, samples):
    ds = VLMDataset(samples, tok, 32, N_IMG, train=False)
    long_q = Sample(samples[0].image_path, "vqa", "which organ contains the lesion in this image?", "lung")
    items = [ds[0], VLMDataset([long_q], tok, 32, N_IMG, train=False)[0]]
    assert "labels" not in items[0]
    batch = generation_batch(items, tok.pad_token_id)
    last = tok.convert_tokens_to_ids("]")
    assert (batch["input_ids"][:, -1] == last).all()  # every prompt ends with [/INST] at the right edge
    assert batch["image_token_mask"].sum(1).tolist() == [N_IMG, N_IMG]
    short = len(items[0]["input_ids"])
    assert batch["attention_mask"][0].tolist() == [0] * (batch["input_ids"].shape[1] - short) + [1] * short
    prompts = [build_prompt("vqa", samples[0].question), build_prompt("vqa", long_q.question)]
    again = prompt_for_generation(tok, batch["pixel_values"], prompts, N_IMG)
    for key in ("input_ids", "attention_mask", "image_token_mask"):
        assert torch.equal(again[key], batch[key])
