"""One kernel choice (engine.ops), made when the model is built and handed to the modules.

- `model.kernels: triton` without CUDA and without the interpreter is a ConfigError at build time;
- the Triton build really runs the `pefomed::` ops (LoRA, grouped projection + placement), and
  the torch build none of them;
- the torch build never imports Triton (checked in a fresh interpreter where it cannot be imported).
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pefomed.engine.build import build_model
from pefomed.engine.config import load_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TINY = [
    "model.random_init=true", "model.llm=tiny", "model.vision=tiny", "model.image_size=32", "model.dtype=float32",
    "model.llm_overrides={vocab_size: 50, hidden_size: 32, intermediate_size: 40, num_hidden_layers: 1, num_attention_heads: 2}",
    "lora.r=4", "lora.alpha=8", "lora.dropout=0.1", "lora.target_modules=[all-linear]",
]  # fmt: skip


def tiny_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 50, (2, 11), generator=g)
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[:, 1:5] = True
    labels = torch.full((2, 11), -100)
    labels[:, 7:] = ids[:, 7:]
    b = {"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "input_ids": ids, "labels": labels,
         "image_token_mask": mask, "attention_mask": torch.ones(2, 11, dtype=torch.long)}  # fmt: skip
    return {k: v.to(DEVICE) for k, v in b.items()}


def run_clean(script: str, **env_changes: str) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter whose environment has no TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | env_changes
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.skipif(torch.cuda.is_available(), reason="the error is for machines without CUDA")
def test_triton_without_cuda_or_interpreter_is_a_config_error():
    result = run_clean(f"""
        from pefomed.engine.build import build_model
        from pefomed.engine.config import ConfigError, load_config
        try:
            build_model(load_config(None, {TINY + ["model.kernels=triton"]!r}), "cpu")
        except ConfigError as e:
            print("ConfigError:", e)
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "ConfigError: model.kernels=triton needs a CUDA GPU (or TRITON_INTERPRET=1 for the interpreter); "
        "use model.kernels=torch"
    )


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func._schema.name)
        return func(*args, **(kwargs or {}))


PEFOMED_OPS = {
    "pefomed::lora_linear_forward", "pefomed::lora_linear_backward",
    "pefomed::grouped_projection_place_", "pefomed::grouped_projection_backward",
    "pefomed::rms_norm", "pefomed::rms_norm_backward", "pefomed::swiglu", "pefomed::swiglu_backward",
    "pefomed::rope", "pefomed::rope_backward",
}  # fmt: skip


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_the_built_model_runs_the_chosen_kernels(kernels):
    if kernels == "triton":
        pytest.importorskip("triton")
    model = build_model(load_config(None, [*TINY, f"model.kernels={kernels}"]), DEVICE)
    log = OpLog()
    with log:
        loss, _ = model(tiny_batch())
        loss.backward()
    ours = {name for name in log.names if name.startswith("pefomed::")}
    assert ours == (PEFOMED_OPS if kernels == "triton" else set())


def test_qlora_frozen_layers_run_the_nf4_op_under_triton():
    pytest.importorskip("triton")
    overrides = ["model.kernels=triton", "model.quantize_llm=nf4", "lora.target_modules=[q_proj, v_proj]"]
    model = build_model(load_config(None, [*TINY, *overrides]), DEVICE)
    log = OpLog()
    with log:
        loss, _ = model(tiny_batch())
        loss.backward()
    ours = {name for name in log.names if name.startswith("pefomed::")}
    # k, o, gate, up, down are frozen NF4 layers; q and v carry adapters over an NF4 base.
    assert {"pefomed::nf4_linear", "pefomed::grouped_projection_place_"} <= ours
    assert any("lora" in name for name in ours)


def test_torch_kernels_never_import_triton():
    result = run_clean(f"""
        import sys
        sys.modules["triton"] = None  # any import of triton now fails
        import torch
        from pefomed.engine.build import build_model
        from pefomed.engine.config import load_config

        model = build_model(load_config(None, {TINY + ["model.kernels=torch"]!r}), "cpu")
        g = torch.Generator().manual_seed(1)
        ids = torch.randint(0, 50, (2, 11), generator=g)
        mask = torch.zeros(2, 11, dtype=torch.bool)
        mask[:, 1:5] = True
        labels = torch.full((2, 11), -100)
        labels[:, 7:] = ids[:, 7:]
        loss, n = model({{"pixel_values": torch.randn(2, 3, 32, 32, generator=g), "input_ids": ids,
                          "labels": labels, "image_token_mask": mask}})
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert all(g is not None and torch.isfinite(g).all() for g in grads)
        print("ok", int(n), len(grads), sorted(m for m in sys.modules if m.startswith("pefomed.kernels")))
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split()[:3] == ["ok", "8", str(7 * 2 + 2)]
    assert "pefomed.kernels.lora" not in result.stdout and "pefomed.kernels.visual_proj" not in result.stdout
