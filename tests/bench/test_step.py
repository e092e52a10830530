"""bench.step: parity with HF+PEFT, the saved-tensor accounting, the depth fit and the reports.

Tiny random LLaMA folders keep these on the CPU in seconds; the real SmolLM2 runs in
test_step_smollm2.py.
"""

import dataclasses
import json
import os

import pytest
import torch

from pefomed.bench import step as S

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return S.random_model_folder("tiny", 3, torch.float32, tmp_path_factory.mktemp("models"))


def small(case: str, **changes) -> S.StepCase:
    base = dict(image_tokens=12, before_image=2, after_image=4, question=(2, 5), answer=(2, 6))
    return dataclasses.replace(S.CASES[case], **{**base, **changes})


def inputs(case, vocab=512, hidden=128, batch=3, seed=0):
    batch = S.make_batch(case, batch, vocab, seed)
    return batch, S.image_embeddings(batch, hidden, 0.02, seed, CPU, torch.float32)


def test_batches_have_the_seeds_shapes():
    for name, case in S.CASES.items():
        b = S.make_batch(case, 4, 32000, 0)
        stats = S.batch_stats(b)
        assert stats["image_tokens"] == 4 * case.image_tokens
        assert (b["image_token_mask"].sum(1) == case.image_tokens).all()
        lengths = b["attention_mask"].sum(1)
        targets = (b["labels"] != S.IGNORE_INDEX).sum(1)
        assert ((targets >= case.answer[0]) & (targets <= case.answer[1])).all(), name
        prompt = lengths - targets
        lo = 1 + case.before_image + case.image_tokens + case.after_image
        assert ((prompt >= lo + case.question[0]) & (prompt <= lo + case.question[1])).all(), name
        # labels only where the answer is, inside the real tokens; right padding
        assert not (b["labels"][b["attention_mask"] == 0] != S.IGNORE_INDEX).any()
        assert (b["attention_mask"].cumsum(1).max(1).values == lengths).all()
    vqa = S.batch_stats(S.make_batch(S.CASES["pefomed-vqa"], 4, 32000, 0))
    assert 290 <= vqa["seq_len"] <= 315  # PeFoMed's VQA-RAD micro-batch: T ~ 300


@pytest.mark.parametrize("ac", [False, True])
@pytest.mark.parametrize("name", ["pefomed-vqa", "med-idefics-qlora"])
def test_one_step_matches_hf_peft_in_fp32(folder, name, ac):
    case = small(name)
    ours, hf = S.build_pair(folder, case, torch.float32, CPU, ac, 0)
    batch, feats = inputs(case)
    parity = S.check_parity(ours, hf, batch, feats, 0)
    assert parity["passed"], parity
    assert parity["adapters_compared"] == len(ours.adapters) == 3 * 2 * (2 if name == "pefomed-vqa" else 7)
    # the B drawn non-zero makes every adapter gradient count
    _, grads, _ = S.one_step_grads(ours, batch, feats, 0)
    assert all(g.abs().sum() > 0 for g in grads.values())


def test_parity_check_fails_when_the_math_differs(folder):
    case = small("pefomed-vqa")
    ours, hf = S.build_pair(folder, case, torch.float32, CPU, False, 0)
    for module in ours.model.modules():
        if hasattr(module, "scaling"):
            module.scaling *= 1.001  # a 0.1% wrong alpha / r
    batch, feats = inputs(case)
    parity = S.check_parity(ours, hf, batch, feats, 0)
    assert not parity["passed"] and parity["adapter_grad_rel_err"] > 1e-5


def test_saved_tensor_meter_counts_each_storage_once():
    x = torch.randn(6, 5, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(5, 4))
    lin = torch.nn.Linear(4, 3)
    model = torch.nn.ModuleDict({"lin": lin})
    model.w = w
    meter = S.SavedTensorMeter(model)
    with meter.measure():
        y = x @ w  # saves x (and w, a parameter: excluded)
        z = y.exp()  # saves its result z
        v = x[:, :2] * x[:, 2:4]  # saves two views of x: x's storage, counted once already
        out = lin(z) + v.sum()  # Linear saves its input z: counted once
    expected = x.numel() * 4 + z.numel() * 4
    assert meter.total == expected
    assert meter.by_kind() == {"head+loss": expected}
    out.sum().backward()
    meter.close()


def test_meter_attributes_kinds_and_checkpointed_inputs(folder):
    case = small("pefomed-vqa", dropout=0.0)
    batch, feats = inputs(case, batch=2)
    b, t = batch["input_ids"].shape
    hidden_bytes = b * t * 128 * 4  # one [B, T, hidden] fp32 hidden state
    for ac in (False, True):
        ours, hf = S.build_pair(folder, case, torch.float32, CPU, ac, 0)
        for side in (ours, hf):
            meter = S.SavedTensorMeter(side.model)
            with meter.measure():
                loss = side.loss(batch, feats)
            by_layer = meter.by_layer_kind()
            kinds = meter.by_kind()
            if ac:
                # What the checkpoints keep: each layer's input hidden state, and the RoPE tables
                # (first seen at layer 0) where they are passed as tensor arguments. Nothing else.
                layers = {k: v for k, v in by_layer.items() if k is not None}
                assert sorted(layers) == [0, 1, 2] and all(v.keys() == {"checkpointed inputs"} for v in layers.values())
                assert layers[1]["checkpointed inputs"] == layers[2]["checkpointed inputs"] == hidden_bytes
                rope = 2 * b * t * 32 * 4  # cos and sin, [B, T, head_dim] fp32
                assert layers[0]["checkpointed inputs"] in (hidden_bytes, hidden_bytes + rope), side.name
            else:
                # Ours runs q/k/v (gate/up) as one GEMM with the adapters on their slices
                # (models.llama.fused_projections): the LoRA modules are not called, so what the
                # adapters keep ([N, r] and an RNG state) is counted under the attention module.
                expected = {"attention", "mlp", "norm"} | ({"lora"} if side is hf else set())
                assert expected <= kinds.keys() and (side is hf or "lora" not in kinds), side.name
                assert sorted(k for k in by_layer if k is not None) == [0, 1, 2]
                # RMSNorm keeps (at least) its input: two per layer
                assert by_layer[1]["norm"] >= 2 * hidden_bytes
            loss.backward()
            meter.close()


