"""evaluate.run / evaluate.ask / evaluate.answers with a tiny random model and a hand-made checkpoint.

The checkpoint folder is written here by hand in the documented format (PEFT adapter keys,
`projection.safetensors`, `config.yaml`), with non-zero LoRA B and projection weights so that
loading them matters. The reference for every generated reply is a plain greedy loop on the model
that holds those weights in memory: no KV cache, no padding, one item at a time, the whole
sequence recomputed at each step.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pefomed.engine.build import build_model, n_image_tokens
from pefomed.engine.checkpoint import COMPLETE_MARK
from pefomed.engine.config import load_config, save_config
from pefomed.engine.data.collate import encode_prompt
from pefomed.engine.data.images import load_image
from pefomed.engine.data.prompts import build_prompt
from pefomed.engine.data.readers import Sample
from pefomed.engine.data.sources import fit_vocab_to_tokenizer, load_run_tokenizer, load_samples
from pefomed.evaluate import ask, run
from pefomed.evaluate.answers import clean_reply, extract_answer, guess_answer_type

MAX_NEW = 4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny config, its synthetic data and tokenizer, a model with trained-looking weights, and
    that model's checkpoint folder inside a run's output_dir."""
    root = tmp_path_factory.mktemp("tiny_eval")
    data = root / "data"
    cfg = load_config(None, [
        "model.llm=tiny", "model.random_init=true", f"model.tokenizer={data / 'tokenizer'}",
        "model.llm_overrides={hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 4}",
        "model.vision=tiny", "model.image_size=32", "model.dtype=float32", "model.kernels=torch",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "lora.target_modules=[q_proj, v_proj]",
        f"data.train=[{{kind: synthetic, path: {data}, split: train}}]",
        f"data.eval=[{{kind: synthetic, path: {data}, split: test}}]",
        "data.synthetic_train=24", "data.synthetic_test=10", "data.max_length=128",
        f"train.output_dir={root / 'run'}", "train.seed=3", "train.device=cpu",
        f"eval.max_new_tokens={MAX_NEW}", "eval.batch_size=4",
    ])
    test_samples = load_samples(cfg.data.eval, cfg)  # writes the dataset and the demo tokenizer
    tokenizer = load_run_tokenizer(cfg)
    fit_vocab_to_tokenizer(cfg, tokenizer)
    model = build_model(cfg, "cpu", log=lambda *_: None).eval()
    generator = torch.Generator().manual_seed(11)
    adapter = {}
    for name, param in model.llm.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3
            adapter[f"base_model.model.{name}"] = param.detach().clone()
    for param in model.connector.parameters():
        param.data = torch.randn(param.shape, generator=generator) * 0.05
    step = root / "run" / "checkpoints" / "step_7"
    step.mkdir(parents=True)
    save_file(adapter, str(step / "adapter_model.safetensors"))
    save_file({k: v.contiguous() for k, v in model.connector.state_dict().items()}, str(step / "projection.safetensors"))
    save_config(cfg, step / "config.yaml")
    (step / COMPLETE_MARK).write_text("7")
    return {"cfg": cfg, "root": root, "run": root / "run", "step": step, "model": model, "tokenizer": tokenizer,
            "test": test_samples}


def reference_reply(tiny, image: str, task: str, question: str | None, template: str = "minigptv2",
                    max_new: int = MAX_NEW) -> str:
    model, tok, cfg = tiny["model"], tiny["tokenizer"], tiny["cfg"]
    ids, mask = encode_prompt(tok, build_prompt(task, question, template), n_image_tokens(cfg))
    pixels = load_image(image, cfg.model.image_size)[None]
    ids, mask = torch.tensor([ids]), torch.tensor([mask])
    out = []
    with torch.no_grad():
        prompt = model.embed(pixels, ids, mask)
        for _ in range(max_new):
            emb = prompt if not out else torch.cat([prompt, model.llm.get_input_embeddings()(torch.tensor([out]))], 1)
            token = int(model.llm(inputs_embeds=emb)[0, -1].argmax())
            out.append(token)
            if token == tok.eos_token_id:
                break
    return tok.decode(out, skip_special_tokens=True)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------- evaluate.run


def test_cli_writes_one_prediction_per_item_and_metrics(tiny, tmp_path):
    out = tmp_path / "eval"
    assert run.main(["--checkpoint", str(tiny["run"]), "--split", "test", "--out", str(out)]) == 0
    records = read_jsonl(out / "predictions.jsonl")
    samples = tiny["test"]
    assert len(records) == len(samples) == 10
    for record, sample in zip(records, samples):
        assert record["question"] == sample.question and record["answer"] == sample.answer
        assert record["image_used"] == record["image"] == sample.image_path and "error" not in record
        expected = reference_reply(tiny, sample.image_path, "vqa", sample.question)
        assert record["reply"] == expected
        assert record["prediction"] == extract_answer(expected, sample.meta["answer_type"], sample.question)
    metrics = json.loads((out / "metrics.json").read_text())
    exact = metrics["pefomed_exact_match"]
    assert exact["n"] == 10 and exact["n_closed"] + exact["n_open"] == 10
    hits = [r["prediction"] == r["answer"] for r in records]
    assert exact["overall"] == pytest.approx(sum(hits) / len(hits))


