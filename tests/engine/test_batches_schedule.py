import functools
import math
from pathlib import Path

import pytest
import torch

from pefomed.engine.batches import STARVED_AFTER, MicroBatches, TooFewSamples
from pefomed.engine.config import OptimConfig, load_config
from pefomed.engine.trainer import lr_at

ROOT = Path(__file__).resolve().parents[2]


class Items:
    """A dataset of labelled indices; indices in `bad` are unreadable."""

    def __init__(self, n, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"bad": f"item{i}.png: unreadable", "index": i} if i in self.bad else {"i": i}


def collate(items):
    return {"ids": [it["i"] for it in items]}


def take(stream, k):
    it = iter(stream)
    return [next(it)["ids"] for _ in range(k)]


def test_two_ranks_see_the_single_process_steps():
    data = Items(40)
    single = take(MicroBatches(data, collate, micro_batch_size=2, seed=3), 8)
    ranks = [take(MicroBatches(data, collate, micro_batch_size=2, seed=3, rank=r, world_size=2), 4) for r in (0, 1)]
    # One optimizer step: single process does 2 micro-steps; two ranks do 1 each.
    for step in range(4):
        single_set = set(single[2 * step]) | set(single[2 * step + 1])
        assert single_set == set(ranks[0][step]) | set(ranks[1][step])


def test_resume_continues_exactly():
    data = Items(23)
    full = take(MicroBatches(data, collate, micro_batch_size=3, seed=5), 12)  # crosses epochs
    first = MicroBatches(data, collate, micro_batch_size=3, seed=5)
    head = take(first, 5)
    resumed = MicroBatches(data, collate, micro_batch_size=3, seed=5)
    resumed.skip_to(first.position)
    assert head + take(resumed, 7) == full


def test_epochs_are_permutations_and_differ():
    data = Items(12)
    batches = take(MicroBatches(data, collate, micro_batch_size=4, seed=1), 6)
    epoch0, epoch1 = sum(batches[:3], []), sum(batches[3:], [])
    assert sorted(epoch0) == sorted(epoch1) == list(range(12))
    assert epoch0 != epoch1


def test_bad_samples_are_refilled_and_counted():
    data = Items(10, bad={0, 1, 2, 3, 4, 5, 6, 7, 8})
    stream = iter(MicroBatches(data, collate, micro_batch_size=1, seed=0, shuffle=False))
    batch = next(stream)
    assert batch["ids"] == [9] and batch["n_bad"] == 9 and "item0.png" in batch["bad"][0]


def test_warmup_then_cosine():
    cfg = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10)
    assert lr_at(0, cfg, 110) == pytest.approx(1e-4)
    assert lr_at(9, cfg, 110) == pytest.approx(1e-3)
    assert lr_at(10, cfg, 110) == pytest.approx(1e-3)
    mid = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 0.5))
    assert lr_at(60, cfg, 110) == pytest.approx(mid)
    assert lr_at(110, cfg, 110) == pytest.approx(1e-5)
    assert lr_at(500, cfg, 110) == pytest.approx(1e-5)


def test_too_few_samples_is_an_error():
    with pytest.raises(TooFewSamples, match="fewer than one global micro-batch.*train.micro_batch_size"):
        MicroBatches(Items(3), collate, micro_batch_size=2, seed=0, world_size=2)


def test_only_bad_samples_gives_a_starved_batch_instead_of_raising():
    stream = iter(MicroBatches(Items(400, bad=range(400)), collate, micro_batch_size=2, seed=0, shuffle=False))
    batch = next(stream)
    assert batch["starved"] and batch["n_bad"] == 2 * STARVED_AFTER and "input_ids" not in batch
    assert batch["bad"][0] == "item0.png: unreadable"


# --- data.num_workers: the real image pipeline, read in worker processes -----------------------


@pytest.fixture(scope="module")
def image_data(tmp_path_factory):
    """The synthetic dataset as training reads it (PNG decoding, tokenization), 2 images broken."""
    from pefomed.engine.data.collate import collate as collate_vlm
    from pefomed.engine.data.sources import build_dataset, load_run_tokenizer, load_samples

    root = tmp_path_factory.mktemp("batches_data")
    cfg = load_config(ROOT / "configs/demo.yaml", [
        f"data.train=[{{kind: synthetic, path: {root}, split: train}}]", f"model.tokenizer={root}/tokenizer",
        "data.synthetic_train=40", "data.synthetic_test=4",
    ])  # fmt: skip
    samples = load_samples(cfg.data.train, cfg)
    broken = sorted({s.image_path for s in samples})[3:5]
    for path in broken:
        Path(path).write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    tokenizer = load_run_tokenizer(cfg)
    dataset = build_dataset(samples, cfg, tokenizer, train=True)
    return dataset, functools.partial(collate_vlm, pad_token_id=tokenizer.pad_token_id)


