"""NF4Tensor as a tensor: module parameter, state dicts, conversions, views, and the torch path.

The torch path (`F.linear(x, q)`, `x @ q.t()`) is checked against float64 matmuls with the weight
rebuilt from the format's definition (`nf4_reference.reference_dequantize`); it never imports
Triton. Shapes are not multiples of the 64-block.
"""

import copy
import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import is_traceable_wrapper_subclass

from pefomed.kernels.nf4 import NF4Tensor, to_nf4

from .nf4_reference import DEVICE, heavy_tailed, reference_dequantize, rel

ROOT = Path(__file__).resolve().parents[2]


class Frozen(nn.Module):
    """A linear layer whose weight is NF4, as the engine's QLoRA layers hold it."""

    def __init__(self, weight: torch.Tensor, double_quant: bool = True) -> None:
        super().__init__()
        self.weight = nn.Parameter(to_nf4(weight, double_quant=double_quant), requires_grad=False)
        self.bias = nn.Parameter(torch.randn(weight.shape[0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def same_codes(a: NF4Tensor, b: NF4Tensor) -> bool:
    names_a, _ = a.__tensor_flatten__()
    names_b, _ = b.__tensor_flatten__()
    return names_a == names_b and all(torch.equal(getattr(a, n).cpu(), getattr(b, n).cpu()) for n in names_a)


# --- the torch path ------------------------------------------------------------------------------


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(72, 136), (5, 27), (130, 257)])
def test_linear_and_matmul_match_float64(shape, nested):
    q = to_nf4(heavy_tailed(shape), double_quant=nested).to(DEVICE)
    w = reference_dequantize(q).to(DEVICE)
    x = torch.randn(2, 3, shape[1], device=DEVICE, requires_grad=True)
    bias = torch.randn(shape[0], device=DEVICE, requires_grad=True)
    g = torch.randn(2, 3, shape[0], dtype=torch.float64, device=DEVICE)
    for y in (F.linear(x, q, bias), x @ q.t() + bias, torch.matmul(x, q.T) + bias):
        x.grad = bias.grad = None
        y.backward(g.float())
        assert rel(y, x.detach().double() @ w.T + bias.detach().double()) < 1e-6
        assert rel(x.grad, g @ w) < 1e-6 and rel(bias.grad, g.sum((0, 1))) < 1e-6
    # x @ q (q as an [out, in] matrix on the right) and its gradient dy @ q^T
    v = torch.randn(4, shape[0], device=DEVICE, requires_grad=True)
    y = v @ q
    y.backward(torch.ones_like(y))
    assert rel(y, v.detach().double() @ w) < 1e-6 and rel(v.grad, torch.ones(4, shape[1], dtype=torch.float64, device=DEVICE) @ w.T) < 1e-6


def test_the_backward_keeps_the_codes_not_a_dense_weight():
    q = to_nf4(torch.randn(40, 70))
    y = F.linear(torch.randn(3, 70, requires_grad=True), q)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and isinstance(saved[0], NF4Tensor)


def test_the_dtype_is_the_dequantization_dtype():
    q = to_nf4(torch.randn(24, 70))
    half = q.to(torch.bfloat16)
    assert isinstance(half, NF4Tensor) and half.dtype == torch.bfloat16 and same_codes(half, q)
    assert half.packed.data_ptr() != q.packed.data_ptr()  # .to() returns a copy
    assert torch.equal(half.dequantize(), reference_dequantize(q).to(torch.bfloat16))
    x = torch.randn(5, 70, dtype=torch.bfloat16)
    assert rel(F.linear(x, half), x.double() @ reference_dequantize(q).to(torch.bfloat16).double().T) < 8e-3
    with pytest.raises(RuntimeError, match="same dtype|dtype"):
        F.linear(x, q)  # as for a dense fp32 weight: the dtypes must agree
    with pytest.raises(TypeError, match="converts only to a float dtype"):
        q.to(torch.int8)
    module = Frozen(torch.randn(24, 70)).to(torch.bfloat16)
    assert isinstance(module.weight, NF4Tensor) and module.weight.dtype == torch.bfloat16
    assert isinstance(module.weight, nn.Parameter) and not module.weight.requires_grad


def test_other_ops_read_the_dequantized_values_and_only_copy_writes():
    q = to_nf4(torch.randn(9, 70))
    w = q.dequantize()
    assert torch.equal(q + 1, w + 1) and torch.equal(q.sum(0), w.sum(0)) and torch.equal(q[2], w[2])
    assert torch.equal(torch.cat([q, q]), torch.cat([w, w])) and torch.equal(q.t().contiguous(), w.t().contiguous())
    with pytest.raises(RuntimeError, match="writes into an NF4Tensor"):
        q.add_(1)
    with pytest.raises(RuntimeError, match="writes into an NF4Tensor"):
        torch.add(w, w, out=q)
    q.zero_()
    assert torch.equal(q.dequantize(), torch.zeros_like(w))


@pytest.mark.parametrize("triton_installed", [True, False])
def test_torch_path_never_imports_triton(triton_installed):
    """QLoRA's `kernels: torch` path, in a fresh interpreter: Triton is never imported, and where it
    cannot be imported everything still runs."""
    block = "" if triton_installed else 'sys.modules["triton"] = None  # any import of triton now fails'
    code = textwrap.dedent(f"""
        import sys
        {block}
        import torch
        import torch.nn.functional as F
        from pefomed.kernels.nf4 import to_nf4
        from pefomed.kernels.reference import lora_linear_reference

        q = to_nf4(torch.randn(40, 70))
        x = torch.randn(3, 70, dtype=torch.float64, requires_grad=True)
        a, b = torch.randn(4, 70, dtype=torch.float64), torch.randn(40, 4, dtype=torch.float64)
        w = q.dequantize(torch.float64)
        y = lora_linear_reference(x, q, a, b, 0.5)
        y.sum().backward()
        assert torch.allclose(y, x @ w.T + 0.5 * x @ a.T @ b.T, rtol=1e-12, atol=1e-12)
        assert torch.allclose(x.grad, torch.ones(3, 40, dtype=torch.float64) @ (w + 0.5 * b @ a), rtol=1e-12)
        x32 = x.detach().float()
        assert torch.equal(F.linear(x32, q), x32 @ q.t())
        print(sys.modules.get("triton") is not None)
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"


def test_compiles_fullgraph_on_the_torch_path():
    q = to_nf4(torch.randn(40, 70)).to(DEVICE)
    bias = torch.randn(40, device=DEVICE, requires_grad=True)

    def step(x):
        return F.linear(x, q, bias).square().sum() + (x @ q.t()).sum()

    x = torch.randn(6, 70, device=DEVICE, requires_grad=True)
    loss = torch.compile(step, backend="aot_eager", fullgraph=True)(x)
    grads = torch.autograd.grad(loss, (x, bias))
    eager = step(x)
    torch.testing.assert_close(loss, eager)
    for got, want in zip(grads, torch.autograd.grad(eager, (x, bias))):
        torch.testing.assert_close(got, want)


# --- a module parameter ------------------------------------------------------------------------


def test_parameter_and_state_dict_hold_the_one_tensor():
    module = Frozen(torch.randn(24, 70))
    assert isinstance(module.weight, nn.Parameter) and isinstance(module.weight, NF4Tensor)
    assert [n for n, p in module.named_parameters() if not p.requires_grad] == ["weight"]
    sd = module.state_dict()
    assert sd.keys() == {"weight", "bias"} and isinstance(sd["weight"], NF4Tensor)
    assert sd["weight"].packed.data_ptr() == module.weight.packed.data_ptr()  # detached, not copied
    assert is_traceable_wrapper_subclass(sd["weight"])
    names, meta = sd["weight"].__tensor_flatten__()
    assert names == ["packed", "absmax", "quant_map", "offset", "nested_absmax", "nested_code"]
    rebuilt = NF4Tensor.__tensor_unflatten__({n: getattr(sd["weight"], n) for n in names}, meta, (24, 70), (70, 1))
    assert same_codes(rebuilt, module.weight) and rebuilt.dtype == module.weight.dtype


def test_load_state_dict_takes_nf4_or_a_dense_checkpoint():
    dense = torch.randn(24, 70, dtype=torch.bfloat16)
    expected = to_nf4(dense)
    module = Frozen(torch.randn(24, 70, dtype=torch.bfloat16))
    packed = module.weight.packed
    module.load_state_dict({"weight": dense, "bias": torch.zeros(24)})  # quantized on load
    assert same_codes(module.weight, expected) and module.weight.packed is packed
    module.load_state_dict({"weight": to_nf4(torch.randn(24, 70, dtype=torch.bfloat16)), "bias": torch.zeros(24)})
    assert not same_codes(module.weight, expected)
    module.load_state_dict(Frozen(dense).state_dict())
    assert same_codes(module.weight, expected)
    with pytest.raises(RuntimeError, match="size mismatch"):
        module.load_state_dict({"weight": torch.randn(24, 71), "bias": torch.zeros(24)})
    with pytest.raises(RuntimeError, match='Missing key.*"weight"'):
        module.load_state_dict({"bias": torch.zeros(24)})


def test_swap_mode_quantizes_a_dense_checkpoint_even_on_assign():
    dense = torch.randn(24, 70)
    module = Frozen(torch.randn(24, 70))
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        module.load_state_dict({"weight": dense, "bias": torch.zeros(24)}, assign=True)
    finally:
        torch.__future__.set_swap_module_params_on_conversion(False)
    assert isinstance(module.weight, NF4Tensor) and isinstance(module.weight, nn.Parameter)
    assert same_codes(module.weight, to_nf4(dense))


def test_copies_moves_and_deepcopy():
    q = to_nf4(heavy_tailed((33, 70)))
    detached, cloned = q.detach(), q.clone()
    assert detached.packed.data_ptr() == q.packed.data_ptr() and same_codes(detached, q)
    assert cloned.packed.data_ptr() != q.packed.data_ptr() and same_codes(cloned, q)
    assert q.cpu() is q and same_codes(q.to("cpu", copy=True), q)
    moved = q.to(DEVICE)
    assert moved.device.type == DEVICE.type and moved.packed.device.type == DEVICE.type and same_codes(moved, q)
    target = to_nf4(torch.randn(33, 70))
    packed = target.packed
    target.copy_(q)
    assert target.packed is packed and same_codes(target, q)
    module = Frozen(torch.randn(33, 70))
    twin = copy.deepcopy(module)
    assert isinstance(twin.weight, NF4Tensor) and isinstance(twin.weight, nn.Parameter)
    assert twin.weight.packed.data_ptr() != module.weight.packed.data_ptr() and same_codes(twin.weight, module.weight)
    with pytest.raises(ValueError, match="same layout"):
        target.copy_(to_nf4(torch.randn(33, 70), double_quant=False))
    with pytest.raises(TypeError, match="quantizes float values"):
        target.copy_(torch.ones(33, 70, dtype=torch.int64))


def test_save_and_load_with_weights_only(tmp_path):
    module = Frozen(heavy_tailed((33, 70)))
    path = tmp_path / "sd.pt"
    torch.save(module.state_dict(), path)
    buffer = io.BytesIO()
    torch.save(module.state_dict(), buffer)
    buffer.seek(0)
    assert same_codes(torch.load(buffer, weights_only=True)["weight"], module.weight)
    # a fresh process: importing kernels.nf4 is all weights_only=True needs (NF4Tensor is a safe global)
    code = f"""
import torch
from pefomed.kernels.nf4 import NF4Tensor
sd = torch.load({str(path)!r}, weights_only=True)
w = sd["weight"]
assert type(w) is NF4Tensor and w.shape == (33, 70) and w.nested
print(float(w.dequantize().double().sum()))
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert float(result.stdout) == float(reference_dequantize(module.weight).sum())


# --- views and pieces (what FSDP2 calls) -------------------------------------------------------


@pytest.mark.parametrize(
    "shape, nested, kept",
    [
        ((128, 256), True, True),  # 64 rows x 256 = one 256-block of 64: the nesting is kept
        ((96, 128), True, False),  # 48 x 128 = 96 blocks: pieces carry fp32 absmax
        ((64, 96), False, False),  # rows of 96 straddle 64-blocks
        ((10, 64), True, True),  # one piece of 5 x 64 and a tail: pieces start on a nested block only at 0
    ],
)
def test_chunks_are_row_pieces_with_the_same_values(shape, nested, kept):
    q = to_nf4(heavy_tailed(shape), double_quant=nested)
    w = reference_dequantize(q)
    pieces = torch.chunk(q, 2) if shape[0] != 10 else torch.split(q, [10])
    assert all(isinstance(p, NF4Tensor) for p in pieces)
    assert torch.equal(torch.cat([p.dequantize().double() for p in pieces]), w)
    assert all(p.nested == (nested and kept) for p in pieces)
    assert sum(p.packed.numel() for p in pieces) == q.packed.numel()
    zeros = q.new_zeros(pieces[0].shape)
    assert isinstance(zeros, NF4Tensor) and zeros.nested == pieces[0].nested
    assert torch.equal(zeros.dequantize(), torch.zeros(pieces[0].shape))
    zeros.narrow(0, 0, pieces[-1].shape[0]).copy_(pieces[-1])  # FSDP2's copy into its padded shard
    assert torch.equal(zeros.dequantize().double(), w[-pieces[-1].shape[0] :])
    flat = zeros.view(-1)
    assert flat.shape == (zeros.numel(),) and flat.packed.data_ptr() == zeros.packed.data_ptr()
    full = torch.as_strided(zeros, zeros.shape, zeros.stride(), 0)
    assert full.packed.data_ptr() == zeros.packed.data_ptr()


def test_pieces_that_cut_a_block_raise():
    q = to_nf4(torch.randn(72, 136))
    with pytest.raises(ValueError, match="not whole 64-element quantization blocks"):
        torch.chunk(q, 2)  # 36 rows x 136 = 76.5 blocks
    with pytest.raises(NotImplementedError, match="only whole rows along dim 0"):
        q[:, :8]
    with pytest.raises(NotImplementedError, match="along dim 1"):
        torch.chunk(q, 2, dim=1)


def test_a_piece_of_a_double_quantized_weight_keeps_the_whole_offset():
    q = to_nf4(heavy_tailed((128, 256)))
    top = q[:64]
    assert top.packed.data_ptr() == q.packed.data_ptr() and top.nested
    top.copy_(q[64:])  # same offset: rows 64.. written into rows ..64 of q
    assert torch.equal(q.dequantize()[:64], q.dequantize()[64:])
    with pytest.raises(ValueError, match="same offset"):
        q[:64].copy_(torch.randn(64, 256))


def test_transposed_view():
    q = to_nf4(torch.randn(24, 70))
    t = q.t()
    assert isinstance(t, NF4Tensor) and t.shape == (70, 24) and not t.is_contiguous()
    assert torch.equal(t.dequantize(), q.dequantize().t()) and t.packed.data_ptr() == q.packed.data_ptr()
    assert t.t().is_contiguous() and torch.equal(t.t().dequantize(), q.dequantize())
    assert "transposed" in repr(t)
    with pytest.raises(RuntimeError, match="view the \\[out, in\\] weight"):
        t.view(-1)


@pytest.mark.parametrize("double_quant", [True, False])
def test_materializes_from_the_meta_device(double_quant):
    """Meta-first building (build on meta, shard, `to_empty`, then load each rank's rows) needs an
    NF4 weight on meta to materialize; its constant code tables are rebuilt, not copied from meta."""
    dense = torch.randn(48, 96)
    q = to_nf4(dense, double_quant=double_quant)
    layer = torch.nn.Linear(96, 48, bias=False, device="meta")
    layer.weight = torch.nn.Parameter(q.to("meta"), requires_grad=False)
    layer.to_empty(device="cpu")
    assert isinstance(layer.weight, NF4Tensor) and layer.weight.device.type == "cpu"
    assert torch.equal(layer.weight.quant_map, q.quant_map)
    if double_quant:
        assert torch.equal(layer.weight.nested_code, q.nested_code)
    with torch.no_grad():
        layer.weight.copy_(q)
    assert torch.equal(layer.weight.dequantize(), q.dequantize())
