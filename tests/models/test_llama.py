"""models.llama against transformers (eager attention, fp32) at tiny random configs."""

import copy
import importlib.util
import json
import sys
import types

import pytest
import torch
import torch.nn.functional as F
import transformers

from pefomed.models.llama import CONFIGS, KVCache, LlamaConfig, LlamaForCausalLM
from pefomed.models.loading import CheckpointError

VOCAB = 300
BASE = {"vocab_size": VOCAB, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4}
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # small, so that the scaling changes frequencies that positions < 20 exercise
               "original_max_position_embeddings": 8}

CASES = {
    "llama2-mha": (transformers.LlamaForCausalLM, dict(BASE, num_hidden_layers=3)),
    "llama3-gqa-rope-scaling": (
        transformers.LlamaForCausalLM,
        dict(BASE, num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE),
    ),
    "tied-embeddings": (transformers.LlamaForCausalLM, dict(BASE, tie_word_embeddings=True)),
    "biases": (transformers.LlamaForCausalLM, dict(BASE, attention_bias=True, mlp_bias=True)),
    "mistral-window-unused": (transformers.MistralForCausalLM, dict(BASE, num_key_value_heads=2, sliding_window=64)),
    "mistral-window-binding": (transformers.MistralForCausalLM, dict(BASE, num_key_value_heads=2, sliding_window=5)),
}


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def hf_model(name):
    cls, kwargs = copy.deepcopy(CASES[name])  # transformers edits rope dicts in place
    config_cls = transformers.MistralConfig if cls is transformers.MistralForCausalLM else transformers.LlamaConfig
    torch.manual_seed(0)
    model = cls(config_cls(**kwargs, attn_implementation="eager")).eval()
    with torch.no_grad():  # HF initializes biases to zero: make them count
        for n, p in model.named_parameters():
            if n.endswith(".bias"):
                p.normal_(std=0.5)
    return model


def save_hf(tmp_path, name, shard=False):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path, max_shard_size="40KB" if shard else "5GB")
    return hf


def left_padded(batch=3, length=13, low=3):
    ids = torch.randint(low, VOCAB, (batch, length))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[-1, :1] = 0
    return ids, mask


@pytest.mark.parametrize("name", list(CASES))
def test_logits_match_transformers(tmp_path, name):
    hf = save_hf(tmp_path, name)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = left_padded()
    with torch.no_grad():
        ref_plain, got_plain = hf(input_ids=ids).logits, ours(ids)
        ref = hf(input_ids=ids, attention_mask=mask).logits
        got = ours(ids, attention_mask=mask)
    assert got_plain.dtype == torch.float32
    assert rel_err(got_plain, ref_plain) < 1e-5
    real = mask.bool()  # padding positions are not compared: HF and we fill them differently
    assert rel_err(got[real], ref[real]) < 1e-5


def test_sliding_window_really_binds(tmp_path):
    save_hf(tmp_path, "mistral-window-binding")
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (1, 13))
    with torch.no_grad():
        windowed = ours(ids)
        ours.config.sliding_window = None
        unwindowed = ours(ids)
    assert rel_err(windowed[:, :5], unwindowed[:, :5]) < 1e-6  # within the window: no change
    assert rel_err(windowed[:, 5:], unwindowed[:, 5:]) > 1e-3


def test_right_padded_training_batch_matches_on_real_tokens(tmp_path):
    hf = save_hf(tmp_path, "llama3-gqa-rope-scaling")
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        ref, got = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, attention_mask=mask)
    assert rel_err(got[mask.bool()], ref[mask.bool()]) < 1e-5


def test_sharded_checkpoint_loads(tmp_path):
    hf = save_hf(tmp_path, "llama3-gqa-rope-scaling", shard=True)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) < 1e-5


def test_bf16_load_keeps_logits_in_bf16_and_ties(tmp_path):
    save_hf(tmp_path, "tied-embeddings")
    ours = LlamaForCausalLM.from_pretrained(tmp_path)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    assert all(p.dtype == torch.bfloat16 for p in ours.parameters())
    assert not any(t.is_meta for t in [*ours.parameters(), *ours.buffers()])
    assert ours.model.rotary_emb.inv_freq.dtype == torch.float32
    with torch.no_grad():
        assert ours(torch.randint(0, VOCAB, (1, 4))).dtype == torch.bfloat16


