"""models.siglip against transformers' Idefics2VisionTransformer (SigLIP with NaViT positions)."""

import pytest
import torch
import transformers
from transformers.models.idefics2.modeling_idefics2 import Idefics2VisionTransformer

from pefomed.models.siglip import (
    SiglipVisionConfig,
    SiglipVisionTransformer,
    bucketed_position_ids,
    patch_attention_mask,
)

HF_CONFIG = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                 image_size=64, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def towers():
    cfg = transformers.Idefics2VisionConfig(**HF_CONFIG)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    hf = Idefics2VisionTransformer(cfg).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    ours = SiglipVisionTransformer(SiglipVisionConfig.from_hf(cfg)).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)  # transformers' names, no rename
    return hf, ours


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Three images of different sizes, zero-padded to 64 x 56 at the bottom and right."""
    sizes = [(64, 56), (24, 40), (48, 17)]  # 17 px: the last partial patch is not a patch
    g = torch.Generator().manual_seed(2)
    pixels = torch.zeros(3, 3, 64, 56)
    mask = torch.zeros(3, 64, 56, dtype=torch.bool)
    for i, (h, w) in enumerate(sizes):
        pixels[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
        mask[i, :h, :w] = True
    return pixels, mask


def test_variable_size_batch_matches_transformers(towers):
    hf, ours = towers
    pixels, mask = padded_batch()
    patches = patch_attention_mask(mask, 8)
    assert patches.shape == (3, 8, 7)
    assert patches.sum(dim=(1, 2)).tolist() == [8 * 7, 3 * 5, 6 * 2]
    with torch.no_grad():
        want = hf(pixels, patch_attention_mask=patches).last_hidden_state
        got = ours(pixels, patches)
    assert rel_err(got, want) < 1e-5
    real = patches.reshape(3, -1)
    assert rel_err(got[real], want[real]) < 1e-5
    # The mask matters: without it the padded patches leak into the real ones.
    with torch.no_grad():
        unmasked = ours(pixels)
    assert rel_err(unmasked[1][real[1]], want[1][real[1]]) > 1e-2


def test_unpadded_images_need_no_mask(towers):
    hf, ours = towers
    pixels = torch.randn(2, 3, 40, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert rel_err(ours(pixels), hf(pixels).last_hidden_state) < 1e-5


def test_a_full_size_image_uses_the_position_table_in_order():
    """At the tower's full 70 x 70 grid (980 px) patch (i, j) takes position 70 i + j, and a
    smaller image spreads its patches over the whole table."""
    full = torch.ones(1, 70, 70, dtype=torch.bool)
    assert torch.equal(bucketed_position_ids(full, 70)[0], torch.arange(4900))
    half = torch.zeros(1, 70, 70, dtype=torch.bool)
    half[0, :35, :27] = True
    ids = bucketed_position_ids(half, 70)[0].view(70, 70)
    rows = torch.div(torch.arange(35) * 70, 35, rounding_mode="floor")
    cols = torch.div(torch.arange(27) * 70, 27, rounding_mode="floor")  # 27 does not divide 70: no ties
    assert torch.equal(ids[:35, :27], rows[:, None] * 70 + cols[None, :])
    assert int(ids[35:].abs().sum()) == 0 and int(ids[:, 27:].abs().sum()) == 0


def test_names_are_transformers(towers):
    hf, ours = towers
    assert sorted(ours.state_dict()) == sorted(hf.state_dict())


def test_an_image_larger_than_the_table_is_refused(towers):
    _, ours = towers
    with pytest.raises(ValueError, match="exceeds the vision tower's 64 px"):
        ours(torch.zeros(1, 3, 72, 64))
