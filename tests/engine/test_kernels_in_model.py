"""`model.kernels: triton` and `model.kernels: torch` give the same loss and gradients.

The adapters are non-zero (B set explicitly, so dA is not trivially 0) and the LoRA dropout is
active. The two paths draw the same dropout masks: the torch path here is the plain PyTorch
LoRA reference fed the Triton kernel's mask for the seed that the kernel itself draws from
torch's generator, so the comparison is exact up to rounding, and a mask, row or scale that is
off by anything shows far above the bound (the test checks that a different mask does).
"""

import dataclasses

import pytest
import torch

from pefomed.engine.build import build_model
from pefomed.engine.config import load_config
from pefomed.engine.ops import torch_ops

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED_RANGE = 2**31 - 1  # kernels.lora draws its dropout seed as torch.randint(0, SEED_RANGE, (1,))
BOUND = 1e-5  # fp32 end to end; a wrong mask gives O(1e-1) (checked below)


def tiny_config(kernels: str, dropout: float = 0.1):
    return load_config(None, [
        "model.random_init=true", "model.llm=tiny", "model.vision=tiny", "model.image_size=32",
        "model.dtype=float32", f"model.kernels={kernels}",
        "model.llm_overrides={vocab_size: 50, hidden_size: 32, intermediate_size: 40, num_hidden_layers: 1, num_attention_heads: 2}",
        "lora.r=4", "lora.alpha=8", f"lora.dropout={dropout}", "lora.target_modules=[q_proj, v_proj]",
    ])  # fmt: skip


def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 11), generator=g)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[:, 1:5] = True  # 32 px / patch 8 = 16 patches -> 4 image tokens
    labels = torch.full((2, 11), -100)
    labels[:, 7:] = ids[:, 7:]
    b = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "input_ids": ids, "labels": labels,
         "image_token_mask": mask, "attention_mask": torch.ones(2, 11, dtype=torch.long)}  # fmt: skip
    return {k: v.to(DEVICE) for k, v in b.items()}


def torch_ops_with_kernel_masks():
    """The plain PyTorch path, drawing each layer's dropout seed as the Triton kernel does."""
    from pefomed.kernels.lora import lora_linear_reference

    def lora_linear(x, weight, lora_A, lora_B, scaling, bias=None, dropout_p=0.0, training=True):
        seed = None
        if training and dropout_p > 0:
            seed = torch.randint(0, SEED_RANGE, (1,), device=x.device, dtype=torch.int64)
        return lora_linear_reference(x, weight, lora_A, lora_B, scaling, bias, dropout_p, training, seed=seed)

    return dataclasses.replace(torch_ops(), lora_linear=lora_linear)


def set_adapters(model) -> None:
    """Non-zero A and B, the same on every build (B = 0 would make dA = 0 on any path)."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def loss_and_grads(model, seed: int):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, _ = model(batch())
    loss.backward()
    return loss.detach().double(), {k: p.grad.double() for k, p in model.named_parameters() if p.requires_grad}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_triton_and_torch_paths_agree_with_dropout_and_nonzero_adapters():
    reference = build_model(tiny_config("torch"), DEVICE, ops=torch_ops_with_kernel_masks())
    fused = build_model(tiny_config("triton"), DEVICE)
    for model in (reference, fused):
        set_adapters(model)
    loss_r, grads_r = loss_and_grads(reference, seed=11)
    loss_k, grads_k = loss_and_grads(fused, seed=11)
    assert sorted(grads_r) == sorted(grads_k) and len(grads_r) == 4 + 2
    for name, g in grads_r.items():
        assert g.norm() > 1e-3, name  # every gradient is really exercised, dA included
    assert rel(loss_k, loss_r) < BOUND
    for name in grads_r:
        assert rel(grads_k[name], grads_r[name]) < BOUND, name

    # The bound discriminates: another dropout mask (seed) moves the adapter gradients far past it.
    _, other = loss_and_grads(fused, seed=12)
    lora_grads = [n for n in grads_r if ".lora_" in n]
    assert all(rel(other[n], grads_k[n]) > 1e-2 for n in lora_grads)


def test_size_overrides_recompute_derived_fields():
    from pefomed.engine.build import llm_config

    cfg = llm_config(tiny_config("torch"))
    assert cfg.hidden_size == 32 and cfg.head_dim == 16 and cfg.num_key_value_heads == 2


def qlora_config(kernels: str):
    cfg = tiny_config(kernels)
    cfg.model.quantize_llm = "nf4"
    return cfg


def test_qlora_model_equals_dequantized_reference_through_both_paths():
    """QLoRA's NF4 frozen weights are quantized at build time; the model equals the same model with
    those weights dequantized into full-precision layers, on the torch and on the Triton path."""
    from pefomed.kernels.nf4 import NF4Tensor, to_nf4

    dense = build_model(tiny_config("torch"), DEVICE, ops=torch_ops_with_kernel_masks())
    qlora = build_model(qlora_config("torch"), DEVICE, ops=torch_ops_with_kernel_masks())
    fused = build_model(qlora_config("triton"), DEVICE)
    blocks = dict(qlora.llm.model.layers.named_parameters())
    quantized = sorted(n for n, p in blocks.items() if isinstance(p, NF4Tensor))
    leaves = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
    assert quantized == sorted(f"0.{leaf}.weight" for leaf in leaves)
    assert not any(isinstance(p, NF4Tensor) for n, p in qlora.named_parameters() if not n.startswith("llm.model.layers."))
    dense_blocks = dict(dense.llm.model.layers.named_parameters())
    with torch.no_grad():
        for name in quantized:
            # Random init, then quantize: the stored codes are those of the full-precision init.
            expected = to_nf4(dense_blocks[name].detach()).dequantize(torch.float64)
            assert torch.equal(blocks[name].dequantize(torch.float64), expected), name
            dense_blocks[name].copy_(blocks[name].dequantize(torch.float32))
            assert torch.equal(dict(fused.llm.model.layers.named_parameters())[name].dequantize(torch.float64), expected)
    for model in (dense, qlora, fused):
        set_adapters(model)
    loss_d, grads_d = loss_and_grads(dense, seed=3)
    loss_q, grads_q = loss_and_grads(qlora, seed=3)
    loss_f, grads_f = loss_and_grads(fused, seed=3)
    assert sorted(grads_q) == sorted(grads_d) and len(grads_d) == 4 + 2
    assert rel(loss_q, loss_d) < BOUND and rel(loss_f, loss_d) < BOUND
    for name in grads_d:
        assert grads_d[name].norm() > 1e-3, name
        assert rel(grads_q[name], grads_d[name]) < BOUND, name
        assert rel(grads_f[name], grads_d[name]) < BOUND, name
    # The NF4 rounding is visible at this bound: the same model and adapters with the
    # full-precision weights give another loss.
    full = build_model(tiny_config("torch"), DEVICE, ops=torch_ops_with_kernel_masks())
    set_adapters(full)
    loss_full, _ = loss_and_grads(full, seed=3)
    assert rel(loss_full, loss_d) > 10 * BOUND
