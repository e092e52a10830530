"""models.vit against transformers' Blip2VisionModel (the EVA-g architecture) and CLIPVisionModel.

The LAVIS-layout files are written by hand here from the transformers weights, following
LAVIS' `eva_vit.py` names, so the loader's rename tables are checked against an independent
mapping as well as against the transformers forward pass.
"""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import save_file

from pefomed.engine.config import LoRAConfig
from pefomed.engine.lora import ADAPTER_KEYS, LoRALinear, init_fresh_adapters, make_linear_factory
from pefomed.engine.ops import kernel_ops
from pefomed.models.loading import CheckpointError
from pefomed.models.vit import (
    CONFIGS,
    VisionConfig,
    VisionTransformer,
    config_from_hf,
    from_hf_blip2,
    from_hf_clip,
    interpolate_pos_embed,
    to_hf_blip2,
)

D = 64  # the tiny EVA's width
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial LayerNorm weights and biases (transformers initializes them to 1 and 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def tiny_blip2(image_size: int = 56, layers: int = 3) -> tuple[transformers.Blip2VisionConfig, transformers.Blip2VisionModel]:
    cfg = transformers.Blip2VisionConfig(
        hidden_size=D, intermediate_size=160, num_hidden_layers=layers, num_attention_heads=4,
        patch_size=14, image_size=image_size, layer_norm_eps=1e-6, qkv_bias=True, hidden_act="gelu",
    )
    torch.manual_seed(0)
    model = transformers.Blip2VisionModel(cfg).eval()
    perturb(model, 1)
    with torch.no_grad():
        for layer in model.encoder.layers:
            layer.self_attn.qkv.bias[D : 2 * D] = 0  # EVA has no key bias
    return cfg, model


def lavis_state(hf: transformers.Blip2VisionModel) -> dict[str, torch.Tensor]:
    """The eva_vit_g.pth layout (LAVIS eva_vit.py), written out by hand."""
    sd = hf.state_dict()
    out = {
        "cls_token": sd["embeddings.class_embedding"],
        "pos_embed": sd["embeddings.position_embedding"],
        "patch_embed.proj.weight": sd["embeddings.patch_embedding.weight"],
        "patch_embed.proj.bias": sd["embeddings.patch_embedding.bias"],
    }
    for i in range(hf.config.num_hidden_layers):
        h, e = f"encoder.layers.{i}.", f"blocks.{i}."
        bias = sd[h + "self_attn.qkv.bias"]
        out[e + "attn.qkv.weight"] = sd[h + "self_attn.qkv.weight"]
        out[e + "attn.q_bias"] = bias[:D]
        out[e + "attn.v_bias"] = bias[2 * D :]
        out[e + "attn.proj.weight"] = sd[h + "self_attn.projection.weight"]
        out[e + "attn.proj.bias"] = sd[h + "self_attn.projection.bias"]
        for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[e + ours + ".weight"] = sd[h + theirs + ".weight"]
            out[e + ours + ".bias"] = sd[h + theirs + ".bias"]
    return {k: v.clone() for k, v in out.items()}


def hidden_states(model, pixels, **kwargs):
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True, **kwargs)


def eva_config(cfg, **changes) -> VisionConfig:
    base = VisionConfig(
        hidden_size=D, num_layers=cfg.num_hidden_layers, num_heads=4, intermediate_size=160, patch_size=14,
        image_size=cfg.image_size, layer_norm_eps=1e-6,
    )
    return dataclasses.replace(base, **changes)


@pytest.mark.parametrize("wrapped", [False, True], ids=["eva_vit_g.pth", "whole-blip2-checkpoint"])
def test_eva_lavis_file_matches_blip2(tmp_path, wrapped):
    cfg, hf = tiny_blip2()
    state = lavis_state(hf)
    if wrapped:  # a LAVIS model checkpoint: {"model": {...}} with the ViT under visual_encoder.
        state = {"visual_encoder." + k: v for k, v in state.items()}
        state |= {"ln_vision.weight": torch.ones(D), "ln_vision.bias": torch.zeros(D), "query_tokens": torch.zeros(1, 4, D)}
        state = {"model": state}
    torch.save(state, tmp_path / "eva.pth")
    ours = VisionTransformer.from_pretrained(tmp_path / "eva.pth", eva_config(cfg), layout="lavis")
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got = ours(pixels)
    assert got.shape == (2, 1 + 16, D)
    # Blip2VisionModel's last_hidden_state has post_layernorm (BLIP-2's ln_vision) applied;
    # the EVA tower itself ends at the last block.
    assert rel_err(got, hidden_states(hf, pixels).hidden_states[-1]) < 1e-5


