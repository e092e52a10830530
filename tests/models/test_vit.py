"""Parity of models.vit against transformers' Blip2VisionModel (EVA-g) and CLIPVisionModel."""

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from models.loading import CheckpointError
from models.vit import CONFIGS, VisionTransformer, config_from_hf, from_hf_blip2, interpolate_pos_embed, to_hf_blip2


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


def tiny_blip2(image_size=56):
    cfg = transformers.Blip2VisionConfig(
        hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
        patch_size=14, image_size=image_size, layer_norm_eps=1e-6, qkv_bias=True,
    )
    torch.manual_seed(0)
    model = transformers.Blip2VisionModel(cfg).eval()
    with torch.no_grad():
        for layer in model.encoder.layers:  # EVA has no key bias; random q/v biases
            bias = layer.self_attn.qkv.bias
            bias.normal_()
            bias[64:128] = 0
    return cfg, model


def blip2_features(model, pixels):
    """Blip2's last block output before its post_layernorm (EVA in MiniGPT-v2 has no final norm)."""
    with torch.no_grad():
        out = model(pixel_values=pixels, output_hidden_states=True)
    return out.hidden_states[-1]


def test_eva_from_lavis_layout_matches_blip2(tmp_path):
    cfg, hf = tiny_blip2()
    lavis = from_hf_blip2(hf.state_dict())
    assert "blocks.0.attn.q_bias" in lavis and "blocks.0.attn.qkv.bias" not in lavis
    # A LAVIS-style .pth: a plain state dict, as eva_vit_g.pth is.
    torch.save({k: v for k, v in lavis.items()}, tmp_path / "eva_vit_g.pth")
    ours = VisionTransformer.from_pretrained(tmp_path / "eva_vit_g.pth", config_from_hf(cfg), layout="lavis").eval()
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got = ours(pixels)
    assert got.shape == (2, 17, 64)
    assert rel_err(got, blip2_features(hf, pixels)) < 1e-5


def test_rename_tables_are_inverse():
    _, hf = tiny_blip2()
    sd = hf.state_dict()
    back = to_hf_blip2(from_hf_blip2(sd))
    for key in back:
        assert torch.equal(back[key], sd[key]), key


def test_eva_hf_layout_loads_and_second_to_last_layer(tmp_path):
    cfg, hf = tiny_blip2()
    hf.save_pretrained(tmp_path)
    config = config_from_hf(cfg)
    config.num_layers = 2  # MiniGPT-v2 keeps 39 of 40 blocks: the rest of the file is ignored
    ours = VisionTransformer.from_pretrained(tmp_path, config, layout="hf_blip2").eval()
    pixels = torch.randn(1, 3, 56, 56)
    with torch.no_grad():
        expected = hf(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        assert rel_err(ours(pixels), expected) < 1e-5


def test_clip_matches_transformers(tmp_path):
    cfg = transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        patch_size=8, image_size=32, hidden_act="quick_gelu",
    )
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)  # non-trivial biases and norms
    hf.save_pretrained(tmp_path)
    ours = VisionTransformer.from_pretrained(tmp_path, config_from_hf(cfg), layout="hf_clip").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = hf(pixel_values=pixels)
        got = ours(pixels)
        assert rel_err(got, ref.last_hidden_state) < 1e-5
        assert rel_err(ours.norm(got[:, 0]), ref.pooler_output) < 1e-5


def test_position_embedding_interpolated_for_448px(tmp_path):
    cfg, hf = tiny_blip2(image_size=56)  # a 4x4 grid, like 224 px with patch 14 is 16x16
    lavis = from_hf_blip2(hf.state_dict())
    save_file({k: v.contiguous() for k, v in lavis.items()}, str(tmp_path / "eva.safetensors"))
    config = config_from_hf(cfg, image_size=112)  # an 8x8 grid, like 448 px
    ours = VisionTransformer.from_pretrained(tmp_path / "eva.safetensors", config)
    pos = lavis["pos_embed"]
    grid = pos[:, 1:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid.double(), size=(8, 8), mode="bicubic", align_corners=False)
    expected = expected.permute(0, 2, 3, 1).reshape(1, 64, 64)
    assert torch.equal(ours.pos_embed[:, :1], pos[:, :1])
    torch.testing.assert_close(ours.pos_embed[:, 1:].double(), expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert ours(torch.randn(1, 3, 112, 112)).shape == (1, 65, 64)


def test_shape_mismatch_names_key_and_shapes(tmp_path):
    cfg, hf = tiny_blip2()
    torch.save(from_hf_blip2(hf.state_dict()), tmp_path / "eva.pth")
    config = config_from_hf(cfg)
    config.intermediate_size = 128
    with pytest.raises(CheckpointError, match=r"blocks.0.mlp.fc1.weight has shape \[160, 64\].*\[128, 64\]"):
        VisionTransformer.from_pretrained(tmp_path / "eva.pth", config)


def test_non_square_grid_is_rejected():
    with pytest.raises(CheckpointError, match="not a square grid"):
        interpolate_pos_embed({"pos_embed": torch.zeros(1, 1 + 12, 8)}, 4)


def test_eva_g_parameter_count_on_meta():
    with torch.device("meta"):
        model = VisionTransformer(CONFIGS["eva-g-14"])
    d, m, p, layers, n_pos = 1408, 6144, 14, 39, (448 // 14) ** 2 + 1
    per_block = 2 * 2 * d + (3 * d * d + 2 * d) + (d * d + d) + (d * m + m) + (m * d + d)
    expected = (3 * p * p * d + d) + d + n_pos * d + layers * per_block
    assert sum(t.numel() for t in model.parameters()) == expected
