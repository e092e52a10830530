import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from pefomed.engine.build import build_model
from pefomed.engine.config import ConfigError, LoRAConfig, load_config
from pefomed.engine.lora import (
    ADAPTER_KEYS,
    LoRALinear,
    adapter_state_dict,
    freeze_except,
    init_fresh_adapters,
    lora_parameter_names,
    make_linear_factory,
    peft_adapter_config,
    write_adapter_config,
)
from pefomed.models.loading import CheckpointError


def test_pefomed_trainable_count_on_meta(caplog):
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
    with caplog.at_level(logging.INFO, logger="pefomed.engine.lora"):
        n = freeze_except(llm, lora_parameter_names(llm))
    assert n == lora
    assert "trainable parameters: 33,554,432" in caplog.text
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


def tiny_model_config(*overrides):
    return load_config(None, [
        "model.random_init=true", "model.llm=tiny", "model.vision=tiny", "model.image_size=32",
        "model.dtype=float32", "model.kernels=torch",
        "model.llm_overrides={vocab_size: 50, hidden_size: 32, intermediate_size: 40, num_hidden_layers: 2, num_attention_heads: 2}",
        "lora.r=4", "lora.alpha=8", *overrides,
    ])  # fmt: skip


def test_target_that_matches_no_layer_is_a_config_error():
    with pytest.raises(ConfigError) as err:
        build_model(tiny_model_config("lora.target_modules=[q_proj, qproj]"))
    message = str(err.value)
    assert message.startswith("lora.target_modules: ['qproj'] match no linear layer of the model")
    for leaf in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert f"'{leaf}'" in message


def test_all_linear_adapts_every_projection_and_trains_only_them(caplog):
    with caplog.at_level(logging.INFO, logger="pefomed.engine.lora"):
        model = build_model(tiny_model_config("lora.target_modules=[all-linear]"))
    adapted = sorted(n for n, m in model.llm.named_modules() if isinstance(m, LoRALinear))
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
    assert adapted == sorted(f"model.layers.{i}.{leaf}" for i in range(2) for leaf in leaves)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    connector = {"connector.llama_proj.weight", "connector.llama_proj.bias"}
    assert trainable == {f"llm.{n}" for n in lora_parameter_names(model.llm)} | connector
    assert len(trainable) == 2 * 7 * 2 + 2
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n in trainable)
    n_trainable = sum(p.numel() for n, p in model.named_parameters() if n in trainable)
    assert f"trainable parameters: {n_trainable:,}" in caplog.text
    # The adapters are real: every one is exported under PEFT's names.
    assert len(adapter_state_dict(model.llm)) == 2 * 7 * 2


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
        tmp_path / "base", dtype=torch.float32, linear_factory=make_linear_factory(cfg), allow_missing=ADAPTER_KEYS
    ).eval()
    assert init_fresh_adapters(ours, "cpu", torch.float32) == 2 * 3
    ids = torch.randint(0, 97, (2, 11))
    with torch.no_grad():  # fresh adapters (PEFT's init: A random, B = 0) change nothing
        assert all(bool(m.lora_A.weight.abs().sum() > 0) and not m.lora_B.weight.any()
                   for m in ours.modules() if isinstance(m, LoRALinear))  # fmt: skip
        assert (ours(ids) - hf(input_ids=ids).logits).norm() / hf(input_ids=ids).logits.norm() < 1e-5
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


def test_base_checkpoint_without_adapter_allowance_is_an_error(tmp_path):
    """models/ knows nothing of adapters: parameters a checkpoint lacks are an error unless allowed."""
    from pefomed.models.llama import LlamaForCausalLM

    _tiny_hf_llama(tmp_path)
    cfg = LoRAConfig(r=4, alpha=8, target_modules=["q_proj"])
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint.*q_proj\.lora_A\.weight"):
        LlamaForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32, linear_factory=make_linear_factory(cfg))


def test_adapter_of_another_config_is_refused(tmp_path):
    """A saved adapter loads only into the layers it was saved from (PEFT names, shapes)."""
    from pefomed.engine.lora import load_adapter_state_dict

    model = build_model(tiny_model_config("lora.target_modules=[q_proj]"))
    state = adapter_state_dict(model.llm)
    with pytest.raises(CheckpointError, match=r"a\.safetensors: adapter does not match.*missing.*lora.target_modules"):
        load_adapter_state_dict(build_model(tiny_model_config("lora.target_modules=[q_proj, v_proj]")).llm, state, "a.safetensors")
    wider = {k: torch.zeros(8, v.shape[1]) if ".lora_A." in k else torch.zeros(v.shape[0], 8) for k, v in state.items()}
    with pytest.raises(CheckpointError, match=r"has shape \[8, 32\] but the model expects \[4, 32\]; check lora.r"):
        load_adapter_state_dict(model.llm, wider, "b.safetensors")


def test_peft_target_modules_select_exactly_the_adapted_layers():
    """PEFT's own matcher, given our adapter_config, picks the layers that carry adapters and no others."""
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from pefomed.engine.lora import PEFT_PREFIX, peft_target_modules

    def keys(modules):
        return [f"{PEFT_PREFIX}{m}.lora_{ab}.weight" for m in modules for ab in "AB"]

    llama = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]
    assert peft_target_modules(keys(llama)) == ["q_proj", "v_proj"]

    adapted = ["model.text_model.layers.0.self_attn.q_proj", "model.text_model.layers.1.mlp.down_proj",
               "model.connector.modality_projection.up_proj", "model.connector.perceiver_resampler.layers.0.self_attn.q_proj"]
    untouched = ["model.vision_model.encoder.layers.0.self_attn.q_proj", "model.text_model.layers.0.self_attn.k_proj",
                 "lm_head", "model.connector.modality_projection.down_proj"]
    config = LoraConfig(r=4, target_modules=peft_target_modules(keys(adapted)))
    assert all(check_target_module_exists(config, name) for name in adapted)
    assert not any(check_target_module_exists(config, name) for name in untouched)