def test_eva_second_to_last_layer_skips_the_last_block(tmp_path):
    cfg, hf = tiny_blip2()
    torch.save(lavis_state(hf), tmp_path / "eva.pth")  # 3 blocks in the file
    config = CONFIGS["tiny-eva"]  # num_layers=3, output_layer=-2: MiniGPT-v2's 39 of 40, small
    assert config_from_hf(cfg, output_layer=-2) == config
    ours = VisionTransformer.from_pretrained(tmp_path / "eva.pth", config)
    assert len(ours.blocks) == 2
    pixels = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        got = ours(pixels)
    assert rel_err(got, hidden_states(hf, pixels).hidden_states[-2]) < 1e-5


def test_eva_hf_blip2_folder_loads(tmp_path):
    _, hf = tiny_blip2()
    hf.save_pretrained(tmp_path)
    ours = VisionTransformer.from_pretrained(tmp_path, layout="hf_blip2")  # config from config.json
    assert ours.norm is None
    pixels = torch.randn(2, 3, 56, 56)
    ref = hidden_states(hf, pixels)
    with torch.no_grad():
        assert rel_err(ours(pixels), ref.hidden_states[-1]) < 1e-5
    # post_layernorm maps to our final norm when the config keeps one.
    config = dataclasses.replace(ours.config, final_norm=True, normalize_output=True)
    normed = VisionTransformer.from_pretrained(tmp_path, config, layout="hf_blip2")
    with torch.no_grad():
        assert rel_err(normed(pixels), ref.last_hidden_state) < 1e-5


def test_blip2_rename_tables_against_the_hand_mapping():
    _, hf = tiny_blip2()
    sd = hf.state_dict()
    ours = from_hf_blip2(sd)
    expected = lavis_state(hf) | {"norm.weight": sd["post_layernorm.weight"], "norm.bias": sd["post_layernorm.bias"]}
    assert ours.keys() == expected.keys()
    for key in expected:
        assert torch.equal(ours[key], expected[key]), key
    back = to_hf_blip2(ours)
    assert back.keys() == sd.keys()
    for key in sd:
        assert torch.equal(back[key], sd[key]), key


def test_blip2_key_bias_must_be_zero():
    _, hf = tiny_blip2(layers=1)
    sd = hf.state_dict()
    sd["encoder.layers.0.self_attn.qkv.bias"] = sd["encoder.layers.0.self_attn.qkv.bias"].clone()
    sd["encoder.layers.0.self_attn.qkv.bias"][D + 3] = 0.5
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.0\.self_attn\.qkv\.bias.*key third.*non-zero"):
        from_hf_blip2(sd)


def tiny_clip(image_size: int = 32) -> tuple[transformers.CLIPVisionConfig, transformers.CLIPVisionModel]:
    cfg = transformers.CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        patch_size=8, image_size=image_size, hidden_act="quick_gelu",
    )
    torch.manual_seed(0)
    hf = transformers.CLIPVisionModel(cfg).eval()
    perturb(hf, 2)
    return cfg, hf


def test_clip_matches_transformers(tmp_path):
    _, hf = tiny_clip()
    hf.save_pretrained(tmp_path)
    ours = VisionTransformer.from_pretrained(tmp_path, layout="hf_clip")
    assert ours.config == CONFIGS["tiny-clip"]
    pixels = torch.randn(2, 3, 32, 32)
    ref = hidden_states(hf, pixels)
    with torch.no_grad():
        got = ours(pixels)
        assert rel_err(got, ref.last_hidden_state) < 1e-5
        assert rel_err(ours.pool(got), ref.pooler_output) < 1e-5
        penultimate = VisionTransformer.from_pretrained(tmp_path, layout="hf_clip", config=dataclasses.replace(ours.config, output_layer=-2))
        assert rel_err(penultimate(pixels), ref.hidden_states[-2]) < 1e-5
        normed = VisionTransformer.from_pretrained(
            tmp_path, layout="hf_clip", config=dataclasses.replace(ours.config, normalize_output=True)
        )
        expected = hf.post_layernorm(ref.last_hidden_state)
        assert rel_err(normed(pixels), expected) < 1e-5