def test_batched_generation_equals_one_by_one(tiny):
    cfg, samples = tiny["cfg"], tiny["test"]
    lengths = {len(s.question) for s in samples[:7]}
    assert len(lengths) > 1, "the batch must mix prompt lengths, so that left padding is exercised"
    model, tok = run.load_model_for_eval(cfg, tiny["step"])
    batched = run.predict(model, tok, samples[:7], cfg, batch_size=7)
    single = run.predict(model, tok, samples[:7], cfg, batch_size=1)
    assert [r["reply"] for r in batched] == [r["reply"] for r in single]
    assert [r["reply"] for r in single] == [reference_reply(tiny, s.image_path, "vqa", s.question) for s in samples[:7]]


@pytest.mark.parametrize("n", [2, 3, 5, 17, 64])
def test_derangement_is_deterministic_and_has_no_fixed_point(n):
    perm = run.derangement(n, seed=4)
    assert sorted(perm) == list(range(n))
    assert all(perm[i] != i for i in range(n))
    assert perm == run.derangement(n, seed=4)


def test_derangement_needs_two_items():
    with pytest.raises(ValueError, match="at least 2"):
        run.derangement(1)
    with pytest.raises(ValueError, match="two distinct images"):
        run.image_derangement(["a.png", "a.png"])


def test_swap_images_gives_every_question_another_image(tiny, tmp_path):
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
        assert r["reply"] == reference_reply(tiny, r["image_used"], "vqa", r["question"])


def test_prompt_variant_and_other_dataset(tiny, tmp_path):
    cfg, data = tiny["cfg"], tiny["root"] / "data"
    summary = run.evaluate_checkpoint(cfg, tiny["run"], split="train", out_dir=tmp_path, prompt="expert",
                                      dataset=f"synthetic:{data}", limit=3)
    records = read_jsonl(tmp_path / "predictions.jsonl")
    train = load_samples(cfg.data.train, cfg)[:3]
    assert summary["n"] == 3 and [r["question"] for r in records] == [s.question for s in train]
    assert all(r["prompt"] == "expert" for r in records)
    for r in records:
        assert r["reply"] == reference_reply(tiny, r["image"], "vqa", r["question"], template="expert")
    with pytest.raises(ValueError, match="nonsense"):
        run.evaluate_checkpoint(cfg, tiny["run"], split="test", out_dir=tmp_path / "x", prompt="nonsense", limit=1)


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


def test_run_errors_name_the_missing_file(tiny, tmp_path, capsys):
    broken = tmp_path / "step_1"
    broken.mkdir()
    (broken / "projection.safetensors").write_bytes((tiny["step"] / "projection.safetensors").read_bytes())
    assert run.main(["--checkpoint", str(broken), "--out", str(tmp_path / "o")]) == 2
    assert "adapter_model.safetensors" in capsys.readouterr().err
    assert run.main(["--checkpoint", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "nowhere" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert run.main(["--checkpoint", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    assert "empty: neither a checkpoint folder" in capsys.readouterr().err
    assert run.main(["--checkpoint", str(tiny["step"]), "--out", str(tmp_path / "o"), "--dataset", "pathvqa"]) == 2
    assert "kind:path" in capsys.readouterr().err


# ---------------------------------------------------------------- evaluate.ask


def test_ask_png_prints_the_greedy_answer(tiny, capsys):
    image = tiny["test"][0].image_path
    question = "what organ is shown in this image?"
    assert ask.main(["--checkpoint", str(tiny["run"]), "--image", image, "--question", question]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [extract_answer(reference_reply(tiny, image, "vqa", question), "OPEN", question)]


def test_ask_dicom_report(tiny, capsys):
    pydicom_data = pytest.importorskip("pydicom.data")
    dcm = pydicom_data.get_testdata_file("CT_small.dcm")
    assert ask.main(["--checkpoint", str(tiny["step"]), "--image", dcm, "--report", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed == [clean_reply(reference_reply(tiny, dcm, "report", None, max_new=6))]


def test_ask_errors_exit_2_naming_the_file(tiny, tmp_path, capsys):
    garbage = tmp_path / "scan.png"
    garbage.write_bytes(b"garbage")
    assert ask.main(["--checkpoint", str(tiny["run"]), "--image", str(garbage), "--question", "q?"]) == 2
    assert "scan.png" in capsys.readouterr().err
    partial = tmp_path / "step_3"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes((tiny["step"] / "adapter_model.safetensors").read_bytes())
    image = tiny["test"][0].image_path
    assert ask.main(["--checkpoint", str(partial), "--image", image, "--question", "q?"]) == 2
    assert "projection.safetensors" in capsys.readouterr().err


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
