"""evaluate.run on a checkpoint that training really wrote (the demo config, a few steps).

The references are independent of the code under test: the replies of a plain greedy loop (no KV
cache, no padding, one item at a time) on a model whose checkpoint tensors are copied in by name
here, not through `engine.checkpoint.load_exports`; and metrics recomputed item by item from
predictions.jsonl with the per-item scorers, whose values are checked by hand in test_metrics_*.
"""

import json
import math
from collections import Counter
from pathlib import Path

import pytest
from safetensors.torch import load_file

from pefomed.engine.build import build_model
from pefomed.engine.config import load_config
from pefomed.engine.data.sources import fit_vocab_to_tokenizer, load_run_tokenizer, load_samples
from pefomed.engine.session import train_from_config
from pefomed.evaluate.answers import clean_reply, extract_answer
from pefomed.evaluate.metrics.llava_med import closed_hit, open_recall
from pefomed.evaluate.metrics.med_idefics import bleu1, containment_match, token_set_f1
from pefomed.evaluate.metrics.normalize import normalize_pefomed
from pefomed.evaluate.run import (
    evaluate_checkpoint,
    load_model_for_eval,
    majority_baseline,
    predict,
    resolve_checkpoint,
)

PEFT_PREFIX = "base_model.model."


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    data = root / "data"
    cfg = load_config(Path(__file__).resolve().parents[2] / "configs/demo.yaml", [
        f"train.output_dir={root / 'run'}", f"data.train=[{{kind: synthetic, path: {data}, split: train}}]",
        f"data.eval=[{{kind: synthetic, path: {data}, split: test}}]", f"model.tokenizer={data}/tokenizer",
        "data.synthetic_train=60", "data.synthetic_test=18", "train.max_steps=3", "train.progress_bar=false",
        "train.micro_batch_size=4",
    ])
    train_from_config(cfg)
    return cfg, root


@pytest.fixture(scope="module")
def reference_model(trained):
    """The base model of the config with the checkpoint's adapter and projection copied in by name."""
    cfg, root = trained
    step = resolve_checkpoint(root / "run")
    tokenizer = load_run_tokenizer(cfg)
    fit_vocab_to_tokenizer(cfg, tokenizer)
    model = build_model(cfg, "cpu").eval()
    params = dict(model.llm.named_parameters())
    adapter = load_file(str(step / "adapter_model.safetensors"))
    assert set(adapter) == {PEFT_PREFIX + name for name in params if ".lora_A." in name or ".lora_B." in name}
    for key, tensor in adapter.items():
        params[key[len(PEFT_PREFIX):]].data.copy_(tensor)
    model.connector.load_state_dict(load_file(str(step / "projection.safetensors")))
    return model, tokenizer


@pytest.fixture(scope="module")
def evaluated(trained, tmp_path_factory):
    cfg, root = trained
    out = tmp_path_factory.mktemp("eval_out")
    summary = evaluate_checkpoint(cfg, root / "run", split="test", out_dir=out)
    records = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return summary, records, out


def test_predictions_equal_a_plain_greedy_decode(trained, reference_model, evaluated, greedy):
    cfg, _ = trained
    model, tokenizer = reference_model
    _, records, _ = evaluated
    samples = load_samples(cfg.data.eval, cfg)
    assert len(records) == len(samples) == 18
    for record, sample in zip(records, samples):
        reply = greedy.reply(model, tokenizer, cfg, sample.image_path, "vqa", sample.question,
                             template=cfg.eval.prompt, max_new=cfg.eval.max_new_tokens)
        assert record["reply"] == reply
        assert record["prediction"] == extract_answer(reply, sample.meta["answer_type"], sample.question)
        assert (record["question"], record["answer"], record["image_used"]) == (sample.question, sample.answer,
                                                                                sample.image_path)


def mean(values):
    return sum(values) / len(values) if values else None


