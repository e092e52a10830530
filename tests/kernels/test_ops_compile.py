"""Every `pefomed::*` custom op under torch.compile (inductor, fullgraph, forward and backward) and
`torch.library.opcheck`, on CPU (Triton interpreter, bf16 with the GPU's semantics).

The ops are reached through the public callables the engine uses (`engine.ops.kernel_ops("triton")`
and the NF4 / norm / activation / RoPE entry points): each scenario below runs eagerly while a
dispatch mode records every `pefomed::` op call with its real arguments, then
- `torch.library.opcheck` checks each recorded call (schema, fake tensor, autograd registration,
  AOT dispatch with dynamic shapes),
- `torch.compile(backend="inductor", fullgraph=True)` of the scenario must give the eager outputs
  and gradients (inductor's fake-tensor strides must match what the op really returns).
A test also checks that every op registered under `torch.ops.pefomed` is reached by some scenario,
so a new op without a scenario fails here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
from collections.abc import Callable

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pefomed.bench.static import kernel_modules

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

for _name in kernel_modules():  # registers every pefomed:: op
    importlib.import_module(_name)


def registered_ops() -> list[str]:
    ns = torch.ops.pefomed
    names = []
    for name in dir(ns):
        packet = getattr(ns, name, None)
        if isinstance(packet, torch._ops.OpOverloadPacket):
            names.append(name)
    return sorted(names)


@dataclasses.dataclass
class Scenario:
    name: str
    make: Callable[[], dict]  # leaf tensors (some requiring grad) and other arguments
    run: Callable[[dict], torch.Tensor | tuple]  # the public call(s); returns the output(s)
    rtol: float = 2e-2  # bf16 outputs: eager and compiled run the same kernels, so they agree closely


def _ops():
    from pefomed.engine.ops import kernel_ops

    return kernel_ops("triton", "cpu")


def _lora_inputs(x_dtype, ab_dtype, bias: bool, nf4: bool = False):
    g = torch.Generator().manual_seed(0)
    m_in, m_out, r = 48, 40, 8
    w = torch.randn(m_out, m_in, generator=g) / m_in**0.5
    if nf4:
        from pefomed.kernels.nf4 import to_nf4

        weight = to_nf4(w.to(x_dtype))
    else:
        weight = w.to(x_dtype)
    return {
        "x": torch.randn(2, 5, m_in, generator=g).to(x_dtype).requires_grad_(),
        "weight": weight,
        "lora_A": (torch.randn(r, m_in, generator=g) / m_in**0.5).to(ab_dtype).requires_grad_(),
        "lora_B": (torch.randn(m_out, r, generator=g) * 0.1).to(ab_dtype).requires_grad_(),
        "bias": torch.randn(m_out, generator=g).to(x_dtype).requires_grad_() if bias else None,
    }


def _lora_run(kw, dropout_p):
    from pefomed.kernels.lora import lora_linear

    # an explicit seed: eager and compiled draw the same mask
    return lora_linear(kw["x"], kw["weight"], kw["lora_A"], kw["lora_B"], 2.0, kw["bias"], dropout_p, True, seed=1234)


def _nf4_inputs(m):
    from pefomed.kernels.nf4 import to_nf4

    g = torch.Generator().manual_seed(1)
    return {
        "x": torch.randn(m, 64, generator=g).to(torch.bfloat16).requires_grad_(),
        "q": to_nf4(torch.randn(48, 64, generator=g).to(torch.bfloat16)),
        "bias": torch.randn(48, generator=g).to(torch.bfloat16).requires_grad_(),
    }


def _nf4_dequantize(q):
    from pefomed.kernels.nf4 import nf4_dequantize

    return nf4_dequantize(q)


def _proj_inputs(placed: bool, layout: str = "sequence"):
    g = torch.Generator().manual_seed(2)
    b, n, d, out_dim = 2, 16, 24, 32
    kw = {
        "feats": torch.randn(b, 1 + n, d, generator=g).to(torch.bfloat16).requires_grad_(),
        "weight": (torch.randn(out_dim, 4 * d, generator=g) / (4 * d) ** 0.5).requires_grad_(),  # fp32 master weight
        "bias": torch.randn(out_dim, generator=g).requires_grad_(),
        "layout": layout,
    }
    if placed:
        t = 7
        kw["embed"] = torch.randn(b * t + b * n // 4, out_dim, generator=g).to(torch.bfloat16).requires_grad_()
        kw["row_index"] = torch.tensor([i for i in range(b * t + b * n // 4) if i % 3 != 0][: b * n // 4])
    return kw


def _proj_run(kw):
    ops = _ops()
    if "embed" in kw:
        out = kw["embed"] * 1.0  # a non-leaf buffer: the op writes into it in place
        return ops.grouped_projection(kw["feats"], kw["weight"], kw["bias"], 4, kw["layout"], True, out, kw["row_index"])
    return ops.grouped_projection(kw["feats"], kw["weight"], kw["bias"], 4, kw["layout"], True)


SCENARIOS = [
    Scenario("lora.bf16.fp32_adapters.dropout.bias", lambda: _lora_inputs(torch.bfloat16, torch.float32, True),
             lambda kw: _lora_run(kw, 0.1)),
    Scenario("lora.bf16.bf16_adapters", lambda: _lora_inputs(torch.bfloat16, torch.bfloat16, False),
             lambda kw: _lora_run(kw, 0.0)),
    Scenario("lora.fp32", lambda: _lora_inputs(torch.float32, torch.float32, True), lambda kw: _lora_run(kw, 0.1), 1e-4),
    Scenario("qlora.bf16.dropout", lambda: _lora_inputs(torch.bfloat16, torch.float32, False, nf4=True),
             lambda kw: _lora_run(kw, 0.1)),
    Scenario("nf4_linear.gemv", lambda: _nf4_inputs(3), lambda kw: _ops().nf4_linear(kw["x"], kw["q"], kw["bias"])),
    Scenario("nf4_linear.gemm", lambda: _nf4_inputs(40), lambda kw: _ops().nf4_linear(kw["x"], kw["q"], kw["bias"])),
    Scenario("nf4_dequantize", lambda: _nf4_inputs(1), lambda kw: _nf4_dequantize(kw["q"])),
    Scenario("grouped_projection.sequence", lambda: _proj_inputs(False), _proj_run),
    Scenario("grouped_projection.spatial", lambda: _proj_inputs(False, "spatial"), _proj_run),
    Scenario("grouped_projection.placed", lambda: _proj_inputs(True), _proj_run),
]  # fmt: skip


def _extra_scenarios() -> list[Scenario]:
    """The issue-9 ops: kernels/rms_norm.py, swiglu.py, rope.py (LLaMA shapes with GQA)."""
    from pefomed.kernels.rms_norm import rms_norm
    from pefomed.kernels.rope import rope
    from pefomed.kernels.swiglu import swiglu

    g = torch.Generator().manual_seed(3)

    def make_rope():
        pos = torch.arange(7, dtype=torch.float32)
        inv = 1.0 / (10000 ** (torch.arange(0, 16, 2, dtype=torch.float32) / 16))
        emb = torch.cat([torch.outer(pos, inv)] * 2, -1).to(torch.bfloat16)
        return {"q": torch.randn(2, 7, 4, 16, generator=g).to(torch.bfloat16).transpose(1, 2).requires_grad_(),
                "k": torch.randn(2, 2, 7, 16, generator=g).to(torch.bfloat16).requires_grad_(),
                "cos": emb.cos().expand(2, 7, 16), "sin": emb.sin().expand(2, 7, 16)}  # fmt: skip

    return [
        Scenario(
            "rms_norm.bf16",
            lambda: {"x": torch.randn(3, 5, 40, generator=g).to(torch.bfloat16).requires_grad_(),
                     "w": (1 + 0.1 * torch.randn(40, generator=g)).to(torch.bfloat16).requires_grad_()},
            lambda kw: rms_norm(kw["x"], kw["w"], 1e-6),
        ),
        Scenario(
            "swiglu.bf16",
            lambda: {"gate": torch.randn(3, 5, 72, generator=g).to(torch.bfloat16).requires_grad_(),
                     "up": torch.randn(3, 5, 72, generator=g).to(torch.bfloat16).requires_grad_()},
            lambda kw: swiglu(kw["gate"], kw["up"]),
        ),
        Scenario("rope.bf16.gqa", make_rope, lambda kw: rope(kw["q"], kw["k"], kw["cos"], kw["sin"])),
    ]  # fmt: skip


ALL = SCENARIOS + _extra_scenarios()


class _Recorder(TorchDispatchMode):
    """Records every pefomed:: op call (forward and backward) with cloned arguments."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[torch._ops.OpOverload, tuple, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "pefomed":
            # requires_grad as the op really sees it: inside an autograd.Function's forward or a
            # backward pass grad mode is off, and the op is called without autograd
            grad = torch.is_grad_enabled()

            def keep(a):
                if isinstance(a, torch.Tensor):
                    return a.detach().clone().requires_grad_(grad and a.requires_grad)
                return a

            self.calls.append((func, tuple(torch.utils._pytree.tree_map(keep, list(args))), torch.utils._pytree.tree_map(keep, kwargs)))
        return func(*args, **kwargs)


