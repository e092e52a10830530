"""metrics.jsonl's throughput, memory and MFU, each against an independent count.

Tokens are recounted from a replay of the data order; model FLOPs against
`torch.utils.flop_counter.FlopCounterMode` on a real forward and backward; the peak memory against
the kernel's own VmHWM; MFU from those, with a known peak; and the tqdm bar shows tokens/s.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pefomed.engine import trainer as trainer_module
from pefomed.engine.batches import MicroBatches
from pefomed.engine.build import build_model, n_image_tokens
from pefomed.engine.config import load_config
from pefomed.engine.data.collate import collate
from pefomed.engine.data.sources import build_dataset, fit_vocab_to_tokenizer, load_run_tokenizer, load_samples
from pefomed.engine.session import train_from_config
from pefomed.engine.trainer import ModelFlops, StepCounts, peak_flops, peak_memory_bytes

ROOT = Path(__file__).resolve().parents[2]
PEAK = 1e12  # a made-up device peak, so that MFU is logged on the CPU


def config(tmp_path: Path, extra=()):
    data = tmp_path / "data"
    return load_config(ROOT / "configs/demo.yaml", [
        f"train.output_dir={tmp_path / 'run'}", f"data.train=[{{kind: synthetic, path: {data}, split: train}}]",
        f"model.tokenizer={data}/tokenizer", "data.synthetic_train=24", "data.synthetic_test=4",
        "train.micro_batch_size=3", "train.grad_accum=2", "train.max_steps=3", "model.dtype=float32",
        "train.device=cpu", *extra,
    ])  # fmt: skip


def hwm_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise KeyError("VmHWM")


def test_step_metrics_against_a_replay_of_the_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(trainer_module, "peak_flops", lambda device, dtype: PEAK)
    cfg = config(tmp_path, ["train.progress_bar=true"])
    train_from_config(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert "tok_s=" in capsys.readouterr().err  # the progress bar shows the throughput

    samples = load_samples(cfg.data.train, cfg)
    tokenizer = load_run_tokenizer(cfg)
    fit_vocab_to_tokenizer(cfg, tokenizer)
    replay = iter(MicroBatches(build_dataset(samples, cfg, tokenizer, train=True),
                               lambda items: collate(items, pad_token_id=tokenizer.pad_token_id),
                               micro_batch_size=3, seed=cfg.train.seed))  # fmt: skip
    flops = ModelFlops.of(build_model(cfg, "meta"))
    for record in records:
        micro = [next(replay) for _ in range(2)]
        lengths = torch.cat([b["attention_mask"].sum(1) for b in micro])
        counts = StepCounts(
            target_tokens=sum(int((b["labels"][:, 1:] != -100).sum()) for b in micro), bad=0, samples=6,
            starved_ranks=0, input_tokens=int(lengths.sum()), squared_lengths=int((lengths**2).sum()), images=6,
            image_tokens=sum(int(b["image_token_mask"].sum()) for b in micro),
        )  # fmt: skip
        assert counts.image_tokens == 6 * n_image_tokens(cfg)
        assert (record["input_tokens"], record["target_tokens"]) == (counts.input_tokens, counts.target_tokens)
        assert record["tokens_per_s"] == pytest.approx(counts.input_tokens / record["step_time_s"], rel=1e-12)
        assert record["mfu"] == pytest.approx(flops.step(counts) / record["step_time_s"] / PEAK, rel=1e-12)
    peaks = [r["peak_memory_gib"] * 2**30 for r in records]
    assert peaks == sorted(peaks) and 0 < peaks[-1] <= hwm_bytes()


def test_peak_memory_on_the_cpu_is_the_kernels_high_water_mark():
    grown = torch.ones(256 * 2**20 // 4) + 1  # 256 MiB touched: the peak is at least this high now
    got, want = peak_memory_bytes(torch.device("cpu")), hwm_bytes()
    assert abs(got - want) <= 64 * 1024 and got > grown.numel() * 4  # the same counter, a moment apart


def test_model_flops_equal_the_flop_counter_on_a_real_step():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    cfg = load_config(ROOT / "configs/demo.yaml", ["model.dtype=float32", "lora.dropout=0.0", "train.device=cpu"])
    model = build_model(cfg, "cpu")
    n_img = n_image_tokens(cfg)
    t = n_img + 12  # one unpadded sample: its tokens are all real
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 500, (1, t), generator=g)
    mask = torch.zeros(1, t, dtype=torch.bool)
    mask[:, 1 : 1 + n_img] = True
    labels = ids.clone()
    labels[:, : 1 + n_img + 4] = -100
    size = cfg.model.image_size
    batch = dict(pixel_values=torch.randn(1, 3, size, size, generator=g), input_ids=ids, labels=labels,
                 attention_mask=torch.ones(1, t, dtype=torch.long), image_token_mask=mask)  # fmt: skip
    # The math backend decomposes attention into the matmuls the counter sees. The counter knows
    # no in-place addmm_, which the lean LoRA adds its rank-r term with: count it as addmm.
    def addmm_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]

    in_place = {torch.ops.aten.addmm_: addmm_flops}
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False, custom_mapping=in_place) as counter:
        loss, n = model(batch)
        loss.backward()
    counts = StepCounts(target_tokens=int(n), bad=0, samples=1, starved_ranks=0, input_tokens=t,
                        squared_lengths=t * t, images=1, image_tokens=n_img)  # fmt: skip
    assert ModelFlops.of(model).step(counts) == counter.get_total_flops()
    # Counting the frozen weights as trained (6N) would be far off: the count is not vacuous.
    wrong = ModelFlops.of(model)
    wrong = type(wrong)(**{**wrong.__dict__, "llm_adapters": wrong.llm_adapters + wrong.llm_frozen, "llm_frozen": 0})
    assert wrong.step(counts) > 1.1 * counter.get_total_flops()


@pytest.mark.parametrize("name,dtype,want", [
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312e12),
    ("NVIDIA A100 80GB PCIe", torch.float32, 156e12),
    ("NVIDIA A40", torch.float16, 149.7e12),
    ("NVIDIA A10", torch.bfloat16, 125e12),
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H200", torch.bfloat16, 989e12),
    ("NVIDIA GeForce GTX 1080", torch.bfloat16, None),
])  # fmt: skip
def test_peak_flops_of_the_users_gpus(monkeypatch, name, dtype, want):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_flops(torch.device("cuda", 0), dtype) == want
    assert peak_flops(torch.device("cpu"), dtype) is None
