"""evaluate.run / evaluate.ask / evaluate.answers with a tiny random model and a hand-made checkpoint.

The `tiny` fixture (conftest.py) writes the checkpoint folder by hand in the documented format,
with non-zero LoRA B and projection weights so that loading them matters. The reference for every
generated reply is `greedy`, a plain greedy loop on the model that holds those weights in memory:
no KV cache, no padding, one item at a time, the whole sequence recomputed at each step.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pefomed.engine.build import n_image_tokens
from pefomed.engine.data.collate import encode_prompt
from pefomed.engine.data.prompts import build_prompt
from pefomed.engine.data.readers import DataError, Sample
from pefomed.engine.data.sources import load_samples
from pefomed.evaluate import run
from pefomed.evaluate.answers import clean_reply, extract_answer, guess_answer_type

MAX_NEW = 4  # eval.max_new_tokens of the tiny config


def reference_reply(tiny, greedy, image: str, task: str, question: str | None, template: str = "minigptv2",
                    max_new: int = MAX_NEW) -> str:
    return greedy.reply(tiny["model"], tiny["tokenizer"], tiny["cfg"], image, task, question, template, max_new)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- evaluate.run


def test_cli_writes_one_prediction_per_item_and_metrics(tiny, greedy, tmp_path, cli):
    out = tmp_path / "eval"
    code, stdout, _ = cli("eval", "--checkpoint", tiny["run"], "--split", "test", "--out", out)
    assert code == 0
    records = read_jsonl(out / "predictions.jsonl")
    samples = tiny["test"]
    assert len(records) == len(samples) == 10
    for record, sample in zip(records, samples):
        assert record["question"] == sample.question and record["answer"] == sample.answer
        assert record["image_used"] == record["image"] == sample.image_path and "error" not in record
        assert record["prompt"] == "minigptv2"
        expected = reference_reply(tiny, greedy, sample.image_path, "vqa", sample.question)
        assert record["reply"] == expected
        assert record["prediction"] == extract_answer(expected, sample.meta["answer_type"], sample.question)
    metrics = json.loads((out / "metrics.json").read_text())
    exact = metrics["pefomed_exact_match"]
    assert exact["n"] == 10 and exact["n_closed"] + exact["n_open"] == 10
    hits = [r["prediction"] == r["answer"] for r in records]  # synthetic answers are already normalized
    assert exact["overall"] == pytest.approx(sum(hits) / len(hits))
    assert json.loads(stdout)["overall"] == pytest.approx(sum(hits) / len(hits))


def test_batched_generation_equals_one_by_one(tiny, greedy):
    cfg, samples = tiny["cfg"], tiny["test"]
    lengths = {len(s.question) for s in samples[:7]}
    assert len(lengths) > 1, "the batch must mix prompt lengths, so that left padding is exercised"
    model, tok = run.load_model_for_eval(cfg, tiny["step"])
    batched = run.predict(model, tok, samples[:7], cfg, batch_size=7)
    single = run.predict(model, tok, samples[:7], cfg, batch_size=1)
    assert [r["reply"] for r in batched] == [r["reply"] for r in single]
    assert [r["reply"] for r in single] == [reference_reply(tiny, greedy, s.image_path, "vqa", s.question)
                                            for s in samples[:7]]


@pytest.mark.parametrize("n", [2, 3, 5, 17, 64])
def test_derangement_is_deterministic_and_has_no_fixed_point(n):
    perm = run.derangement(n, seed=4)
    assert sorted(perm) == list(range(n))
    assert all(perm[i] != i for i in range(n))
    assert perm == run.derangement(n, seed=4)


def test_derangement_needs_two_items():
    with pytest.raises(ValueError, match="at least 2"):
        run.derangement(1)
    with pytest.raises(DataError, match="two distinct images"):
        run.image_derangement(["a.png", "a.png"])


def test_swap_images_gives_every_question_another_image(tiny, greedy, tmp_path):
    cfg = tiny["cfg"]
    summary = run.evaluate_checkpoint(cfg, tiny["step"], split="test", out_dir=tmp_path, swap_images=True, limit=6)
    records = read_jsonl(tmp_path / "predictions.jsonl")
    assert summary["n"] == len(records) == 6
    assert all(r["image_used"] != r["image"] for r in records)
    mapping = {r["image"]: r["image_used"] for r in records}
    assert all(mapping[r["image"]] == r["image_used"] for r in records), "one image, one replacement"
    assert sorted(mapping.values()) == sorted(mapping), "the replacements are the split's own images"
    assert run.image_derangement([r["image"] for r in records]) == mapping, "the same derangement every run"
    for r in records[:3]:
        assert r["reply"] == reference_reply(tiny, greedy, r["image_used"], "vqa", r["question"])


def test_prompt_variant_and_other_dataset(tiny, greedy, tmp_path):
    cfg, data = tiny["cfg"], tiny["data"]
    summary = run.evaluate_checkpoint(cfg, tiny["run"], split="train", out_dir=tmp_path, prompt="expert",
                                      dataset=f"synthetic:{data}", limit=3)
    records = read_jsonl(tmp_path / "predictions.jsonl")
    train = load_samples(cfg.data.train, cfg)[:3]
    assert summary["n"] == 3 and [r["question"] for r in records] == [s.question for s in train]
    assert all(r["prompt"] == "expert" for r in records)
    for r in records:
        assert r["reply"] == reference_reply(tiny, greedy, r["image"], "vqa", r["question"], template="expert")
    with pytest.raises(ValueError, match="nonsense"):
        run.evaluate_checkpoint(cfg, tiny["run"], split="test", out_dir=tmp_path / "x", prompt="nonsense", limit=1)


def test_the_prompt_is_eval_prompt_not_data_template(tiny, greedy, tmp_path, cli):
    # data.template is what training drew its prompts from; evaluation must use eval.prompt.
    out = tmp_path / "eval"
    code, _, _ = cli("eval", "--checkpoint", tiny["step"], "--out", out, "--limit", 4, "data.template=short",
                     "eval.prompt=expert")
    assert code == 0
    records = read_jsonl(out / "predictions.jsonl")
    expert = [reference_reply(tiny, greedy, r["image"], "vqa", r["question"], template="expert") for r in records]
    short = [reference_reply(tiny, greedy, r["image"], "vqa", r["question"], template="short") for r in records]
    assert expert != short, "the two templates must lead to different replies, or this test shows nothing"
    assert [r["reply"] for r in records] == expert and {r["prompt"] for r in records} == {"expert"}


def _eot_tokenizer(tokenizer_dir: Path, out: Path, token_id: int) -> Path:
    """A copy of the word-level demo tokenizer in which the word with id `token_id` is renamed
    `<|eot_id|>` and made a special token, as LLaMA-3's end of turn is."""
    shutil.copytree(tokenizer_dir, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    (word,) = [w for w, i in vocab.items() if i == token_id]
    del vocab[word]
    vocab["<|eot_id|>"] = token_id
    spec["added_tokens"].append({"id": token_id, "content": "<|eot_id|>", "single_word": False, "lstrip": False,
                                 "rstrip": False, "normalized": False, "special": True})
    (out / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["extra_special_tokens"] = [*config.get("extra_special_tokens", []), "<|eot_id|>"]
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def test_llama3_eot_id_stops_generation(tiny, greedy, tmp_path):
    cfg, model, tok = tiny["cfg"], tiny["model"], tiny["tokenizer"]
    specials = set(tok.all_special_ids)
    # An item and a step k >= 1 whose greedy token is new (not generated before), not special and not
    # in the prompt: renaming that token <|eot_id|> changes neither the prompt nor the steps before k.
    found = None
    for sample in tiny["test"]:
        prompt_ids = set(encode_prompt(tok, build_prompt("vqa", sample.question, "minigptv2"), n_image_tokens(cfg))[0])
        tokens = greedy.tokens(model, tok, cfg, sample.image_path, "vqa", sample.question)
        for k in range(1, len(tokens)):
            if tokens[k] not in tokens[:k] and tokens[k] not in specials | prompt_ids:
                found = sample, tokens, k
                break
        if found:
            break
    assert found, "no usable step in the tiny model's replies"
    sample, tokens, k = found
    eot_dir = _eot_tokenizer(Path(cfg.model.tokenizer), tmp_path / "llama3_tokenizer", tokens[k])
    eot_cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, tokenizer=str(eot_dir)))
    eval_model, eot_tok = run.load_model_for_eval(eot_cfg, tiny["step"])
    assert eot_tok.get_vocab()["<|eot_id|>"] == tokens[k] and len(eot_tok) == len(tok)
    assert tokens[k] in run.stop_token_ids(eot_tok) and tok.eos_token_id in run.stop_token_ids(eot_tok)
    record = run.predict(eval_model, eot_tok, [sample], eot_cfg)[0]
    # Generation stopped at <|eot_id|>: the reply is the tokens before it (the marker itself is special).
    assert record["reply"] == tok.decode(tokens[:k], skip_special_tokens=True)
    # With the original tokenizer, where that id is an ordinary word, the same model goes on.
    full = tok.decode(tokens, skip_special_tokens=True)
    assert run.predict(eval_model, tok, [sample], cfg)[0]["reply"] == full != record["reply"]