def test_clip_vision_tower_of_a_whole_clip_model(tmp_path):
    cfg = transformers.CLIPConfig(
        text_config={
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
            "vocab_size": 99, "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
            "patch_size": 8, "image_size": 32,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    hf = transformers.CLIPModel(cfg).eval()
    perturb(hf, 3)
    hf.save_pretrained(tmp_path)
    ours = VisionTransformer.from_pretrained(tmp_path, config_from_hf(tmp_path), layout="hf_clip")
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = hf.vision_model(pixel_values=pixels)
        got = ours(pixels)
    assert rel_err(got, ref.last_hidden_state) < 1e-5
    assert rel_err(ours.pool(got), ref.pooler_output) < 1e-5


def bicubic_grid(pos: torch.Tensor, old: int, new: int) -> torch.Tensor:
    grid = pos[:, 1:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)


def test_eva_position_embedding_interpolated_for_448px(tmp_path):
    cfg, hf = tiny_blip2(image_size=56)  # a 4x4 grid, as 224 px with patch 14 is 16x16
    state = lavis_state(hf)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "eva.safetensors"))
    ours = VisionTransformer.from_pretrained(tmp_path / "eva.safetensors", eva_config(cfg, image_size=112))  # 8x8
    pos = state["pos_embed"]
    assert ours.pos_embed.shape == (1, 1 + 64, D)
    assert torch.equal(ours.pos_embed[:, :1], pos[:, :1])
    torch.testing.assert_close(ours.pos_embed[:, 1:], bicubic_grid(pos, 4, 8), rtol=0, atol=1e-7)
    # The whole tower at 112 px equals transformers' own bicubic position interpolation.
    pixels = torch.randn(1, 3, 112, 112)
    with torch.no_grad():
        got = ours(pixels)
    ref = hidden_states(hf, pixels, interpolate_pos_encoding=True).hidden_states[-1]
    assert got.shape == (1, 65, D)
    assert rel_err(got, ref) < 1e-5


def test_clip_position_embedding_interpolated(tmp_path):
    _, hf = tiny_clip(image_size=32)  # 4x4
    hf.save_pretrained(tmp_path)
    ours = VisionTransformer.from_pretrained(
        tmp_path, dataclasses.replace(CONFIGS["tiny-clip"], image_size=64), layout="hf_clip"
    )
    pos = hf.embeddings.position_embedding.weight.detach()[None]
    assert torch.equal(ours.pos_embed[:, :1], pos[:, :1])
    torch.testing.assert_close(ours.pos_embed[:, 1:], bicubic_grid(pos, 4, 8), rtol=0, atol=1e-7)


def test_shape_mismatch_names_key_shapes_and_fix(tmp_path):
    cfg, hf = tiny_blip2(layers=1)
    torch.save(lavis_state(hf), tmp_path / "eva.pth")
    with pytest.raises(
        CheckpointError,
        match=r"blocks\.0\.mlp\.fc1\.weight has shape \[160, 64\] but this ViT's blocks\.0\.mlp\.fc1\.weight "
        r"is \[128, 64\].*set hidden_size and intermediate_size",
    ):
        VisionTransformer.from_pretrained(tmp_path / "eva.pth", eva_config(cfg, intermediate_size=128))
    hf.save_pretrained(tmp_path / "hf")
    with pytest.raises(CheckpointError, match=r"embeddings\.patch_embedding\.weight has shape \[64, 3, 14, 14\].*\[64, 3, 8, 8\].*patch_size"):
        VisionTransformer.from_pretrained(tmp_path / "hf", eva_config(cfg, patch_size=8), layout="hf_blip2")


def test_non_square_position_grid_is_rejected():
    with pytest.raises(CheckpointError, match="not a square grid"):
        interpolate_pos_embed(torch.zeros(1, 1 + 12, 8), 4)


def test_missing_blocks_are_an_error(tmp_path):
    cfg, hf = tiny_blip2(layers=1)
    torch.save(lavis_state(hf), tmp_path / "eva.pth")
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint.*'blocks\.1\.norm1\.weight'"):
        VisionTransformer.from_pretrained(tmp_path / "eva.pth", eva_config(cfg, num_layers=2))


