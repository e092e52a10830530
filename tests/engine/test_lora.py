import json

import pytest
import torch
from safetensors.torch import save_file

from pefomed.engine.config import LoRAConfig
from pefomed.engine.lora import (
    LoRALinear,
    adapter_state_dict,
    freeze_except,
    lora_parameter_names,
    make_linear_factory,
    peft_adapter_config,
    write_adapter_config,
)


def test_pefomed_trainable_count_on_meta(capsys):
    """PeFoMed: projection 23,072,768 + LoRA 33,554,432 = 56.63M at LLaMA-2-7B sizes."""
    from pefomed.models.connectors import GroupedProjection
    from pefomed.models.llama import CONFIGS, LlamaForCausalLM

    cfg = LoRAConfig(r=64, alpha=16, dropout=0.05, target_modules=["q_proj", "v_proj"])
    with torch.device("meta"):
        llm = LlamaForCausalLM(CONFIGS["llama2-7b"], linear_factory=make_linear_factory(cfg))
        connector = GroupedProjection(1408, 4096, group=4)
    lora = sum(p.numel() for n, p in llm.named_parameters() if n in set(lora_parameter_names(llm)))
    projection = sum(p.numel() for p in connector.parameters())
    assert lora == 32 * 2 * (64 * 4096 + 4096 * 64) == 33_554_432
    assert projection == 5632 * 4096 + 4096 == 23_072_768
    n = freeze_except(llm, lora_parameter_names(llm))
    assert n == lora
    assert "33,554,432" in capsys.readouterr().out
    assert lora + projection == 56_627_200


def test_fresh_adapter_changes_nothing_and_only_adapter_trains():
    layer = LoRALinear(12, 7, True, r=4, alpha=8, dropout=0.0)
    x = torch.randn(3, 12)
    expected = torch.nn.functional.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x), expected)
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert layer.lora_A.weight.requires_grad and layer.lora_B.weight.requires_grad
    assert layer.scaling == 2.0
    rs = LoRALinear(12, 7, False, r=4, alpha=8, use_rslora=True)
    assert rs.scaling == pytest.approx(8 / 2)


def test_lora_matches_float64_formula():
    layer = LoRALinear(10, 6, True, r=3, alpha=6, dropout=0.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 10)
    y = layer(x)
    d = lambda t: t.detach().double()  # noqa: E731
    ref = d(x) @ d(layer.weight).T + d(layer.bias) + 2.0 * (d(x) @ d(layer.lora_A.weight).T) @ d(layer.lora_B.weight).T
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)


def test_factory_targets_by_leaf_name():
    cfg = LoRAConfig(r=2, alpha=2, target_modules=["q_proj", "down_proj"])
    factory = make_linear_factory(cfg)
    assert isinstance(factory("model.layers.0.self_attn.q_proj", 4, 4, False), LoRALinear)
    assert isinstance(factory("model.layers.0.mlp.down_proj", 4, 4, False), LoRALinear)
    assert type(factory("model.layers.0.self_attn.k_proj", 4, 4, False)) is torch.nn.Linear
    every = make_linear_factory(LoRAConfig(r=2, alpha=2, target_modules=["all-linear"]))
    assert isinstance(every("model.layers.0.mlp.up_proj", 4, 4, False), LoRALinear)
    assert type(make_linear_factory(None)("x.q_proj", 4, 4, False)) is torch.nn.Linear


def _tiny_hf_llama(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_cfg = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    hf.save_pretrained(tmp_path / "base")
    return hf


def test_saved_adapter_loads_in_peft_with_same_logits(tmp_path):
    peft = pytest.importorskip("peft")
    from pefomed.models.llama import LlamaForCausalLM

    hf = _tiny_hf_llama(tmp_path)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    ours = LlamaForCausalLM.from_pretrained(
        tmp_path / "base", dtype=torch.float32, linear_factory=make_linear_factory(cfg)
    ).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.2)
    adapter = adapter_state_dict(ours)
    out = tmp_path / "adapter"
    out.mkdir()
    save_file(adapter, str(out / "adapter_model.safetensors"))
    write_adapter_config(out / "adapter_config.json", peft_adapter_config(cfg, str(tmp_path / "base"), adapter))
    assert json.loads((out / "adapter_config.json").read_text())["target_modules"] == ["down_proj", "q_proj", "v_proj"]

    merged = peft.PeftModel.from_pretrained(hf, out).eval()
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():
        expected = merged(input_ids=ids).logits
        got = ours(ids)
    rel = (got - expected).norm() / expected.norm()
    assert rel < 1e-5
    # The adapter really changes the output, so the comparison above is not vacuous.
    with torch.no_grad():
        base = merged.get_base_model()
        with merged.disable_adapter():
            plain = base(input_ids=ids).logits
    assert (plain - expected).norm() / expected.norm() > 1e-3