def test_unreadable_item_is_counted_wrong_not_fatal(tiny, tmp_path):
    cfg = tiny["cfg"]
    samples = tiny["test"][:2]
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    samples = [samples[0], Sample(image_path=str(broken), prompt_kind="vqa", question="is there a lesion in this image?",
                                  answer="yes", meta={"answer_type": "CLOSED", "qid": 99})]
    model, tok = run.load_model_for_eval(cfg, tiny["step"])
    records = run.predict(model, tok, samples, cfg)
    assert "error" not in records[0] and "broken.png" in records[1]["error"] and records[1]["prediction"] == ""


def test_majority_baseline_by_answer_type_and_question_type():
    def s(answer, answer_type, question_type):
        return Sample(image_path="x.png", prompt_kind="vqa", question="q?", answer=answer,
                      meta={"answer_type": answer_type, "question_type": question_type})

    train = [s("yes", "CLOSED", "PRES"), s("yes", "CLOSED", "PRES"), s("no", "CLOSED", "SIZE"), s("no", "CLOSED", "SIZE"),
             s("no", "CLOSED", "SIZE"), s("chest", "OPEN", "ORGAN"), s("chest", "OPEN", "ORGAN"), s("2", "OPEN", "COUNT")]
    test = [s("yes", "CLOSED", "PRES"), s("no", "CLOSED", "SIZE"), s("brain", "OPEN", "ORGAN"), s("2", "OPEN", "COUNT")]
    # By answer type: "no" for every closed question, "chest" for every open one.
    by_type = run.majority_baseline(train, test)
    assert (by_type["closed"], by_type["open"], by_type["overall"]) == (0.5, 0.0, 0.25)
    # By question type: PRES -> yes, SIZE -> no, ORGAN -> chest, COUNT -> 2.
    by_question = run.majority_baseline(train, test, by="question_type")
    assert (by_question["closed"], by_question["open"], by_question["overall"]) == (1.0, 0.5, 0.75)


