"""One training step, ours and HF+PEFT, as pytest-benchmark cases (see bench/conftest.py).

The pair is built by `bench.step` exactly as `python -m pefomed.bench.step` builds it (same
weights, adapters, batch and AdamW on both sides), and its fp32 parity is checked once before
any case is timed, so a saved baseline never records a step that computes something else.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from pefomed.bench import step as stepbench
from pefomed.models.llama import LlamaConfig

SIDES = ("ours", "hf+peft")
FULL_CASES = {"cpu": ["pefomed-vqa"], "cuda": list(stepbench.CASES)}
SMOKE_CASES = ["pefomed-vqa", "med-idefics-qlora"]
_PAIRS: dict = {}


def _cases(config) -> list[str]:
    if config.getoption("--bench-size") == "smoke":
        return SMOKE_CASES
    return FULL_CASES["cuda" if torch.cuda.is_available() else "cpu"]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        metafunc.parametrize("case", _cases(metafunc.config))


@pytest.fixture
def pair(case, bench_size, bench_layers, device, scratch):
    """(ours, hf, batch, image embeddings) for `case`, built once per session."""
    key = (case, bench_size)
    if key not in _PAIRS:
        _PAIRS.clear()  # one pair at a time: two 7-8B pairs would not share a GPU
        spec = stepbench.CASES[case]
        if bench_size == "smoke":
            folder = stepbench.random_model_folder("tiny", 2, torch.float32, scratch)
            spec = dataclasses.replace(spec, image_tokens=8, before_image=2, after_image=3, answer=(2, 6),
                                       r=min(spec.r, 8))  # fmt: skip
            dtype, batch_size = torch.float32, 2
        elif device.type == "cuda":
            folder = stepbench.random_model_folder(spec.llm, bench_layers, torch.bfloat16, scratch, "cuda")
            dtype, batch_size = torch.bfloat16, 4
        else:
            folder = stepbench.smollm2_folder()
            dtype, batch_size = torch.float32, 4
        if dtype != torch.float32:
            parity_folder = stepbench.random_model_folder(spec.llm, 1, torch.float32, scratch, "cuda")
            opts = stepbench.RunOptions(spec, torch.float32, device, 2, False, 0, 1, 1, 0)
            parity = stepbench.parity_only(parity_folder, opts)
        ours, hf = stepbench.build_pair(folder, spec, dtype, device, False, 0)
        config = LlamaConfig.from_hf(folder)
        batch = {k: v.to(device) for k, v in stepbench.make_batch(spec, batch_size, config.vocab_size, 0).items()}
        feats = stepbench.image_embeddings(batch, config.hidden_size, float(ours.embed.weight.float().std()), 0, device,
                                           dtype)  # fmt: skip
        if dtype == torch.float32:
            parity = stepbench.check_parity(ours, hf, batch, feats, 0)
        assert parity["passed"], f"ours and HF+PEFT disagree, nothing to time: {parity}"
        info = {"model": folder.name, "dtype": str(dtype).removeprefix("torch."), **stepbench.batch_stats(batch),
                "lora": f"r={spec.r} alpha={spec.alpha} p={spec.dropout} {','.join(spec.targets)}",
                "qlora": spec.qlora, "parity_loss_rel_err": parity["loss_rel_err"]}  # fmt: skip
        _PAIRS[key] = ({"ours": ours, "hf+peft": hf}, batch, feats, info)
    return _PAIRS[key]


@pytest.mark.parametrize("side", SIDES)
def test_train_step(benchmark, pair, side, bench_size, synchronized):
    sides, batch, feats, info = pair
    benchmark.group = f"step {info['model']} {info['batch_size']}x{info['seq_len']}"
    benchmark.extra_info.update(info, side=side)
    step = synchronized(sides[side].step)
    smoke = bench_size == "smoke"
    benchmark.pedantic(step, args=(batch, feats), rounds=1 if smoke else 5, warmup_rounds=0 if smoke else 1,
                       iterations=1)  # fmt: skip