@pytest.mark.parametrize("name", ["llama2-mha", "llama3-gqa-rope-scaling", "mistral-window-binding"])
def test_greedy_generation_matches_transformers(tmp_path, name):
    hf = save_hf(tmp_path, name)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = left_padded(length=8)
    free = ours.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=None, pad_token_id=0)
    eos = int(free[0, 2])  # row 0 produces this token third: use it as EOS so that rows end early
    hf_kwargs = {"max_new_tokens": 7, "do_sample": False, "pad_token_id": 0, "eos_token_id": eos}
    expected = hf.generate(input_ids=ids, attention_mask=mask, **hf_kwargs)[:, ids.shape[1]:]
    got = ours.generate(ids, attention_mask=mask, max_new_tokens=7, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, expected)
    first_eos = int((got[0] == eos).nonzero()[0])
    assert first_eos <= 2 and bool((got[0, first_eos + 1 :] == 0).all())


def stepwise_greedy(model, ids, mask, steps):
    """Greedy decoding by recomputing the whole sequence at each step (no cache)."""
    out = []
    with torch.no_grad():
        for _ in range(steps):
            token = model(ids, attention_mask=mask)[:, -1].argmax(-1, keepdim=True)
            out.append(token)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
    return torch.cat(out, dim=1)


@pytest.mark.parametrize("name", ["llama3-gqa-rope-scaling", "mistral-window-binding"])
def test_kv_cache_decode_equals_full_recompute(tmp_path, name):
    save_hf(tmp_path, name)
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = left_padded(length=6)
    cached = model.generate(ids, attention_mask=mask, max_new_tokens=9, eos_token_id=None)
    assert torch.equal(cached, stepwise_greedy(model, ids, mask, 9))
    embeds = model.get_input_embeddings()(ids)
    from_embeds = model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=9)
    assert torch.equal(from_embeds, cached)


def test_cache_logits_equal_full_forward(tmp_path):
    save_hf(tmp_path, "llama3-gqa-rope-scaling")
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids, mask = left_padded(length=10)
    cache = KVCache.allocate(model.config, 3, 10, "cpu", torch.float32)
    with torch.no_grad():
        full = model(ids, attention_mask=mask)
        first = model(ids[:, :6], attention_mask=mask[:, :6], kv_cache=cache)
        second = model(ids[:, 6:], attention_mask=mask, kv_cache=cache)  # several tokens after a past
    real = mask.bool()
    assert rel_err(torch.cat([first, second], 1)[real], full[real]) < 1e-6
    assert cache.length == 10
    with pytest.raises(RuntimeError, match="KV cache full"):
        model(ids[:, :1], attention_mask=torch.ones(3, 11, dtype=torch.long), kv_cache=cache)


def test_generation_edge_cases(tmp_path):
    save_hf(tmp_path, "llama2-mha")
    model = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(3, VOCAB, (2, 5))
    assert model.generate(ids, max_new_tokens=0).shape == (2, 0)
    first = model.generate(ids, max_new_tokens=1)
    both_eos = [int(first[0, 0]), int(first[1, 0])]
    stopped = model.generate(ids, max_new_tokens=6, eos_token_id=both_eos, pad_token_id=0)
    assert stopped.shape == (2, 1)  # every row ended at once: the batch stops
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        model.generate(max_new_tokens=2)


def test_linear_factory_gets_qualified_names():
    seen = []

    def factory(name, i, o, bias):
        seen.append((name, i, o, bias))
        return torch.nn.Linear(i, o, bias=bias)

    config = LlamaConfig(**BASE, num_key_value_heads=2, attention_bias=True)
    LlamaForCausalLM(config, linear_factory=factory)
    expected = []
    for n in range(2):
        attn, mlp = f"model.layers.{n}.self_attn", f"model.layers.{n}.mlp"
        expected += [(f"{attn}.q_proj", 64, 64, True), (f"{attn}.k_proj", 64, 32, True),
                     (f"{attn}.v_proj", 64, 32, True), (f"{attn}.o_proj", 64, 64, True),
                     (f"{mlp}.gate_proj", 64, 160, False), (f"{mlp}.up_proj", 64, 160, False),
                     (f"{mlp}.down_proj", 160, 64, False)]
    assert seen == expected


