"""`VisionLanguageModel.forward`, the hot path, against the plain computation it replaces.

The plain path (what the model did before): the ViT under no_grad, the connector's
`project_into`, the LLM's full `[B, T, vocab]` logits with the attention mask, autograd's
cross-entropy over the labelled rows, HF-math RMSNorm / SwiGLU / RoPE. The hot path must give
the same loss and the same gradient for every trainable parameter, in float64, with LoRA
dropout live; read nothing back from the device when the collate's indices are in the batch;
and give the same results with the frozen ViT's feature cache on.
"""

import copy
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pefomed.engine.build import build_model, n_image_tokens
from pefomed.engine.config import load_config
from pefomed.engine.data.collate import collate, image_key
from pefomed.models import llama
from pefomed.models.vlm import FeatureCache, target_token_loss

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(*extra):
    return load_config(ROOT / "configs/demo.yaml", ["lora.dropout=0.3", "model.dtype=float32", "train.device=cpu", *extra])


def make_items(cfg, n=4, seed=0, shared_image=True):
    """Training items as VLMDataset makes them, of different lengths; items 0 and 2 share an image."""
    g = torch.Generator().manual_seed(seed)
    n_img, size = n_image_tokens(cfg), cfg.model.image_size
    images = [torch.randn(3, size, size, generator=g) for _ in range(n)]
    if shared_image:
        images[2] = images[0].clone()
    items = []
    for i in range(n):
        before, after, answer = 2, 3 + i, 2 + (i * 3) % 5
        ids = [1] + torch.randint(3, 500, (before,), generator=g).tolist() + [0] * n_img
        ids += torch.randint(3, 500, (after + answer,), generator=g).tolist()
        prompt = len(ids) - answer
        items.append({
            "pixel_values": images[i],
            "input_ids": torch.tensor(ids),
            "labels": torch.tensor([-100] * prompt + ids[prompt:]),
            "image_token_mask": torch.tensor([False] * (1 + before) + [True] * n_img + [False] * (after + answer)),
            "image_key": image_key(images[i]),
            "index": i,
        })  # fmt: skip
    return items


def use_reference_ops(model):
    """The same model with HF-math ops (plain autograd) in place of the lean ones."""
    for module in model.modules():
        if isinstance(module, llama.RMSNorm):
            module.fn = llama.rms_norm_reference
        elif isinstance(module, llama.MLP):
            module.swiglu = llama.swiglu_reference
        elif isinstance(module, llama.Attention):
            module.rope = llama.rope_reference
    return model


def plain_forward(model, batch):
    with torch.no_grad():
        feats = model.ln_vision(model.vit(batch["pixel_values"]))
    embeds = model.llm.get_input_embeddings()(batch["input_ids"])
    embeds = model.connector.project_into(feats.to(embeds.dtype), embeds, batch["image_token_mask"])
    logits = model.llm(inputs_embeds=embeds, attention_mask=batch["attention_mask"])
    return target_token_loss(logits, batch["labels"])


def loss_and_grads(model, forward, batch, seed=5):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, n = forward(model, batch)
    loss.backward()
    grads = {k: p.grad.detach().clone() for k, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), int(n), grads


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-300))