def test_cpu_peak_is_saved_plus_parameters_gradients_and_optimizer(folder):
    case = small("pefomed-vqa")
    ours, _ = S.build_pair(folder, case, torch.float32, CPU, False, 0)
    batch, feats = inputs(case)
    meter, peak = S.measure_saved(ours, batch, feats)
    unique = {p.data_ptr(): p.numel() * p.element_size() for p in ours.model.parameters()}
    trainable = sum(p.numel() * 4 for p in ours.model.parameters() if p.requires_grad)
    assert peak["params_bytes"] == sum(unique.values())
    assert peak["grads_bytes"] == trainable
    # AdamW: exp_avg and exp_avg_sq per trained parameter, plus one scalar step each
    n_trained = sum(1 for p in ours.model.parameters() if p.requires_grad)
    assert peak["optimizer_bytes"] == 2 * trainable + 4 * n_trained
    assert peak["peak_bytes"] == peak["saved_bytes"] + peak["params_bytes"] + peak["grads_bytes"] + peak["optimizer_bytes"]


def test_depth_fit_is_a_line_through_the_measured_depths():
    def depth(layers, ms, saved):
        side = {"median_ms": ms, "peak_bytes": 1000 + saved, "saved_bytes": saved, "tokens_per_s": 100.0,
                "tflops": 1.0, "mfu": 0.5}  # fmt: skip
        return {"layers": layers, "model_flops_per_step": 10.0 * layers, "ours": side, "hf+peft": dict(side, median_ms=2 * ms)}

    out = S.extrapolate([depth(2, 30.0, 200), depth(4, 50.0, 400)], 32)
    assert out["ours"]["median_ms"] == pytest.approx(10 + 10 * 32)
    assert out["ours"]["saved_bytes"] == pytest.approx(100 * 32)
    assert out["ours"]["median_ms_fit"] == pytest.approx({"a": 10.0, "b_per_layer": 10.0})
    assert out["ratios"]["speedup"] == pytest.approx(2.0)
    # throughput scales with the time; MFU with the FLOPs of the full depth
    assert out["ours"]["tokens_per_s"] == pytest.approx(100.0 * 50 / 330)


def test_model_flops_count_what_the_loss_needs():
    from pefomed.models.llama import CONFIGS

    c = CONFIGS["tiny"]
    case = small("pefomed-vqa")
    batch = S.make_batch(case, 2, c.vocab_size, 0)
    tokens = int(batch["attention_mask"].sum())
    targets = int((batch["labels"][:, 1:] != S.IGNORE_INDEX).sum())
    h, i, r = c.hidden_size, c.intermediate_size, case.r
    frozen = 4 * h * h + 3 * h * i
    lora = 2 * r * (h + h)  # q and v
    attn = sum(3 * 2 * int(n) ** 2 * h for n in batch["attention_mask"].sum(1))
    expected = c.num_hidden_layers * (tokens * (4 * frozen + 6 * lora) + attn) + 4 * targets * h * c.vocab_size
    assert S.step_flops(c, case, batch) == expected


def test_command_writes_json_markdown_and_chart(tmp_path):
    result = S.main(["--model", "tiny", "--layers", "2", "--reps", "1", "--batches", "1", "--batch-size", "2",
                     "--out-dir", str(tmp_path), "--scratch", str(tmp_path / "models")])  # fmt: skip
    paths = {k: tmp_path / p.split("/")[-1] for k, p in result["written"].items()}
    saved = json.loads(paths["json"].read_text())
    threads = os.environ.get("OMP_NUM_THREADS")
    prefix = f"OMP_NUM_THREADS={threads} " if threads else ""  # a thread count set outside is recorded
    assert saved["command"] == (f"{prefix}python -m pefomed.bench.step --model tiny --layers 2 --reps 1 --batches 1 "
                                f"--batch-size 2 --out-dir {tmp_path} --scratch {tmp_path / 'models'}")  # fmt: skip
    assert saved["device"].startswith("cpu") and saved["date"]
    (run,) = saved["runs"]
    assert [d["layers"] for d in run["depths"]] == [1, 2] and run["extrapolated"]["layers"] == 3
    for d in run["depths"]:
        assert d["parity"]["passed"]
        for side in ("ours", "hf+peft"):
            assert d[side]["median_ms"] > 0 and d[side]["peak_bytes"] > d[side]["saved_bytes"] > 0
    assert {t["status"] for t in saved["targets"]} == {"not measured"}  # not SmolLM2: the targets are not judged
    text = paths["md"].read_text()
    assert saved["command"] in text and saved["date"] in text and "3 (fit)" in text
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_arguments_are_named():
    from pefomed.errors import UserError

    with pytest.raises(SystemExit):
        S.main(["--case", "pefomed-vga", "--no-write"])
    with pytest.raises(UserError, match="--layers 1: the fit needs two depths"):
        S.main(["--model", "tiny", "--layers", "1", "--no-write"])
    with pytest.raises(UserError, match="--layers 9: must be between 1 and the model's 3 layers"):
        S.main(["--model", "tiny", "--layers", "9", "--no-write"])
    with pytest.raises(UserError, match="--model gpt-9"):
        S.main(["--model", "gpt-9", "--no-write"])