@pytest.mark.parametrize(
    "name,count", [("llama2-7b", 6_738_415_616), ("llama3-8b", 8_030_261_248), ("mistral-7b", 7_241_732_096)]
)
def test_published_parameter_counts_on_meta(name, count):
    with torch.device("meta"):
        model = LlamaForCausalLM(CONFIGS[name])
    params = list(model.parameters())
    assert all(p.is_meta for p in params)  # nothing allocated
    assert sum(p.numel() for p in params) == count


def test_config_reads_transformers_files_and_round_trips(tmp_path):
    save_hf(tmp_path, "llama3-gqa-rope-scaling")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["some_future_key"] = {"ignored": True}
    config = LlamaConfig.from_hf(raw)
    assert config.rope_theta == 500000.0 and config.num_key_value_heads == 2 and config.head_dim == 16
    assert config.rope_scaling == LLAMA3_ROPE
    legacy = {**BASE, "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "rope_type": None, "type": "llama3"}}
    assert LlamaConfig.from_hf(legacy).rope_scaling == LLAMA3_ROPE  # transformers 4.x keys
    assert LlamaConfig.from_hf(config.to_hf_dict()) == config
    mistral = LlamaConfig.from_hf({**BASE, "model_type": "mistral"})
    assert mistral.sliding_window == 4096  # transformers' default when the key is absent


def test_to_hf_dict_builds_the_same_model_in_transformers(tmp_path):
    config = CONFIGS["tiny-mistral"]
    with torch.device("cpu"):
        ours = LlamaForCausalLM(config).eval()
    hf_config = transformers.MistralConfig(**config.to_hf_dict(), attn_implementation="eager")
    hf = transformers.MistralForCausalLM(hf_config).eval()
    hf.load_state_dict(ours.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 12))  # longer than its sliding window of 8
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) < 1e-5


def test_config_errors_name_the_file_and_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "vocab_size": None, "hidden_size": 8}))
    with pytest.raises(CheckpointError, match=r"config.json: missing required key\(s\) \['vocab_size'\]"):
        LlamaConfig.from_hf(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere/config.json: missing"):
        LlamaConfig.from_hf(tmp_path / "nowhere")
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "qwen2"}))
    with pytest.raises(CheckpointError, match="config.json: model_type='qwen2' is not supported"):
        LlamaConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "num_key_value_heads": 3}))
    with pytest.raises(CheckpointError, match="config.json: num_attention_heads=4 must be a multiple"):
        LlamaConfig.from_hf(tmp_path)
    with pytest.raises(ValueError, match="rope_scaling type 'yarn' is not supported"):
        LlamaConfig(**BASE, rope_scaling={"rope_type": "yarn", "factor": 2.0})


def test_shape_mismatch_names_the_config_field(tmp_path):
    save_hf(tmp_path, "llama2-mha")
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    message = str(err.value)
    assert "model.layers.0.mlp.gate_proj.weight is [160, 64] in the checkpoint but [48, 64] in the model" in message
    assert f"{tmp_path / 'config.json'} says intermediate_size=48 but the checkpoint's" in message


def test_missing_attention_backend_is_a_clear_error():
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    with pytest.raises(ImportError, match="attn_implementation='flash_attention_2' needs the flash_attn package"):
        LlamaForCausalLM(LlamaConfig(**BASE, attn_implementation="flash_attention_2"))
    with pytest.raises(ValueError, match="attn_implementation='flash'"):
        LlamaConfig(**BASE, attn_implementation="flash")


def reference_attention(q, k, v, causal):
    """[B, T, H, D] attention in float64, GQA by repeating k/v heads, causal from the bottom right."""
    groups = q.shape[2] // k.shape[2]
    q, k, v = (t.double().transpose(1, 2) for t in (q, k, v))
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    mask = None
    if causal:
        tq, tk = q.shape[2], k.shape[2]
        mask = torch.ones(tq, tk, dtype=torch.bool).tril(diagonal=tk - tq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).float()