def double_batch(batch):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def with_live_adapters(model):
    """Adapters past their first step (B = 0 at init would give A no gradient)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


def test_hot_path_equals_plain_path_in_float64():
    cfg = tiny_config()
    model = with_live_adapters(build_model(cfg, "cpu").double())
    batch = double_batch(collate(make_items(cfg), pad_token_id=0))
    plain = use_reference_ops(copy.deepcopy(model))
    ref_loss, ref_n, ref_grads = loss_and_grads(plain, plain_forward, batch)
    loss, n, grads = loss_and_grads(model, lambda m, b: m(b), batch)
    assert n == ref_n == int((batch["labels"][:, 1:] != -100).sum())
    assert rel(loss, ref_loss) < 1e-12
    assert grads.keys() == ref_grads.keys() and any(k.startswith("connector.") for k in grads)
    for key in ref_grads:
        assert ref_grads[key].norm() > 0, key
        assert rel(grads[key], ref_grads[key]) < 1e-10, key
    _, _, other = loss_and_grads(model, lambda m, b: m(b), batch, seed=99)
    assert max(rel(other[k], grads[k]) for k in grads) > 1e-3  # dropout is live: the seed matters


class HostSyncs(TorchDispatchMode):
    """Records the ops that make the host wait for the device (a value read, a data-dependent shape)."""

    SYNCS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "item", "equal", "unique_consecutive",
             "_unique2", "unique_dim", "repeat_interleave"}  # fmt: skip

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.SYNCS:
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_forward_and_backward_read_nothing_back_from_the_device():
    cfg = tiny_config("model.feature_cache=true")
    model = build_model(cfg, "cpu")
    batch = collate(make_items(cfg), pad_token_id=0)
    for step in range(2):  # the second step takes two of its images from the feature cache
        recorder = HostSyncs()
        with recorder:
            loss, n = model(batch)
            loss.backward()
        assert recorder.seen == [], (step, recorder.seen)
    # Without the collate's indices they are found on the device: the connector checks each row's
    # placeholders and finds them, and the loss finds its target rows.
    bare = {k: v for k, v in batch.items() if k not in ("image_rows", "target_index", "target_ids")}
    recorder = HostSyncs()
    with recorder:
        model(bare)[0].backward()
    assert recorder.seen.count("nonzero") == 2 and recorder.seen != []


def test_feature_cache_gives_the_same_loss_and_gradients_and_skips_the_vit():
    cached = build_model(tiny_config("model.feature_cache=true", "model.feature_cache_mb=1"), "cpu")
    plain = build_model(tiny_config(), "cpu")
    assert cached.feature_cache is not None and plain.feature_cache is None
    items = make_items(tiny_config())
    first, second = collate(items[:2], pad_token_id=0), collate(items[2:], pad_token_id=0)
    calls = []
    cached.vit.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    for batch in (first, second, first):
        want = loss_and_grads(plain, lambda m, b: m(b), batch)
        got = loss_and_grads(cached, lambda m, b: m(b), batch)
        assert got[0] == want[0] and got[1] == want[1]
        for key in want[2]:
            assert torch.equal(got[2][key], want[2][key]), key
    # The first batch ran 2 images; the second 1 (its first image is the first batch's first);
    # the third none.
    assert calls == [2, 1]
    assert len(cached.feature_cache) == 3 and cached.feature_cache.hits == 3
    feats = cached.encode_images(first["pixel_values"], first["image_keys"])
    assert not feats.is_inference() and not feats.requires_grad  # a normal tensor the connector may save


def test_feature_cache_is_lru_bounded_in_bytes():
    cache = FeatureCache(max_bytes=3 * 400)
    for key in "abc":
        cache.put(key, torch.zeros(100))  # 400 bytes each
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("d", torch.zeros(100))
    assert "b" not in cache and {"a", "c", "d"} <= {k for k in "abcd" if k in cache}
    assert cache.bytes == 1200
    cache.put("huge", torch.zeros(1000))  # larger than the whole budget: not kept, nothing evicted
    assert "huge" not in cache and len(cache) == 3
    with pytest.raises(ValueError, match="positive budget"):
        FeatureCache(0)


def test_image_key_follows_content_and_preprocessing():
    g = torch.Generator().manual_seed(0)
    image = torch.rand(3, 8, 8, generator=g)
    assert image_key(image) == image_key(image.clone())
    assert image_key(image) != image_key(image.flip(-1))  # a flip is another image
    assert image_key(image) != image_key(image.double())  # another preprocessing dtype
    assert image_key(image) != image_key(image.reshape(3, 4, 16))