def test_eva_g_parameter_count_on_meta():
    with torch.device("meta"):
        model = VisionTransformer(CONFIGS["eva-g-14"])
    d, m, p, blocks, positions = 1408, 6144, 14, 39, (448 // 14) ** 2 + 1
    norm = 2 * d
    attention = 3 * d * d + 2 * d + d * d + d  # qkv (no bias), q_bias + v_bias, proj
    mlp = d * m + m + m * d + d
    expected = (3 * p * p * d + d) + d + positions * d + blocks * (2 * norm + attention + mlp)
    assert expected == 986_975_872  # EVA01-CLIP-g's ~1.0B, less its 40th block
    assert sum(t.numel() for t in model.parameters()) == expected
    assert all(t.is_meta for t in model.parameters())


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_lora_inside_the_vit_matches_merged_weights(tmp_path, kernels):
    """The engine's linear factory builds LoRA into the ViT; both kernel paths equal W + s B A."""
    if kernels == "triton":
        pytest.importorskip("triton")
    cfg, hf = tiny_blip2()
    torch.save(lavis_state(hf), tmp_path / "eva.pth")
    hf = hf.to(DEVICE)
    lora = LoRAConfig(r=4, alpha=8.0, dropout=0.0, target_modules=["qkv", "fc1"])
    factory = make_linear_factory(lora, kernel_ops(kernels, DEVICE))
    ours = VisionTransformer.from_pretrained(
        tmp_path / "eva.pth", eva_config(cfg), device=DEVICE, linear_factory=factory, allow_missing=ADAPTER_KEYS
    )
    assert init_fresh_adapters(ours, DEVICE, torch.float32) == 6
    pixels = torch.randn(2, 3, 56, 56, device=DEVICE)
    ref = hidden_states(hf, pixels).hidden_states[-1]
    with torch.no_grad():
        assert rel_err(ours(pixels), ref) < 1e-5  # a fresh adapter (B = 0) changes nothing
    adapters = {n: m for n, m in ours.named_modules() if isinstance(m, LoRALinear)}
    assert sorted(adapters) == [f"blocks.{i}.{leaf}" for i in range(3) for leaf in ("attn.qkv", "mlp.fc1")]
    with torch.no_grad():
        for m in adapters.values():
            m.lora_B.weight.normal_(std=0.1)
    with torch.no_grad():  # the comparison below is not vacuous: the adapters move the output
        assert rel_err(ours(pixels), ref) > 1e-2

    # Reference: transformers' model with W + s * B @ A in place of each adapted weight.
    theirs = {"attn.qkv": "self_attn.qkv", "mlp.fc1": "mlp.fc1"}
    leaves = {n: (m.lora_A.weight.detach().clone().requires_grad_(), m.lora_B.weight.detach().clone().requires_grad_())
              for n, m in adapters.items()}
    params = {}
    for name, (a, b) in leaves.items():
        i, leaf = name.split(".", 2)[1], name.split(".", 2)[2]
        key = f"encoder.layers.{i}.{theirs[leaf]}.weight"
        params[key] = hf.state_dict()[key] + lora.alpha / lora.r * b @ a
    pix_ref = pixels.clone().requires_grad_()
    out_ref = torch.func.functional_call(hf, params, (pix_ref,), {"output_hidden_states": True}).hidden_states[-1]
    weights = torch.randn_like(out_ref)
    (out_ref * weights).sum().backward()

    pix = pixels.clone().requires_grad_()
    out = ours(pix)
    (out * weights).sum().backward()
    assert rel_err(out.detach(), out_ref.detach()) < 1e-5
    assert rel_err(pix.grad, pix_ref.grad) < 1e-5
    for name, m in adapters.items():
        a, b = leaves[name]
        assert m.weight.grad is None  # the base stays frozen
        assert rel_err(m.lora_A.weight.grad, a.grad) < 1e-5, name
        assert rel_err(m.lora_B.weight.grad, b.grad) < 1e-5, name


def test_bad_inputs_get_clear_errors(tmp_path):
    model = VisionTransformer(CONFIGS["tiny-clip"])
    with pytest.raises(ValueError, match=r"pixel_values must be \[B, 3, 32, 32\].*image_size"):
        model(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        VisionConfig(hidden_size=50, num_heads=4)
    with pytest.raises(ValueError, match="output_layer=-5"):
        VisionConfig(num_layers=3, output_layer=-5)
    with pytest.raises(ValueError, match="vision layout 'timm'"):
        VisionTransformer.from_pretrained(tmp_path, CONFIGS["tiny"], layout="timm")
    with pytest.raises(ValueError, match="LAVIS checkpoint has no config file"):
        VisionTransformer.from_pretrained(tmp_path / "eva.pth")


def test_clip_rename_fuses_qkv():
    _, hf = tiny_clip()
    # transformers 4 files (e.g. openai/clip-vit-large-patch14) keep the `vision_model.` prefix.
    sd = {"vision_model." + k: v for k, v in hf.state_dict().items()}
    ours = from_hf_clip(sd)
    prefix = "vision_model.encoder.layers.1.self_attn."
    fused = torch.cat([sd[prefix + f"{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(ours["blocks.1.attn.qkv.weight"], fused)
    assert torch.equal(ours["blocks.1.attn.k_bias"], sd[prefix + "k_proj.bias"])
    assert ours["cls_token"].shape == (1, 1, 48) and ours["pos_embed"].shape == (1, 17, 48)
    del sd[prefix + "k_proj.weight"]
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.1\.self_attn: the checkpoint has no k_proj\.weight"):
        from_hf_clip(sd)