# ---------------------------------------------------------------- evaluate.ask


def test_ask_png_prints_the_greedy_answer(tiny, greedy, cli):
    image = tiny["test"][0].image_path
    question = "what organ is shown in this image?"
    code, out, _ = cli("ask", "--checkpoint", tiny["run"], "--image", image, "--question", question)
    assert code == 0
    assert out.splitlines() == [extract_answer(reference_reply(tiny, greedy, image, "vqa", question), "OPEN", question)]


def test_ask_jpeg_equals_the_reference_on_the_jpeg(tiny, greedy, tmp_path, cli):
    from PIL import Image

    jpg = tmp_path / "scan.jpg"
    Image.open(tiny["test"][1].image_path).convert("RGB").save(jpg, quality=95)
    question = "is there a lesion in this image?"
    code, out, _ = cli("ask", "--checkpoint", tiny["step"], "--image", jpg, "--question", question)
    assert code == 0
    expected = extract_answer(reference_reply(tiny, greedy, str(jpg), "vqa", question), "CLOSED", question)
    assert out.splitlines() == [expected]


def test_ask_dicom_report(tiny, greedy, cli):
    pydicom_data = pytest.importorskip("pydicom.data")
    dcm = pydicom_data.get_testdata_file("CT_small.dcm")
    code, out, _ = cli("ask", "--checkpoint", tiny["step"], "--image", dcm, "--report", "--max-new-tokens", 6)
    assert code == 0
    assert out.splitlines() == [clean_reply(reference_reply(tiny, greedy, dcm, "report", None, max_new=6))]