def test_metrics_json_equals_metrics_recomputed_from_predictions(evaluated):
    summary, records, out = evaluated
    metrics = json.loads((out / "metrics.json").read_text())
    hits = [normalize_pefomed(r["prediction"]) == normalize_pefomed(r["answer"]) for r in records]
    closed = [h for h, r in zip(hits, records) if r["answer_type"] == "CLOSED"]
    open_ = [h for h, r in zip(hits, records) if r["answer_type"] == "OPEN"]
    pe = metrics["pefomed_exact_match"]
    assert (pe["n"], pe["n_closed"], pe["n_open"]) == (18, len(closed), len(open_)) and closed and open_
    assert pe["closed"] == pytest.approx(mean(closed)) and pe["open"] == pytest.approx(mean(open_))
    assert pe["overall"] == pytest.approx(mean(hits))
    by_type = {}
    for h, r in zip(hits, records):
        by_type.setdefault(r["question_type"], []).append(h)
    assert pe["by_question_type"] == {k: {"n": len(v), "accuracy": pytest.approx(mean(v))}
                                      for k, v in sorted(by_type.items())}
    lm = metrics["llava_med"]
    assert lm["open_recall"] == pytest.approx(mean([open_recall(r["prediction"], r["answer"])
                                                    for r in records if r["answer_type"] == "OPEN"]))
    assert lm["closed_accuracy"] == pytest.approx(mean([closed_hit(r["prediction"], r["answer"])
                                                        for r in records if r["answer_type"] == "CLOSED"]))
    mi = metrics["med_idefics"]
    assert mi["containment_em"] == pytest.approx(mean([containment_match(r["prediction"], r["answer"]) for r in records]))
    assert mi["token_f1"] == pytest.approx(mean([token_set_f1(r["prediction"], r["answer"]) for r in records]))
    assert mi["bleu1"] == pytest.approx(mean([bleu1(r["prediction"], r["answer"]) for r in records]))
    assert summary == {"n": 18, "n_errors": 0, "n_closed": len(closed), "n_open": len(open_),
                       "closed": pytest.approx(mean(closed)), "open": pytest.approx(mean(open_)),
                       "overall": pytest.approx(mean(hits))}
    scored = [json.loads(line) for line in (out / "scored_items.jsonl").read_text().splitlines()]
    assert [s["scores"]["pefomed_exact_match"] for s in scored] == hits


def test_batched_generation_equals_one_by_one(trained):
    cfg, root = trained
    samples = load_samples(cfg.data.eval, cfg)[:6]
    model, tok = load_model_for_eval(cfg, resolve_checkpoint(root / "run"))
    batched = [r["reply"] for r in predict(model, tok, samples, cfg, batch_size=6)]
    single = [r["reply"] for r in predict(model, tok, samples, cfg, batch_size=1)]
    assert batched == single


def test_majority_baseline(trained):
    cfg, _ = trained
    train, test = load_samples(cfg.data.train, cfg), load_samples(cfg.data.eval, cfg)
    result = majority_baseline(train, test)
    # By hand: the most frequent training answer of each answer type, compared after normalization.
    expected_hits = {"CLOSED": [], "OPEN": []}
    for answer_type in expected_hits:
        answers = [s.answer.strip().lower() for s in train if s.meta["answer_type"] == answer_type]
        counts = Counter(answers)
        guess = next(a for a in answers if counts[a] == max(counts.values()))  # ties: the one seen first
        expected_hits[answer_type] = [normalize_pefomed(guess) == normalize_pefomed(s.answer)
                                      for s in test if s.meta["answer_type"] == answer_type]
    assert result["n"] == len(test)
    assert result["closed"] == pytest.approx(mean(expected_hits["CLOSED"]))
    assert result["open"] == pytest.approx(mean(expected_hits["OPEN"]))
    every = expected_hits["CLOSED"] + expected_hits["OPEN"]
    assert result["overall"] == pytest.approx(mean(every)) and not math.isnan(result["overall"])


def test_ask_png_and_dicom_equal_the_reference(trained, reference_model, greedy, cli):
    cfg, root = trained
    model, tokenizer = reference_model
    png = load_samples(cfg.data.eval, cfg)[0].image_path
    question = "how many lesions are there?"
    code, out, _ = cli("ask", "--checkpoint", root / "run", "--image", png, "--question", question)
    reply = greedy.reply(model, tokenizer, cfg, png, "vqa", question, template=cfg.eval.prompt,
                         max_new=cfg.eval.max_new_tokens)
    assert code == 0 and out.splitlines() == [extract_answer(reply, "OPEN", question)]
    pydicom_data = pytest.importorskip("pydicom.data")
    dcm = pydicom_data.get_testdata_file("CT_small.dcm")
    code, out, _ = cli("ask", "--checkpoint", root / "run", "--image", dcm, "--report", "--max-new-tokens", 5)
    report = greedy.reply(model, tokenizer, cfg, dcm, "report", None, template=cfg.eval.prompt, max_new=5)
    assert code == 0 and out.splitlines() == [clean_reply(report)]
