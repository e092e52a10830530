"""`data.packing`: samples end to end in rows of at most `data.pack_tokens` tokens.

The packed batch (engine.data.collate.pack) carries per-sample `position_ids`, `cu_seqlens`,
`max_seqlen` and `seq_lens`; the model attends block-diagonally and causally (SDPA per segment
on the CPU). Packed and padded batches of the same samples give the same loss and gradients.
"""

from pathlib import Path

import pytest
import torch

from pefomed.engine.build import build_model
from pefomed.engine.config import ConfigError, load_config
from pefomed.engine.data.collate import collate, pack_rows

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(*extra):
    return load_config(ROOT / "configs/demo.yaml", ["model.dtype=float32", "train.device=cpu", *extra])


def make_items(cfg, lengths_after=(3, 11, 6, 2, 8), seed=0):
    from pefomed.engine.build import n_image_tokens
    from pefomed.engine.data.collate import image_key

    g = torch.Generator().manual_seed(seed)
    n_img, size = n_image_tokens(cfg), cfg.model.image_size
    items = []
    for i, after in enumerate(lengths_after):
        pixels = torch.randn(3, size, size, generator=g)
        answer = 1 + i % 3
        ids = [1, 7] + [0] * n_img + torch.randint(3, 290, (after + answer,), generator=g).tolist()
        prompt = len(ids) - answer
        items.append({
            "pixel_values": pixels, "input_ids": torch.tensor(ids),
            "labels": torch.tensor([-100] * prompt + ids[prompt:]),
            "image_token_mask": torch.tensor([False] * 2 + [True] * n_img + [False] * (after + answer)),
            "image_key": image_key(pixels), "index": 100 + i,
        })  # fmt: skip
    return items


def test_first_fit_decreasing_rows():
    rows = pack_rows([5, 9, 3, 7, 2], 10)
    assert rows == [[1], [2, 3], [0, 4]]  # 9 alone; 7 + 3; 5 + 2
    assert pack_rows([4, 4, 4], 12) == [[0, 1, 2]]
    assert pack_rows([3], 3) == [[0]]
    with pytest.raises(ValueError, match="a sample of 11 tokens does not fit data.pack_tokens=10"):
        pack_rows([5, 11], 10)


def test_packed_batch_describes_its_segments():
    cfg = tiny_config()
    items = make_items(cfg)
    lengths = [len(it["input_ids"]) for it in items]
    budget = 2 * max(lengths)
    batch = collate(items, pad_token_id=0, pack_tokens=budget)
    rows = pack_rows(lengths, budget)
    order = [i for row in rows for i in row]
    width = max(sum(lengths[i] for i in row) for row in rows)
    assert batch["input_ids"].shape == (len(rows), width) < (len(items), max(lengths))
    assert batch["index"] == [100 + i for i in order]
    assert torch.equal(batch["pixel_values"], torch.stack([items[i]["pixel_values"] for i in order]))
    assert batch["image_keys"] == [items[i]["image_key"] for i in order]
    # Segments: the samples in packed order, then each row's padding tail.
    cu = batch["cu_seqlens"]
    assert cu.dtype == torch.int32 and cu[0] == 0 and int(cu[-1]) == len(rows) * width
    assert sum(batch["seq_lens"]) == len(rows) * width and batch["max_seqlen"] == max(batch["seq_lens"])
    assert [n for n in batch["seq_lens"] if n in lengths][: len(order)] == [lengths[i] for i in order]
    flat_pos = batch["position_ids"].reshape(-1)
    for start, n in zip(cu[:-1].tolist(), batch["seq_lens"]):
        assert torch.equal(flat_pos[start : start + n], torch.arange(n))
    # The indices the model would otherwise find on the device.
    assert torch.equal(batch["image_rows"], batch["image_token_mask"].reshape(-1).nonzero().squeeze(1))
    n_targets = sum(int((it["labels"][1:] != -100).sum()) for it in items)
    assert batch["target_index"].shape[0] == n_targets
    flat_labels = batch["labels"].reshape(-1)
    assert torch.equal(batch["target_ids"], flat_labels[batch["target_index"] + 1])
    assert int(batch["attention_mask"].sum()) == sum(lengths)


@pytest.mark.parametrize("llm", ["tiny", "tiny-mistral"])  # MHA; GQA with a sliding window of 8
def test_packed_and_padded_batches_give_the_same_loss_and_gradients(llm):
    cfg = tiny_config("lora.dropout=0.0", f"model.llm={llm}")
    model = build_model(cfg, "cpu").double()
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    items = make_items(cfg)
    padded = collate(items, pad_token_id=0)
    packed = collate(items, pad_token_id=0, pack_tokens=2 * max(len(it["input_ids"]) for it in items))
    assert "cu_seqlens" in packed and "cu_seqlens" not in padded
    results = []
    for batch in (padded, packed):
        batch = {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
        model.zero_grad(set_to_none=True)
        loss, n = model(batch)
        loss.backward()
        grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), int(n), grads))
    (loss_a, n_a, grads_a), (loss_b, n_b, grads_b) = results
    assert n_a == n_b and abs(float(loss_a - loss_b)) <= 1e-12 * abs(float(loss_a))
    for key in grads_a:
        assert grads_a[key].norm() > 0, key
        assert float((grads_b[key] - grads_a[key]).norm() / grads_a[key].norm()) < 1e-10, key


def test_packing_options_are_checked_at_load_time():
    with pytest.raises(ConfigError, match=r"data.pack_tokens=100 is below data.max_length=128"):
        tiny_config("data.packing=true", "data.pack_tokens=100")
    assert tiny_config("data.packing=true", "data.pack_tokens=128").data.packing
    with pytest.raises(ConfigError, match="data.pack_tokens=0 is out of range"):
        tiny_config("data.pack_tokens=0")