def _leaves(kw: dict) -> list[torch.Tensor]:
    return [v for v in kw.values() if isinstance(v, torch.Tensor) and v.requires_grad]


def _outputs(out) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [o for o in out if isinstance(o, torch.Tensor)]


def _forward_backward(fn, kw):
    outs = _outputs(fn(kw))
    g = torch.Generator().manual_seed(9)
    probes = [torch.randn(o.shape, generator=g).to(o.dtype) for o in outs]
    leaves = _leaves(kw)
    grads = []
    if leaves and any(o.requires_grad for o in outs):
        loss = sum((o.float() * p.float()).sum() for o, p in zip(outs, probes, strict=True) if o.requires_grad)
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [o.detach() for o in outs], [None if x is None else x.detach() for x in grads]


_RECORDED: dict[str, list] = {}


def _recorded(s: Scenario) -> list:
    if s.name not in _RECORDED:
        rec = _Recorder()
        kw = s.make()
        with rec:
            _forward_backward(s.run, kw)
        _RECORDED[s.name] = rec.calls
    return _RECORDED[s.name]


def test_every_registered_op_is_exercised():
    reached = {call[0].name().split("::")[1].split(".")[0] for s in ALL for call in _recorded(s)}
    missing = sorted(set(registered_ops()) - reached)
    assert not missing, f"pefomed:: ops no scenario reaches (add one to tests/kernels/test_ops_compile.py): {missing}"


