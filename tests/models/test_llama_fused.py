"""q/k/v and gate/up as one GEMM each (`models.llama.fused_projections`) against the projections
called one by one, in a model with LoRA adapters (dropout on) built by the engine's factory."""

import pytest
import torch

from pefomed.engine.config import LoRAConfig
from pefomed.engine.lora import lora_parameter_names, make_linear_factory
from pefomed.models.llama import LlamaConfig, LlamaForCausalLM

CONFIG = dict(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2)  # fmt: skip


def build(targets=("q_proj", "v_proj"), bias=False, dtype=torch.float32):
    torch.manual_seed(0)
    cfg = LoRAConfig(r=8, alpha=16, dropout=0.1, target_modules=list(targets))
    model = LlamaForCausalLM(LlamaConfig(**CONFIG, attention_bias=bias), linear_factory=make_linear_factory(cfg))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # a trained-looking adapter, so that every gradient is nonzero
    trainable = set(lora_parameter_names(model))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return model.to(dtype).train()


def one_by_one(model):
    """A no-op hook on a projection makes its group run module by module (hooks must see the call)."""
    return [m.register_forward_pre_hook(lambda *a: None) for layer in model.model.layers
            for m in (layer.self_attn.q_proj, layer.mlp.gate_proj)]  # fmt: skip


def step(model, embeds, labels, seed=4):
    torch.manual_seed(seed)
    embeds = embeds.detach().requires_grad_()
    loss, _ = model.loss(labels, inputs_embeds=embeds)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [embeds] + [dict(model.named_parameters())[n] for n in names])
    return loss, dict(zip(["embeds"] + names, grads))


def batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(2)
    embeds = torch.randn(3, 11, CONFIG["hidden_size"], generator=g).to(dtype)
    labels = torch.randint(0, CONFIG["vocab_size"], (3, 11), generator=g)
    labels[:, :6] = -100
    return embeds, labels


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
                                     ("o_proj",)])  # fmt: skip
@pytest.mark.parametrize("bias", [False, True])
def test_fused_equals_one_by_one(targets, bias):
    model = build(targets, bias)
    embeds, labels = batch()
    loss, grads = step(model, embeds, labels)
    attn = model.model.layers[0].self_attn
    # the frozen weights now lie one after another in one storage: q, k, v
    q, k, v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    assert q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr() == v.untyped_storage().data_ptr()
    assert k.storage_offset() == q.numel() and v.storage_offset() == q.numel() + k.numel()
    hooks = one_by_one(model)
    loss_ref, grads_ref = step(model, embeds, labels)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(loss, loss_ref, rtol=1e-6, atol=0)
    assert grads.keys() == grads_ref.keys() and len(grads) > 1
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fused_in_float64_equals_one_by_one_to_rounding_and_survives_a_cast():
    model = build()
    embeds, labels = batch()
    step(model, embeds, labels)  # joins the float32 weights
    model = model.double()  # new storages per parameter: the next call joins them again
    loss, grads = step(model, embeds.double(), labels)
    hooks = one_by_one(model)
    loss_ref, grads_ref = step(model, embeds.double(), labels)
    for h in hooks:
        h.remove()
    assert abs(float((loss - loss_ref).detach())) < 1e-12
    for name in grads:
        assert float((grads[name] - grads_ref[name]).norm() / grads_ref[name].norm()) < 1e-11, name


def test_joining_changes_no_weight_and_loading_still_writes_through():
    model = build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    embeds, labels = batch()
    loss, _ = step(model, embeds, labels)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    # load_state_dict copies into the parameters, so into the joined storage the next GEMM reads
    changed = {k: (v * 0.5 if k.endswith("k_proj.weight") else v) for k, v in before.items()}
    model.load_state_dict(changed)
    loss_half, _ = step(model, embeds, labels)
    hooks = one_by_one(model)
    loss_ref, _ = step(model, embeds, labels)
    for h in hooks:
        h.remove()
    assert not torch.equal(loss, loss_half)
    torch.testing.assert_close(loss_half, loss_ref, rtol=1e-6, atol=0)


def test_eval_forward_runs_fused_and_equals_one_by_one():
    model = build().eval()
    ids = torch.randint(3, 300, (2, 5))
    with torch.no_grad():
        fused = model(ids)
        hooks = one_by_one(model)
        plain = model(ids)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    attn = model.model.layers[1].self_attn
    assert attn.k_proj.weight.untyped_storage().data_ptr() == attn.q_proj.weight.untyped_storage().data_ptr()
