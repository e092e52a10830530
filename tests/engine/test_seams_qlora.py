"""QLoRA is chosen when the model is built: the linear factory makes NF4 frozen weights.

- random init: each layer is quantized right after its init (tests/engine/test_kernels_in_model.py
  checks the codes and the equality with the dequantized model on both kernel paths);
- a full-precision checkpoint: each weight is quantized as the loader assigns it, before the next
  tensor is read, so the full-precision model is never held;
- `kernels: torch` with `quantize_llm: nf4` is plain PyTorch: it runs where Triton cannot be imported.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pefomed.models.llama as llama_module
from pefomed.engine.build import build_model
from pefomed.engine.config import LoRAConfig, load_config
from pefomed.engine.lora import ADAPTER_KEYS, FrozenNF4Linear, LoRALinear, init_fresh_adapters, make_linear_factory
from pefomed.kernels.nf4 import NF4Tensor, to_nf4
from pefomed.models.llama import LlamaForCausalLM

LINEAR_LEAVES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def save_tiny_hf_llama(folder):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(config).eval()
    hf.save_pretrained(folder, max_shard_size="60KB")  # several shards, read one after another
    return hf


def is_linear_weight(name: str) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in LINEAR_LEAVES


def test_checkpoint_weights_are_quantized_as_they_arrive(tmp_path, monkeypatch):
    hf = save_tiny_hf_llama(tmp_path)
    events = []

    def quantize(weight):
        events.append("quantize")
        return to_nf4(weight)

    def streamed(path):
        for name, tensor in iter_state_dict(path):
            if is_linear_weight(name):
                # Every linear weight read so far has been quantized before this one is read.
                assert events.count("read") == events.count("quantize"), name
                events.append("read")
            yield name, tensor

    iter_state_dict = llama_module.iter_state_dict
    monkeypatch.setattr(llama_module, "iter_state_dict", streamed)
    cfg = LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])
    factory = make_linear_factory(cfg, quantize=quantize, dtype=torch.float32)
    model = LlamaForCausalLM.from_pretrained(
        tmp_path, dtype=torch.float32, linear_factory=factory, allow_missing=ADAPTER_KEYS
    )
    init_fresh_adapters(model, "cpu", torch.float32)
    assert events.count("read") == events.count("quantize") == 2 * 7
    assert events[-1] == "quantize"

    checkpoint = hf.state_dict()
    for name, p in model.model.layers.named_parameters():
        full = f"model.layers.{name}"
        if is_linear_weight(full):
            assert isinstance(p, NF4Tensor) and not p.requires_grad, full
            expected = to_nf4(checkpoint[full]).dequantize(torch.float64)
            assert torch.equal(p.dequantize(torch.float64), expected), full
        else:
            assert not isinstance(p, NF4Tensor), full
    kinds = {type(m) for m in model.model.layers.modules() if isinstance(m, (LoRALinear, FrozenNF4Linear))}
    assert kinds == {LoRALinear, FrozenNF4Linear}

    # A fresh adapter changes nothing: the model is transformers' with its linears NF4-rounded.
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if is_linear_weight(name) and name.startswith("model.layers."):
                p.copy_(to_nf4(p.detach()).dequantize(torch.float32))
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        assert float((model(ids) - expected).norm() / expected.norm()) < 1e-5


def test_build_model_loads_a_checkpoint_as_qlora(tmp_path):
    save_tiny_hf_llama(tmp_path / "llm")
    cfg = load_config(None, [
        f"model.llm={tmp_path / 'llm'}", "model.vision=tiny", "model.image_size=32", "model.dtype=bfloat16",
        "model.quantize_llm=nf4", "model.kernels=torch", "lora.target_modules=[all-linear]",
    ])  # fmt: skip
    model = build_model(cfg, "cpu")
    nf4 = {n for n, p in model.named_parameters() if isinstance(p, NF4Tensor)}
    assert len(nf4) == 2 * 7 and all(n.startswith("llm.model.layers.") for n in nf4)
    assert all(model.get_parameter(n).dtype == torch.bfloat16 for n in nf4)  # dequantizes to model.dtype
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 2 * 7 * 2 + 2 and not trainable & nf4
    assert all(model.get_parameter(n).dtype == torch.float32 for n in trainable)


def test_torch_kernels_with_nf4_never_touch_triton():
    """The demo's settings with QLoRA, in a fresh interpreter where `import triton` fails."""
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # any import of triton now fails
        import torch
        from pefomed.engine.build import build_model
        from pefomed.engine.config import load_config
        from pefomed.kernels.nf4 import NF4Tensor

        cfg = load_config("configs/demo.yaml", [
            "model.image_size=32", "model.quantize_llm=nf4", "model.kernels=torch",
            "model.llm_overrides={vocab_size: 64, num_hidden_layers: 2}",
        ])
        model = build_model(cfg, "cpu").train()
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 64, (2, 11), generator=g)
        mask = torch.zeros(2, 11, dtype=torch.bool)
        mask[:, 1:5] = True  # 32 px / patch 8 = 16 patches -> 4 image tokens
        labels = torch.full((2, 11), -100)
        labels[:, 7:] = ids[:, 7:]
        loss, n = model({"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "input_ids": ids,
                         "labels": labels, "image_token_mask": mask})
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and bool(torch.isfinite(g).all()) for g in grads)
        n_nf4 = sum(isinstance(p, NF4Tensor) for p in model.parameters())
        print("ok", int(n), len(grads), n_nf4, "triton" in sys.modules and sys.modules["triton"] is not None)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    # 8 target tokens; all-linear: 2 layers x 7 adapters x (A, B) + the projection's weight and bias
    assert result.stdout.split() == ["ok", "8", str(2 * 7 * 2 + 2), str(2 * 7), "False"]