def fake_flash_attn(calls):
    module = types.ModuleType("flash_attn")

    def flash_attn_func(q, k, v, causal=False, window_size=(-1, -1)):
        calls.append((tuple(q.shape), tuple(k.shape), causal))
        assert window_size == (-1, -1)  # no sliding window in this model
        return reference_attention(q, k, v, causal)

    module.flash_attn_func = flash_attn_func
    return module


def fake_xformers_ops(calls):
    module = types.ModuleType("xformers.ops")

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None):
        # GQA as xformers takes it: [B, M, G, H/G, D] with k/v broadcast (stride 0) over each group.
        assert q.dim() == 5 and k.stride(3) == 0 and v.stride(3) == 0
        b, m, g, hg, d = q.shape
        calls.append(((b, m, g * hg, d), (b, k.shape[1], g, d), attn_bias is not None))
        out = reference_attention(q.reshape(b, m, g * hg, d), k[:, :, :, 0], v[:, :, :, 0],
                                  isinstance(attn_bias, LowerTriangularMask))  # fmt: skip
        return out.reshape(b, m, g, hg, d)

    module.LowerTriangularMask = LowerTriangularMask
    module.memory_efficient_attention = memory_efficient_attention
    return module


@pytest.mark.parametrize("backend", ["flash_attention_2", "xformers"])
def test_optional_backends_get_the_layout_they_expect(tmp_path, monkeypatch, backend):
    calls = []
    if backend == "flash_attention_2":
        monkeypatch.setitem(sys.modules, "flash_attn", fake_flash_attn(calls))
    else:
        monkeypatch.setitem(sys.modules, "xformers", types.ModuleType("xformers"))
        monkeypatch.setitem(sys.modules, "xformers.ops", fake_xformers_ops(calls))
    kv_heads = 2  # both take GQA's 2 key/value heads for 4 query heads as they are
    hf = save_hf(tmp_path, "llama3-gqa-rope-scaling")
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, attn_implementation=backend).eval()
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) < 1e-5
    assert calls == [((2, 7, 4, 16), (2, 7, kv_heads, 16), True)] * 2
    calls.clear()
    _, mask = left_padded(batch=2, length=7)
    with torch.no_grad():  # left padding needs an explicit mask: SDPA runs instead
        ref, got = hf(input_ids=ids, attention_mask=mask).logits, ours(ids, attention_mask=mask)
    assert calls == [] and rel_err(got[mask.bool()], ref[mask.bool()]) < 1e-5
    out = ours.generate(ids, max_new_tokens=3)
    assert torch.equal(out, stepwise_greedy(ours, ids, torch.ones_like(ids), 3))
    assert ((2, 1, 4, 16), (2, 8, kv_heads, 16), False) in calls  # a decode step without a mask


class ScaledLinear(torch.nn.Linear):
    """A projection with one parameter more than a checkpoint holds (as a caller's factory may add)."""

    def __init__(self, i, o, bias):
        super().__init__(i, o, bias=bias)
        self.scale = torch.nn.Parameter(torch.empty(o))

    def forward(self, x):
        return super().forward(x) * self.scale


def test_parameters_a_checkpoint_lacks_are_the_callers_to_fill(tmp_path):
    """`allow_missing`: the factory's extra parameters stay on meta; anything else missing is an error."""
    hf = save_hf(tmp_path, "llama2-mha")

    def factory(name, i, o, bias):
        return ScaledLinear(i, o, bias) if name.endswith("v_proj") else torch.nn.Linear(i, o, bias=bias)

    with pytest.raises(CheckpointError, match=r"missing from the checkpoint.*self_attn\.v_proj\.scale"):
        LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, linear_factory=factory)
    ours = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32, linear_factory=factory, allow_missing=[r"\.scale$"])
    left = [n for n, p in ours.named_parameters() if p.is_meta]
    assert left == [f"model.layers.{i}.self_attn.v_proj.scale" for i in range(3)]
    for name in left:
        owner = ours.get_submodule(name.rsplit(".", 1)[0])
        owner.scale = torch.nn.Parameter(torch.ones(owner.out_features))
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        assert rel_err(ours(ids), hf(input_ids=ids).logits) < 1e-5