def _opcheck_params():
    # one param per (scenario, op): opcheck runs on the first recorded call of that op
    return [pytest.param(s, op, id=f"{s.name}:{op}") for s in ALL for op in _SCENARIO_OPS.get(s.name, ())]


# Which ops each scenario reaches, fixed here so that tests are collected without running kernels;
# test_every_registered_op_is_exercised and test_opcheck check the table against what really runs.
_SCENARIO_OPS = {
    "lora.bf16.fp32_adapters.dropout.bias": ("lora_linear_forward", "lora_linear_backward"),
    "lora.bf16.bf16_adapters": ("lora_linear_forward", "lora_linear_backward"),
    "lora.fp32": ("lora_linear_forward", "lora_linear_backward"),
    "qlora.bf16.dropout": ("lora_project", "nf4_linear", "lora_adapter_backward", "nf4_matmul_t"),
    "nf4_linear.gemv": ("nf4_linear", "nf4_matmul_t"),
    "nf4_linear.gemm": ("nf4_linear", "nf4_matmul_t"),
    "nf4_dequantize": ("nf4_dequantize",),
    "grouped_projection.sequence": ("grouped_projection", "grouped_projection_backward"),
    "grouped_projection.spatial": ("grouped_projection", "grouped_projection_backward"),
    "grouped_projection.placed": ("grouped_projection_place_", "grouped_projection_backward"),
    "rms_norm.bf16": ("rms_norm", "rms_norm_backward"),
    "swiglu.bf16": ("swiglu", "swiglu_backward"),
    "rope.bf16.gqa": ("rope", "rope_backward"),
}


@pytest.mark.parametrize(("scenario", "op"), _opcheck_params())
def test_opcheck(scenario: Scenario, op: str):
    calls = [c for c in _recorded(scenario) if c[0].name().split("::")[1].split(".")[0] == op]
    assert calls, f"{scenario.name} did not call pefomed::{op}; update _SCENARIO_OPS"
    func, args, kwargs = calls[0]
    torch.library.opcheck(func, args, kwargs)


def test_scenario_table_matches_what_runs():
    for s in ALL:
        ran = {c[0].name().split("::")[1].split(".")[0] for c in _recorded(s)}
        assert ran == set(_SCENARIO_OPS[s.name]), (s.name, sorted(ran))


@contextlib.contextmanager
def _inductor_settings():
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    with inductor_config.patch(fallback_random=True, compile_threads=1):
        yield
    torch._dynamo.reset()


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    a64, b64 = a.double(), b.double()
    scale = max(b64.abs().max().item(), 1e-6)
    return bool(((a64 - b64).abs() <= rtol * scale).all())


@pytest.mark.parametrize("scenario", ALL, ids=[s.name for s in ALL])
def test_inductor_fullgraph_forward_backward(scenario: Scenario):
    """torch.compile(backend="inductor", fullgraph=True): the compiled forward and its compiled
    backward give the eager outputs and gradients (same kernels, so agreement to rounding)."""
    from torch._inductor.compile_fx import compile_fx  # what backend="inductor" resolves to

    graphs = []

    def inductor(gm, example_inputs):
        graphs.append(gm)
        return compile_fx(gm, example_inputs)

    kw = scenario.make()
    eager_out, eager_grads = _forward_backward(scenario.run, kw)
    with _inductor_settings():
        compiled = torch.compile(scenario.run, backend=inductor, fullgraph=True)
        kw2 = {k: (v.detach().clone().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor) and v.is_leaf and v.requires_grad else v)
               for k, v in kw.items()}  # fmt: skip
        out, grads = _forward_backward(compiled, kw2)
    # one graph (fullgraph), and our ops are in it as ops, not traced through
    assert len(graphs) == 1
    # (an autograd.Function is a higher-order op whose forward / backward bodies are submodules)
    in_graph = {str(n.target) for m in graphs[0].modules() if hasattr(m, "graph")
                for n in m.graph.nodes if n.op == "call_function"}  # fmt: skip
    assert any(t.startswith("pefomed.") for t in in_graph), sorted(in_graph)
    for i, (a, b) in enumerate(zip(out, eager_out, strict=True)):
        assert _close(a, b, scenario.rtol), f"output {i}: compiled differs from eager"
    assert len(grads) == len(eager_grads)
    for i, (a, b) in enumerate(zip(grads, eager_grads, strict=True)):
        assert (a is None) == (b is None)
        if a is not None:
            assert _close(a, b, scenario.rtol), f"grad {i}: compiled differs from eager"