def draw(batches: MicroBatches, k: int) -> tuple[list[dict], list[int]]:
    """k batches and the position after each."""
    stream, out, positions = iter(batches), [], []
    for _ in range(k):
        out.append(next(stream))
        positions.append(batches.position)
    return out, positions


def assert_same_batches(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert a.keys() == b.keys()
        for key in a:
            if torch.is_tensor(a[key]):
                assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
            else:
                assert a[key] == b[key], key


@pytest.mark.parametrize("rank", [0, 1])
def test_workers_give_the_batches_of_num_workers_0(image_data, rank):
    dataset, collate_vlm = image_data
    make = functools.partial(MicroBatches, dataset, collate_vlm, micro_batch_size=3, seed=4, rank=rank, world_size=2)
    # 12 batches of 3 cross into the second epoch of this rank's 20 samples.
    want, want_positions = draw(make(), 12)
    assert sum(b["n_bad"] for b in want) > 0  # the refill path is exercised
    rng = torch.get_rng_state()
    got, got_positions = draw(make(num_workers=2), 12)
    assert torch.equal(torch.get_rng_state(), rng)  # starting workers drew nothing from dropout's RNG
    assert_same_batches(got, want)
    assert got_positions == want_positions


def test_workers_resume_from_a_mid_run_position(image_data):
    dataset, collate_vlm = image_data
    make = functools.partial(MicroBatches, dataset, collate_vlm, micro_batch_size=3, seed=4, rank=1, world_size=2)
    want, _ = draw(make(), 12)
    first = make(num_workers=2)
    head, _ = draw(first, 5)  # the workers have read ahead; the position counts what was consumed
    resumed = make(num_workers=2)
    resumed.skip_to(first.position)
    tail, _ = draw(resumed, 7)
    assert_same_batches(head + tail, want)


# --- epochs: a dataset with set_epoch draws each item as its epoch does -------------------------


class EpochTagged(torch.utils.data.Dataset):
    """Items carry the epoch the dataset was set to when they were read (as an augmentation seed)."""

    def __init__(self, n: int) -> None:
        self.n, self.epoch = n, 0

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict:
        return {"index": index, "epoch": self.epoch}


@pytest.mark.parametrize("num_workers", [0, 1])
@pytest.mark.parametrize("rank", [0, 1])
def test_each_item_is_read_in_its_own_epoch(num_workers, rank):
    n, micro, world = 6, 2, 2
    batches = MicroBatches(EpochTagged(n), lambda items: {"items": items}, micro_batch_size=micro, seed=3,
                           rank=rank, world_size=world, num_workers=num_workers)
    got = [item for _, batch in zip(range(5), batches) for item in batch["items"]]
    # The stream's position p of this rank is global sample p * world + rank; epoch = that // n.
    want = [(batches.index_at(p), (p * world + rank) // n) for p in range(len(got))]
    assert [(item["index"], item["epoch"]) for item in got] == want
    assert {epoch for _, epoch in want} == {0, 1, 2, 3}  # several epochs were crossed
    resumed = MicroBatches(EpochTagged(n), lambda items: {"items": items}, micro_batch_size=micro, seed=3,
                           rank=rank, world_size=world, num_workers=num_workers)
    resumed.skip_to(4)
    again = [item for _, batch in zip(range(3), resumed) for item in batch["items"]]
    assert again == got[4:10]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="page-locked memory needs a CUDA driver")
def test_pinned_batches_are_page_locked_and_equal():
    plain = MicroBatches(EpochTagged(6), lambda items: {"x": torch.tensor([i["index"] for i in items])},
                         micro_batch_size=2, seed=3)
    pinned = MicroBatches(EpochTagged(6), lambda items: {"x": torch.tensor([i["index"] for i in items])},
                          micro_batch_size=2, seed=3, pin_memory=True)
    for _, a, b in zip(range(4), plain, pinned):
        assert b["x"].is_pinned() and torch.equal(a["x"], b["x"])
