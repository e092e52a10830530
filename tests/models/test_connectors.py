"""LLaVA's projectors (`linear`, `mlp2x_gelu`) in models.connectors, against transformers'
LlavaMultiModalProjector and a float64 reference."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from pefomed.models.connectors import GroupedProjection, PatchProjector, build_connector

VISION, LLM = 48, 64


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def randomized(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def features(batch: int = 2, n: int = 17, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, n, VISION, generator=torch.Generator().manual_seed(seed))


def test_mlp2x_gelu_has_llava_names_and_matches_transformers_projector():
    ours = randomized(PatchProjector(VISION, LLM, "mlp2x_gelu"))
    assert set(ours.state_dict()) == {"mm_projector.0.weight", "mm_projector.0.bias", "mm_projector.2.weight",
                                      "mm_projector.2.bias"}
    cfg = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(hidden_size=VISION),
        text_config=transformers.LlamaConfig(hidden_size=LLM),
        projector_hidden_act="gelu",
    )
    hf = LlavaMultiModalProjector(cfg)
    sd = ours.state_dict()
    hf.load_state_dict({
        "linear_1.weight": sd["mm_projector.0.weight"], "linear_1.bias": sd["mm_projector.0.bias"],
        "linear_2.weight": sd["mm_projector.2.weight"], "linear_2.bias": sd["mm_projector.2.bias"],
    })
    x = features()
    with torch.no_grad():
        got = ours(x)
        want = hf(x[:, 1:])  # LLaVA-1.5's select_feature="patch": the CLS token is dropped
    assert got.shape == (2, 16, LLM)
    assert rel_err(got, want) < 1e-6
    # And against float64 arithmetic written out here.
    w1, b1, w2, b2 = (sd[k].double() for k in ("mm_projector.0.weight", "mm_projector.0.bias",
                                                "mm_projector.2.weight", "mm_projector.2.bias"))
    h = x[:, 1:].double() @ w1.T + b1
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))
    assert rel_err(got, h @ w2.T + b2) < 1e-6


def test_linear_projector_is_one_linear_per_patch():
    ours = randomized(PatchProjector(VISION, LLM, "linear"))
    assert set(ours.state_dict()) == {"mm_projector.weight", "mm_projector.bias"}
    x = features()
    want = x[:, 1:].double() @ ours.mm_projector.weight.double().T + ours.mm_projector.bias.double()
    assert rel_err(ours(x), want) < 1e-6


def test_project_into_fills_the_placeholders_in_order_and_trains_the_projector():
    ours = randomized(PatchProjector(VISION, LLM, "mlp2x_gelu"))
    x = features(batch=2, n=5)  # 4 patch tokens per image
    embeds = torch.randn(2, 9, LLM)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[0, 2:6] = True
    mask[1, 5:9] = True
    out = ours.project_into(x, embeds, mask)
    projected = ours(x)
    assert torch.equal(out[0, 2:6], projected[0]) and torch.equal(out[1, 5:9], projected[1])
    assert torch.equal(out[~mask], embeds[~mask])
    out.sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in ours.parameters())


def test_a_placeholder_count_that_differs_from_the_patch_count_is_an_error():
    ours = PatchProjector(VISION, LLM, "linear")
    mask = torch.zeros(1, 9, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(ValueError, match=r"exactly 4 image placeholder tokens, got \[3\]"):
        ours.project_into(features(batch=1, n=5), torch.zeros(1, 9, LLM), mask)


def test_fp32_projector_runs_on_bf16_features():
    ours = randomized(PatchProjector(VISION, LLM, "mlp2x_gelu"))
    x = features()
    out = ours(x.bfloat16())
    assert out.dtype == torch.bfloat16
    assert rel_err(out, ours(x)) < 2e-2


def test_build_connector_chooses_by_name():
    assert isinstance(build_connector("grouped", VISION, LLM, group=4), GroupedProjection)
    assert isinstance(build_connector("mlp2x_gelu", VISION, LLM), PatchProjector)
    assert build_connector("linear", VISION, LLM).n_output_tokens(197) == 196
    with pytest.raises(ValueError, match="expected one of grouped, linear, mlp2x_gelu"):
        build_connector("mlp3x_gelu", VISION, LLM)


def test_llava_projector_checkpoint_loads_through_build(tmp_path):
    """LLaVA's pre-training writes mm_projector.bin with keys `model.mm_projector.N.*`."""
    from pefomed.engine.build import load_projection

    source = randomized(PatchProjector(VISION, LLM, "mlp2x_gelu"), seed=5)
    torch.save({f"model.{k}": v for k, v in source.state_dict().items()}, tmp_path / "mm_projector.bin")
    target = PatchProjector(VISION, LLM, "mlp2x_gelu")
    load_projection(target, str(tmp_path / "mm_projector.bin"), torch.device("cpu"))
    x = features()
    assert torch.equal(target(x), source(x))
    assert F.mse_loss(target(x), source(x)) == 0
