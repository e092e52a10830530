"""model.connector_init=match_embeddings: the fresh connector's output RMS equals the LLM's
token embeddings' RMS, measured directly, on probe and on real images; nothing else changes."""

import pytest
import torch

from pefomed.engine.build import build_model, match_connector_to_embeddings
from pefomed.engine.config import ConfigError, load_config
from pefomed.engine.data import synthetic
from pefomed.engine.data.images import load_image
from pefomed.models import connectors

TINY = ["model.random_init=true", "model.llm=tiny", "model.vision=tiny", "model.image_size=32", "model.dtype=float32",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "model.llm_overrides={vocab_size: 300}"]


def build(*extra: str):
    return build_model(load_config("configs/demo.yaml", [*TINY, *extra]), "cpu")


def rms64(t: torch.Tensor) -> float:
    return float(t.detach().double().pow(2).mean().sqrt())


def connector_output(model, pixels: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.connector(model.encode_images(pixels))


def test_output_rms_equals_the_embedding_rms_on_probe_and_real_images(tmp_path):
    default, matched = build(), build("model.connector_init=match_embeddings")
    target = rms64(matched.llm.get_input_embeddings().weight)
    probe = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # the build's seeded probe
    assert rms64(connector_output(matched, probe)) == pytest.approx(target, rel=1e-5)
    # Behind ln_vision every token has unit RMS, so real images of either family give the same scale.
    for family in synthetic.FAMILIES:
        root = synthetic.generate(tmp_path / family, n_train=24, n_test=3, image_size=32, seed=1, family=family)
        real = torch.stack([load_image(p, 32) for p in sorted((root / "images").iterdir())[:16]])
        assert rms64(connector_output(matched, real)) == pytest.approx(target, rel=0.03)
        # nn.Linear's init is far off (0.56 here against the tiny LLM's N(0, 1) table; ~4x above
        # SmolLM2's, docs/demo.md), so the match is not the init's own scale by chance.
        assert abs(rms64(connector_output(default, real)) / target - 1) > 0.3
    # One factor on the last linear's weight and bias, nothing else trained or frozen changes
    # (the probe draws from its own generator, not the global one the adapters are drawn from).
    w0, w1 = default.connector.llama_proj.weight.detach().double(), matched.connector.llama_proj.weight.detach().double()
    factor = float((w1 / w0).median())
    assert torch.allclose(w1, factor * w0, rtol=1e-6, atol=0)
    assert torch.allclose(matched.connector.llama_proj.bias.detach().double(),
                          factor * default.connector.llama_proj.bias.detach().double(),
                          rtol=1e-6, atol=1e-12)
    ref = dict(default.named_parameters())
    for name, p in matched.named_parameters():
        if not name.startswith("connector."):
            assert torch.equal(p, ref[name]), name
    assert factor == pytest.approx(target / rms64(connector_output(default, probe)), rel=1e-5)


def test_bfloat16_model_is_matched_as_the_forward_feeds_it():
    model = build("model.dtype=bfloat16", "model.connector_init=match_embeddings")
    assert model.connector.llama_proj.weight.dtype == torch.float32  # trained parameters stay fp32
    probe = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    feats = model.encode_images(probe.bfloat16()).to(torch.bfloat16)
    with torch.no_grad():
        out = model.connector(feats)
    assert rms64(out) == pytest.approx(rms64(model.llm.get_input_embeddings().weight), rel=2e-2)


@pytest.mark.parametrize("kind", ["linear", "mlp2x_gelu", "grouped"])
def test_scale_output_scales_the_output_exactly(kind):
    torch.manual_seed(0)
    connector = connectors.build_connector(kind, 16, 24, group=4)
    feats = torch.randn(2, 17, 16)
    before = connector(feats).double()
    connectors.scale_output_(connector, 0.3)
    assert torch.allclose(connector(feats).double(), 0.3 * before, rtol=1e-5, atol=1e-7)


def test_llava_connector_is_matched_too():
    model = build("model.arch=llava", "model.connector=mlp2x_gelu", "model.connector_init=match_embeddings")
    probe = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert rms64(connector_output(model, probe)) == pytest.approx(rms64(model.llm.get_input_embeddings().weight), rel=1e-5)


def test_match_returns_the_factor_it_applied():
    model = build()
    probe = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    before = rms64(connector_output(model, probe))
    factor = match_connector_to_embeddings(model, 32, seed=5)
    assert factor == pytest.approx(rms64(model.llm.get_input_embeddings().weight) / before, rel=1e-5)


@pytest.mark.parametrize("overrides, match", [
    (["model.projection_checkpoint=/x/projection.safetensors"], "model.projection_checkpoint replaces it: remove one"),
    (["train.strategy=fsdp2"], "use train.strategy=ddp or deepspeed, or model.connector_init=default"),
    (["model.arch=idefics2", "model.connector=grouped"], "brings its own connector: set model.connector_init=default"),
])
def test_config_refuses_where_it_does_not_apply(overrides, match):
    with pytest.raises(ConfigError, match=r"model\.connector_init.*" + match):
        load_config("configs/demo.yaml", ["model.connector_init=match_embeddings", *overrides])


def test_config_refuses_an_unknown_init():
    with pytest.raises(ConfigError, match=r"model\.connector_init='xavier' is not one of \['default', 'match_embeddings'\]"):
        load_config("configs/demo.yaml", ["model.connector_init=xavier"])
