"""BiomedCLIP's vision tower (timm's ViT-B/16 inside open_clip) in models.vit.

The open_clip checkpoint is written here by hand in its real layout (`visual.trunk.*` with timm's
names and fused `qkv.bias`, `visual.head.proj.weight`, the text tower, `logit_scale`), and
transformers' ViTModel gets the same tensors through a mapping written out here, independently
of the loader's rename table. timm itself is the other reference where it imports.
"""

import dataclasses

import pytest
import torch
import transformers
from safetensors.torch import save_file

from pefomed.models.loading import CheckpointError
from pefomed.models.vit import CONFIGS, VisionConfig, VisionTransformer, from_hf_vit, from_open_clip, to_hf_vit

# The tiny tower under test: BiomedCLIP's structure at width 48.
TINY = CONFIGS["tiny-biomedclip"]
FULL = dataclasses.replace(TINY, output_layer=-1, final_norm=True, normalize_output=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


def open_clip_state(c: VisionConfig, seed: int = 0, embed_dim: int = 16) -> dict[str, torch.Tensor]:
    """A random BiomedCLIP-layout state dict (open_clip CustomTextCLIP with a timm image tower)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.05, base=0.0):
        return base + scale * torch.randn(*shape, generator=g)

    d, n = c.hidden_size, c.num_patches
    t = "visual.trunk."
    sd = {
        t + "cls_token": r(1, 1, d, scale=0.02),
        t + "pos_embed": r(1, n + 1, d, scale=0.02),
        t + "patch_embed.proj.weight": r(d, 3, c.patch_size, c.patch_size),
        t + "patch_embed.proj.bias": r(d),
        t + "norm.weight": r(d, base=1.0),
        t + "norm.bias": r(d),
        "visual.head.proj.weight": r(embed_dim, d),  # CLIP's projection into the joint space
        "text.transformer.embeddings.word_embeddings.weight": r(30, 8),
        "text.proj.0.weight": r(embed_dim, 8),
        "logit_scale": torch.tensor(4.6052),
    }
    for i in range(c.num_layers):
        b = f"{t}blocks.{i}."
        sd.update({
            b + "norm1.weight": r(d, base=1.0), b + "norm1.bias": r(d),
            b + "attn.qkv.weight": r(3 * d, d), b + "attn.qkv.bias": r(3 * d),
            b + "attn.proj.weight": r(d, d), b + "attn.proj.bias": r(d),
            b + "norm2.weight": r(d, base=1.0), b + "norm2.bias": r(d),
            b + "mlp.fc1.weight": r(c.intermediate_size, d), b + "mlp.fc1.bias": r(c.intermediate_size),
            b + "mlp.fc2.weight": r(d, c.intermediate_size), b + "mlp.fc2.bias": r(d),
        })
    return sd


def hf_vit_from_open_clip(sd: dict[str, torch.Tensor], c: VisionConfig) -> transformers.ViTModel:
    """transformers' ViTModel holding the same tensors, by a mapping written out by hand."""
    hf_cfg = transformers.ViTConfig(
        hidden_size=c.hidden_size, num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
        intermediate_size=c.intermediate_size, image_size=c.image_size, patch_size=c.patch_size,
        layer_norm_eps=1e-6, hidden_act="gelu", qkv_bias=True,
    )
    model = transformers.ViTModel(hf_cfg, add_pooling_layer=False).eval()
    t, d = "visual.trunk.", c.hidden_size
    hf = {
        "embeddings.cls_token": sd[t + "cls_token"],
        "embeddings.position_embeddings": sd[t + "pos_embed"],
        "embeddings.patch_embeddings.projection.weight": sd[t + "patch_embed.proj.weight"],
        "embeddings.patch_embeddings.projection.bias": sd[t + "patch_embed.proj.bias"],
        "layernorm.weight": sd[t + "norm.weight"],
        "layernorm.bias": sd[t + "norm.bias"],
    }
    for i in range(c.num_layers):
        b, h = f"{t}blocks.{i}.", f"layers.{i}."
        w, bias = sd[b + "attn.qkv.weight"], sd[b + "attn.qkv.bias"]
        for j, part in enumerate("qkv"):
            hf[h + f"attention.{part}_proj.weight"] = w[j * d:(j + 1) * d]
            hf[h + f"attention.{part}_proj.bias"] = bias[j * d:(j + 1) * d]
        for theirs, ours in (("attention.o_proj", "attn.proj"), ("layernorm_before", "norm1"),
                             ("layernorm_after", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            hf[h + theirs + ".weight"] = sd[b + ours + ".weight"]
            hf[h + theirs + ".bias"] = sd[b + ours + ".bias"]
    model.load_state_dict(hf, strict=True)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """open_clip_pytorch_model.bin in a BiomedCLIP-like folder, as torch.save writes it."""
    folder = tmp_path_factory.mktemp("biomedclip")
    sd = open_clip_state(FULL)
    torch.save(sd, folder / "open_clip_pytorch_model.bin")
    (folder / "open_clip_config.json").write_text('{"model_cfg": {"vision_cfg": {"timm_model_name": "vit_base_patch16_224"}}}')
    return folder, sd


def pixels(c: VisionConfig, batch: int = 2, seed: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, c.image_size, c.image_size, generator=torch.Generator().manual_seed(seed))


def test_penultimate_patch_features_match_transformers_vit(checkpoint):
    folder, sd = checkpoint
    ours = VisionTransformer.from_pretrained(folder, TINY, layout="open_clip").eval()
    hf = hf_vit_from_open_clip(sd, FULL)
    x = pixels(TINY)
    with torch.no_grad():
        got = ours(x)
        want = hf(x, output_hidden_states=True).hidden_states[-2]
    assert got.shape == (2, 1 + TINY.num_patches, TINY.hidden_size)
    assert rel_err(got, want) < 1e-5
    # LLaVA-1.5's features are the second-to-last block's: the last block's differ.
    assert rel_err(got, hf(x, output_hidden_states=True).hidden_states[-1]) > 0.05


def test_last_layer_with_final_norm_matches_transformers_vit(checkpoint):
    folder, sd = checkpoint
    ours = VisionTransformer.from_pretrained(folder, FULL, layout="open_clip").eval()
    hf = hf_vit_from_open_clip(sd, FULL)
    x = pixels(FULL, seed=4)
    with torch.no_grad():
        assert rel_err(ours(x), hf(x).last_hidden_state) < 1e-5


def test_open_clip_checkpoint_loads_as_safetensors_and_drops_other_towers(tmp_path, checkpoint):
    folder, sd = checkpoint
    save_file(sd, str(tmp_path / "open_clip_model.safetensors"))
    a = VisionTransformer.from_pretrained(folder, TINY, layout="open_clip")
    b = VisionTransformer.from_pretrained(tmp_path / "open_clip_model.safetensors", TINY, layout="open_clip")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name
    # The timm ViT's q / k / v biases are the thirds of its fused qkv.bias, in that order.
    d = TINY.hidden_size
    fused = sd["visual.trunk.blocks.1.attn.qkv.bias"]
    assert torch.equal(a.blocks[1].attn.q_bias, fused[:d])
    assert torch.equal(a.blocks[1].attn.k_bias, fused[d:2 * d])
    assert torch.equal(a.blocks[1].attn.v_bias, fused[2 * d:])
    # The penultimate-layer tower keeps 2 of 3 blocks and no final norm.
    assert len(a.blocks) == 2 and a.norm is None
    names = set(from_open_clip(sd))
    assert not any(n.startswith(("head", "text", "logit")) for n in names)


def test_a_bare_timm_state_dict_loads_too(tmp_path, checkpoint):
    _, sd = checkpoint
    bare = {k.removeprefix("visual.trunk."): v for k, v in sd.items() if k.startswith("visual.trunk.")}
    bare["head.weight"], bare["head.bias"] = torch.zeros(1000, FULL.hidden_size), torch.zeros(1000)  # a classifier
    save_file(bare, str(tmp_path / "vit.safetensors"))
    model = VisionTransformer.from_pretrained(tmp_path / "vit.safetensors", FULL, layout="open_clip")
    want = VisionTransformer.from_pretrained(checkpoint[0], FULL, layout="open_clip")
    x = pixels(FULL)
    with torch.no_grad():
        assert torch.equal(model(x), want(x))


def test_timm_matches_where_it_imports(checkpoint):
    timm = pytest.importorskip(
        "timm", reason="timm is not installed here and must not be (it pulls a CUDA build of torch); "
        "this parity test runs where timm imports"
    )
    folder, sd = checkpoint
    c = FULL
    reference = timm.models.vision_transformer.VisionTransformer(
        img_size=c.image_size, patch_size=c.patch_size, embed_dim=c.hidden_size, depth=c.num_layers,
        num_heads=c.num_heads, mlp_ratio=c.intermediate_size / c.hidden_size, qkv_bias=True, num_classes=0,
        global_pool="token",
    ).eval()
    reference.load_state_dict({k.removeprefix("visual.trunk."): v for k, v in sd.items() if k.startswith("visual.trunk.")})
    x = pixels(c)
    with torch.no_grad():
        full = VisionTransformer.from_pretrained(folder, FULL, layout="open_clip").eval()
        assert rel_err(full(x), reference.forward_features(x)) < 1e-5
        h = reference.norm_pre(reference._pos_embed(reference.patch_embed(x)))
        for block in reference.blocks[:-1]:
            h = block(h)
        penultimate = VisionTransformer.from_pretrained(folder, TINY, layout="open_clip").eval()
        assert rel_err(penultimate(x), h) < 1e-5


def test_biomedclip_tower_has_vit_b16_shapes_on_meta():
    """The full tower is timm's vit_base_patch16_224 without its classifier: 85,798,656
    parameters (86,567,656 with the 1000-class head); LLaVA's selection drops the last block
    and the final norm."""
    c = CONFIGS["biomedclip-b-16"]
    full = dataclasses.replace(c, output_layer=-1, final_norm=True)
    with torch.device("meta"):
        assert sum(p.numel() for p in VisionTransformer(full).parameters()) == 85_798_656
        tower = VisionTransformer(c)
    block = 4 * 768 + (768 * 2304 + 2304) + (768 * 768 + 768) + 2 * (768 * 3072) + 3072 + 768
    assert sum(p.numel() for p in tower.parameters()) == 85_798_656 - block - 2 * 768
    assert (c.num_patches, c.depth, c.layer_norm_eps, c.activation) == (196, 11, 1e-6, "gelu")


def test_hf_vit_layout_reads_both_naming_schemes(tmp_path, checkpoint):
    folder, sd = checkpoint
    ours = VisionTransformer.from_pretrained(folder, FULL, layout="open_clip")
    v5 = to_hf_vit(ours.state_dict())
    hf = transformers.ViTModel(hf_vit_from_open_clip(sd, FULL).config, add_pooling_layer=False)
    hf.load_state_dict(v5, strict=True)  # to_hf_vit writes exactly transformers' names
    # The hub's files carry transformers 4's names (encoder.layer.N.attention.attention.query, ...).
    v4 = {}
    for k, v in v5.items():
        k = k.replace("layers.", "encoder.layer.").replace("attention.q_proj", "attention.attention.query")
        k = k.replace("attention.k_proj", "attention.attention.key").replace("attention.v_proj", "attention.attention.value")
        k = k.replace("attention.o_proj", "attention.output.dense").replace("mlp.fc1", "intermediate.dense")
        k = k.replace("mlp.fc2", "output.dense")
        v4["vit." + k] = v
    v4["vit.pooler.dense.weight"] = torch.zeros(FULL.hidden_size, FULL.hidden_size)
    for state in (v5, v4):
        back = from_hf_vit(state)
        assert back.keys() == ours.state_dict().keys()
        for name, tensor in ours.state_dict().items():
            assert torch.equal(back[name], tensor), name
    save_file(v4, str(tmp_path / "model.safetensors"))
    loaded = VisionTransformer.from_pretrained(tmp_path, FULL, layout="hf_vit")
    x = pixels(FULL)
    with torch.no_grad():
        assert torch.equal(loaded(x), ours(x))


def test_open_clip_vision_transformer_layout_is_refused(tmp_path):
    save_file({"visual.conv1.weight": torch.zeros(8, 3, 4, 4)}, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match=r"visual\.conv1\.weight: an open_clip vision tower outside `visual\.trunk\.`"):
        VisionTransformer.from_pretrained(tmp_path / "m.safetensors", TINY, layout="open_clip")


def test_open_clip_layout_needs_a_named_config(checkpoint):
    with pytest.raises(ValueError, match="biomedclip-b-16"):
        VisionTransformer.from_pretrained(checkpoint[0], None, layout="open_clip")


def test_a_wrong_width_names_the_fields(checkpoint):
    wrong = dataclasses.replace(TINY, hidden_size=64)
    with pytest.raises(CheckpointError, match=r"cls_token has shape \[1, 1, 48\] but this ViT.s cls_token is \[1, 1, 64\].*set hidden_size"):
        VisionTransformer.from_pretrained(checkpoint[0], wrong, layout="open_clip")
