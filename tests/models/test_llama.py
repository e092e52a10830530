"""Parity of models.llama against transformers at tiny random configs (fp32)."""

import pytest
import torch
import transformers

from models.llama import CONFIGS, LlamaConfig, LlamaForCausalLM
from models.loading import CheckpointError

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8}

CASES = {
    "llama2-mha": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**BASE)),
    "llama3-gqa-rope-scaling": (
        transformers.LlamaForCausalLM,
        transformers.LlamaConfig(**BASE, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    ),
    "tied-embeddings": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**BASE, tie_word_embeddings=True)),
    "mistral-sliding-window": (
        transformers.MistralForCausalLM,
        transformers.MistralConfig(**BASE, num_key_value_heads=2, sliding_window=5),
    ),
}


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def save_hf(tmp_path, name, shard=False):
    cls, cfg = CASES[name]
    torch.manual_seed(0)
    hf = cls(cfg).eval()
    hf.save_pretrained(tmp_path, max_shard_size="20KB" if shard else "5GB")
    return hf


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path, name):
    hf = save_hf(tmp_path, name)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 97, (2, 13))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    real = mask.bool()
    assert rel_err(got[real], ref[real]) < 1e-5
    assert not any(p.is_meta for p in ours.parameters())


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_hf(tmp_path, "llama3-gqa-rope-scaling", shard=True)
    assert (tmp_path / "model.safetensors.index.json").exists()
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, 97, (1, 9))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) < 1e-5


@pytest.mark.parametrize("name", ["llama2-mha", "mistral-sliding-window"])
def test_greedy_generation_matches_transformers(tmp_path, name):
    hf = save_hf(tmp_path, name)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 97, (2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    expected = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=7, do_sample=False, pad_token_id=0)
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=None, pad_token_id=0)
    assert torch.equal(got, expected[:, 10:])


def test_kv_cache_decode_equals_full_recompute(tmp_path):
    save_hf(tmp_path, "llama3-gqa-rope-scaling")
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 97, (1, 6))
    cached = model.generate(ids, max_new_tokens=8, eos_token_id=None)
    seq = ids
    with torch.no_grad():
        for _ in range(8):
            nxt = model(seq)[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(cached, seq[:, 6:])


def test_generation_stops_rows_at_eos(tmp_path):
    save_hf(tmp_path, "llama2-mha")
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, 97, (2, 5))
    free = model.generate(ids, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    eos = int(free[0, 1])  # pretend the second token of row 0 is EOS
    out = model.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 1] == eos and bool((out[0, 2:] == 0).all())


def test_linear_factory_gets_qualified_names():
    seen = []

    def factory(name, i, o, bias):
        seen.append(name)
        return torch.nn.Linear(i, o, bias=bias)

    LlamaForCausalLM(LlamaConfig(**BASE), linear_factory=factory)
    assert "model.layers.0.self_attn.q_proj" in seen and "model.layers.1.mlp.down_proj" in seen
    assert len(seen) == 2 * 7


def test_llama2_7b_on_meta_has_the_published_parameter_count():
    with torch.device("meta"):
        model = LlamaForCausalLM(CONFIGS["llama2-7b"])
    assert sum(p.numel() for p in model.parameters()) == 6_738_415_616


def test_config_errors_name_the_file(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(CheckpointError, match="config.json.*vocab_size"):
        LlamaConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaConfig.from_hf(tmp_path / "nowhere")


def test_shape_mismatch_is_a_clear_error(tmp_path):
    save_hf(tmp_path, "llama2-mha")
    import json

    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"mlp\.\w+_proj\.weight has shape .* but the model's .* is \[(48, 32|32, 48)\]"):
        LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