# ---------------------------------------------------------------- evaluate.answers


@pytest.mark.parametrize("reply, answer_type, question, expected", [
    # 1. end of sequence and special tokens
    ("yes</s>no no no", "CLOSED", None, "yes"),
    ("left<|eot_id|>assistant", "OPEN", None, "left"),
    ("<s> <pad>chest", "OPEN", None, "chest"),
    # 2. template echo: [/INST], task tag, instruction, the question itself
    ("[INST] <Img></Img> [vqa] what organ? [/INST] brain", "OPEN", None, "brain"),
    ("[vqa] chest", "OPEN", None, "chest"),
    ("Based on the image, respond to this question with a short answer: what organ is shown? chest",
     "OPEN", "what organ is shown?", "chest"),
    ("is there a lesion in this image? No.", "CLOSED", "is there a lesion in this image?", "no"),
    # 3. first paragraph; first line and first sentence for closed questions
    ("right lung\n\nThe lesion is large and", "OPEN", None, "right lung"),
    ("Normal study. Nothing else to add.", "CLOSED", None, "normal study"),
    ("absent\nbecause the lungs are clear", "CLOSED", None, "absent"),
    ("3.5 cm", "OPEN", None, "3.5 cm"),
    ("Answer: chest\n\nExtra words", "OPEN", None, "chest"),
    ("[/INST] left", "OPEN", None, "left"),
    ("no</s>garbage", "CLOSED", None, "no"),
    # 4. answer leads
    ("The answer is chest.", "OPEN", None, "chest"),
    ("Answer: The answer is 2", "OPEN", None, "2"),
    ("Short answer: MRI", "OPEN", None, "mri"),
    # 5. yes / no for closed questions only
    ("Yes, there is a lesion in the left lung.", "CLOSED", None, "yes"),
    ("No there is not", "CLOSED", None, "no"),
    ("Yesterday's film", "CLOSED", None, "yesterday's film"),
    ("Yes, in the left lung", "OPEN", None, "yes, in the left lung"),
    # 6. whitespace, quotes, trailing punctuation, case
    ('  "Left"!  ', "OPEN", None, "left"),
    ("Chest?;", "OPEN", None, "chest"),
    ("", "CLOSED", None, ""),
])
def test_answer_extraction_rule(reply, answer_type, question, expected):
    assert extract_answer(reply, answer_type, question) == expected


def test_clean_reply_keeps_a_report_whole():
    reply = "[/INST] [report] Heart size is normal.\nNo effusion.</s>extra"
    assert clean_reply(reply) == "Heart size is normal.\nNo effusion."


@pytest.mark.parametrize("question, expected", [
    ("Is there a lesion in this image?", "CLOSED"),
    ("does the heart look enlarged?", "CLOSED"),
    ("  Can you see a fracture?", "CLOSED"),
    ("what organ is shown in this image?", "OPEN"),
    ("Island of Reil: which lobe?", "OPEN"),
    ("", "OPEN"),
])
def test_guess_answer_type(question, expected):
    assert guess_answer_type(question) == expected


def test_restricted_samples_stay_marked_in_predictions():
    """MIMIC-CXR items carry `restricted` into predictions.jsonl, where the judge's guard reads it."""
    from pefomed.evaluate.judge import is_restricted
    from pefomed.evaluate.predictions import validate_items

    def record(meta):
        sample = Sample(image_path="scan.png", prompt_kind="report", question=None, answer="no acute findings.",
                        meta=meta)
        return run.prediction_record(sample, "no acute findings.", image_used="scan.png", prompt="minigptv2")

    marked, plain = record({"restricted": True}), record({})
    assert marked["restricted"] is True and "restricted" not in plain
    validated = validate_items([marked, plain], "test")
    assert [is_restricted(item) for item in validated] == [True, False]
