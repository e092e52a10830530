"""bench.memory: the fitted memory model against deeper measured runs and a 2-rank fsdp2 run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pefomed.bench import memory as M
from pefomed.errors import UserError

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")
# The demo's tiny LLM made six layers deep, so that the fit from 1 and 2 layers has to reach far.
OVERRIDES = ["model.llm_overrides={num_hidden_layers: 6}", "lora.target_modules=[q_proj, v_proj, down_proj]"]
SEQ, ANSWER = 40, 6
CPU = torch.device("cpu")


def rel(a, b):
    return abs(a - b) / abs(b)


@pytest.fixture(scope="module")
def plan():
    return M.make_plan(DEMO, OVERRIDES, None, SEQ, ANSWER, 3)


def test_bilinear_fit_is_exact_on_a_bilinear_quantity():
    points = [M.Point(layer, b, {"mlp": 7 + 3 * layer + 5 * b + 11 * layer * b}, 100 + 9 * layer, 4)
              for layer in (1, 2) for b in (1, 2)]  # fmt: skip
    coeffs = M.bilinear(points, lambda p: p.saved["mlp"])
    assert coeffs == pytest.approx((7, 3, 5, 11))
    model = M.fit_side(points, "ours", False)
    assert model.activations(32, 4)["mlp"] == pytest.approx(7 + 96 + 20 + 11 * 128)
    assert model.per_layer(4)["mlp"] == pytest.approx(3 + 44)
    assert M.evaluate(model.params, 32, 1) == pytest.approx(100 + 9 * 32)


def test_extrapolation_from_two_layers_matches_a_measured_six_layer_run(plan, tmp_path):
    """Fitted at (1, 2 layers) x (micro-batch 1, 2); checked at 6 layers and micro-batch 3."""
    models = M.measure_all(plan, tmp_path, CPU)
    for (side, ac), model in models.items():
        (deep,) = M.measure_llm(plan, side, ac, 6, [3], tmp_path, CPU)
        predicted = sum(model.activations(6, 3).values())
        assert deep.activations > 0
        assert rel(predicted, deep.activations) < 0.05, (side, ac, predicted, deep.activations)
        assert rel(M.evaluate(model.params, 6, 1), deep.params) < 0.05, (side, ac)
        assert rel(M.evaluate(model.trainable, 6, 1), deep.trainable) < 0.05, (side, ac)
        for kind, value in deep.saved.items():  # and kind by kind, where a kind is not tiny
            if value > 0.05 * deep.activations:
                assert rel(model.activations(6, 3)[kind], value) < 0.05, (side, ac, kind)
    # checkpointing keeps less than the full activations, on both sides
    for side in M.SIDES:
        assert sum(models[side, True].activations(6, 3).values()) < 0.5 * sum(models[side, False].activations(6, 3).values())


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_prediction_matches_what_two_ranks_hold(tmp_path):
    batch = 2
    overrides = OVERRIDES + ["train.strategy=fsdp2", "train.device=cpu", f"train.output_dir={tmp_path / 'run'}"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "tests" / "bench" / "fsdp_memory_worker.py"), str(tmp_path), str(batch), str(SEQ),
               str(ANSWER), DEMO, *overrides]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]

    plan = M.make_plan(DEMO, overrides, None, SEQ, ANSWER, batch)
    models = M.measure_all(plan, tmp_path / "models", CPU, sides=("ours",), ac_modes=(False,))
    parts = M.inventory(plan.cfg)
    connector, _ = M.connector_activations(plan.cfg, plan.dtype)
    sizes = M.sizes_of(models["ours", False], plan, parts)
    predicted = M.predict(models["ours", False], sizes, plan, "fsdp2", 2, batch, connector)
    for r in ranks:
        assert rel(predicted.frozen + predicted.trainable, r["param_bytes"]) < 0.05, r
        assert rel(predicted.optimizer, r["optimizer_bytes"]) < 0.05, r
        assert rel(sum(predicted.activations.values()) + predicted.connector_activations, r["saved_bytes"]) < 0.05, r
    # and the whole model is split, not copied: the two ranks hold about one model between them
    single = M.predict(models["ours", False], sizes, plan, "single", 1, batch, connector)
    assert rel(sum(r["param_bytes"] for r in ranks), single.frozen + single.trainable) < 0.05


def test_micro_batch_search_and_verdicts(plan, tmp_path):
    models = M.measure_all(plan, tmp_path, CPU, sides=("ours",), ac_modes=(False,))
    sizes = M.sizes_of(models["ours", False], plan, M.inventory(plan.cfg))

    def total(b):
        return M.predict(models["ours", False], sizes, plan, "ddp", 2, b, 1000.0).total

    budget = (total(5) + total(6)) / 2
    assert M.max_micro_batch(M.predict(models["ours", False], sizes, plan, "ddp", 2, 1, 1000.0),
                             M.predict(models["ours", False], sizes, plan, "ddp", 2, 2, 1000.0), budget) == 5  # fmt: skip
    assert M._accumulation(128, 2, 5) == {"micro_batch": 4, "grad_accum": 16}
    assert M._accumulation(128, 2, 64) == {"micro_batch": 64, "grad_accum": 1}


def test_config_llm_not_on_this_machine_uses_its_published_shapes():
    from pefomed.engine.config import load_config

    cfg = load_config(REPO / "configs" / "pefomed_stage1.yaml")
    resolved, notes = M.resolve(cfg, "configs/pefomed_stage1.yaml", None)
    assert resolved.model.llm == "llama2-7b-chat" and resolved.model.random_init
    assert "Llama-2-7b-chat-hf" in notes[0]
    assert M.text_config(resolved).num_hidden_layers == 32
    odd = load_config(REPO / "configs" / "pefomed_stage1.yaml", ["model.llm=/models/my-own-llm"])
    with pytest.raises(UserError, match="configs/x.yaml: model.llm=/models/my-own-llm .* pass --llm"):
        M.resolve(odd, "configs/x.yaml", None)
    with pytest.raises(UserError, match="--llm gpt: expected one of"):
        M.resolve(odd, "configs/x.yaml", "gpt")


def test_parse_bytes():
    assert M.parse_bytes("40GB") == 40 * 10**9
    assert M.parse_bytes("80GiB") == 80 * 2**30
    assert M.parse_bytes("48") == 48 * 2**30
    assert M.parse_bytes("512MB") == 512 * 10**6
    with pytest.raises(UserError, match="--gpu-mem 'lots'"):
        M.parse_bytes("lots")


def test_command_writes_report_and_chart(tmp_path):
    result = M.main(["--config", DEMO, *OVERRIDES, "--seq-len", str(SEQ), "--answer-tokens", str(ANSWER),
                     "--micro-batch", "2", "--strategy", "fsdp2", "--gpus", "2", "--gpu-mem", "1GB",
                     "--out-dir", str(tmp_path), "--name", "demo"])  # fmt: skip
    saved = json.loads((tmp_path / "demo.json").read_text())
    assert saved["command"].startswith("python -m pefomed.bench.memory --config") and saved["date"]
    strategies = {p["strategy"] for p in saved["report"]["predictions"]}
    assert strategies == {"fsdp2"}
    assert {(p["side"], p["ac"]) for p in saved["report"]["predictions"]} == {
        (s, a) for s in M.SIDES for a in M.AC_MODES}
    for p in saved["report"]["predictions"]:
        assert p["total"] == pytest.approx(p["static"] + p["activation_total"] + p["working_set"])
        assert p["fits"] == (p["total"] <= M.usable(10**9))
    assert len(result["verdict"]) == 4 and all("fsdp2" in v for v in result["verdict"])
    text = (tmp_path / "demo.md").read_text()
    assert saved["command"] in text and "Activations per decoder layer" in text
    assert (tmp_path / "demo.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dropout", [0.05, 0.0])
def test_triton_lora_saved_bytes_formula_is_what_the_kernel_saves(dtype, dropout):
    """The formula the CPU report uses for ours' LoRA activations under kernels: triton, against the
    kernel itself (Triton's interpreter on the CPU)."""
    from pefomed.bench.step import SavedTensorMeter
    from pefomed.kernels.lora import lora_linear

    m, k, n, r = 12, 40, 24, 4
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.randn(n, k, dtype=dtype), requires_grad=False)
    layer.a = torch.nn.Parameter(torch.randn(r, k))
    layer.b = torch.nn.Parameter(torch.randn(n, r))
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    meter = SavedTensorMeter(layer)
    meter.excluded.add(("cpu", x.untyped_storage().data_ptr()))  # the input is the caller's
    with meter.measure():
        y = lora_linear(x, layer.weight, layer.a, layer.b, 2.0, dropout_p=dropout, training=True)
    assert meter.total == M.triton_lora_bytes(m, k, n, r, dropout, dtype)
    y.float().sum().backward()
    meter.close()
