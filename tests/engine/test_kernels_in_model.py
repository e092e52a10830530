"""`model.kernels: triton` and `model.kernels: torch` give the same loss and gradients."""

import pytest
import torch

from pefomed.engine.build import build_model
from pefomed.engine.config import load_config

pytest.importorskip("triton")


def tiny_config(kernels: str):
    return load_config(None, [
        "model.random_init=true", "model.llm=tiny", "model.vision=tiny", "model.image_size=32",
        "model.dtype=float32", f"model.kernels={kernels}",
        "model.llm_overrides={vocab_size: 50, hidden_size: 32, intermediate_size: 40, num_hidden_layers: 1, num_attention_heads: 2}",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "lora.target_modules=[q_proj, v_proj]",
    ])


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 11), generator=g)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[:, 1:5] = True  # 32 px / patch 8 = 16 patches -> 4 image tokens
    labels = torch.full((2, 11), -100)
    labels[:, 7:] = ids[:, 7:]
    return {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "input_ids": ids, "labels": labels,
            "image_token_mask": mask, "attention_mask": torch.ones(2, 11, dtype=torch.long)}


def test_triton_and_torch_paths_agree():
    results = {}
    for kernels in ("torch", "triton"):
        model = build_model(tiny_config(kernels), log=None)
        with torch.no_grad():  # non-zero adapters, so the LoRA term matters
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
        loss, n = model(batch())
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results[kernels] = (loss.detach(), grads)
    (loss_t, grads_t), (loss_k, grads_k) = results["torch"], results["triton"]
    assert torch.allclose(loss_t, loss_k, rtol=1e-5, atol=1e-6)
    assert grads_t.keys() == grads_k.keys() and len(grads_t) == 4 + 2
    for name in grads_t:
        err = (grads_k[name] - grads_t[name]).norm() / grads_t[name].norm().clamp_min(1e-12)
        assert err < 1e-4, name


def test_size_overrides_recompute_derived_fields():
    from pefomed.engine.build import llm_config

    cfg = llm_config(tiny_config("torch"))
    assert cfg.hidden_size == 32 and cfg.head_dim == 16 and cfg.num_key_value_heads == 2


def _loss_and_grads(model):
    loss, _ = model(batch())
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}


def test_qlora_model_equals_dequantized_reference_and_triton():
    from pefomed.kernels.nf4 import quantize_nf4

    quantized = build_model(tiny_config("torch"), log=None)
    cfg = tiny_config("torch")
    cfg.model.quantize_llm = "nf4"
    qlora = build_model(cfg, log=None)
    # Reference: the same model in full precision, its LLM linears replaced by their NF4 round trip.
    with torch.no_grad():
        for name, module in quantized.llm.model.layers.named_modules():
            if "lora_" not in name and (isinstance(module, torch.nn.Linear) or hasattr(module, "lora_A")):
                module.weight.copy_(quantize_nf4(module.weight).dequantize())
    n_nf4 = sum(1 for m in qlora.llm.model.layers.modules() if hasattr(getattr(m, "weight", None), "packed"))
    assert n_nf4 == 7  # q, k, v, o, gate, up, down
    ref_loss, ref_grads = _loss_and_grads(quantized)
    loss, grads = _loss_and_grads(qlora)
    assert torch.allclose(loss, ref_loss, rtol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7)

    cfg_t = tiny_config("triton")
    cfg_t.model.quantize_llm = "nf4"
    t_loss, t_grads = _loss_and_grads(build_model(cfg_t, log=None))
    assert torch.allclose(t_loss, loss, rtol=1e-5)
    for name in grads:
        err = (t_grads[name] - grads[name]).norm() / grads[name].norm().clamp_min(1e-12)
        assert err < 1e-4, name
