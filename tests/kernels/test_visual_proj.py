"""The grouped visual-token projection kernel against float64 PyTorch and transformers' pixel shuffle.

Every case draws fresh inputs with sizes that are not multiples of the interpreter's 16-wide tiles
(D = 24 or 9 splits into a full and a masked K slice per token; 27 rows, 40 columns), and bounds
the relative error of the output and of every gradient against a float64 computation.
Every gradient is pulled back from a random upstream gradient, never from a plain `sum()`.

The tensors live on the GPU when there is one (there the kernels run compiled); without one, on
the CPU under the Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import pefomed.kernels.visual_proj as vp_mod
from pefomed.kernels.reference import grouped_projection_reference
from pefomed.kernels.visual_proj import grouped_projection

from .strided import ODD_SIZES, as_layout, assert_gaps_untouched, guarded_empty, layouts_for

CASES = [  # (batch, patch tokens N, D, out_dim, layout, drop_cls, bias)
    (3, 20, 24, 40, "sequence", True, True),
    (3, 36, 24, 40, "spatial", True, False),
    (2, 16, 9, 17, "spatial", False, True),
    (1, 12, 7, 33, "sequence", False, False),
]
# fp16/bf16 inputs: one rounding of each output (2^-11 / 2^-8) plus the rounded weight cast; a
# wrong row/column/token is O(1).
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.2e-2}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _poison_outputs(monkeypatch):
    """Every buffer the launchers allocate starts as NaN: an element left unwritten fails."""
    monkeypatch.setattr(
        vp_mod, "_new_output", lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)
    )


def rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach()
    return float((got.detach().double() - ref).norm() / ref.norm().clamp_min(1e-30))


def explicit_groups(feats: torch.Tensor, layout: str, drop_cls: bool) -> torch.Tensor:
    """The grouping spelled out token by token (independent of the reference's view/permute)."""
    tokens = feats[:, 1:] if drop_cls else feats
    n = tokens.shape[1]
    if layout == "sequence":
        groups = [[4 * t + g for g in range(4)] for t in range(n // 4)]
    else:
        side = int(n**0.5)
        groups = [[(2 * i) * side + 2 * j, (2 * i) * side + 2 * j + 1, (2 * i + 1) * side + 2 * j, (2 * i + 1) * side + 2 * j + 1]
                  for i in range(side // 2) for j in range(side // 2)]  # fmt: skip
    return torch.stack([torch.cat([tokens[:, p] for p in group], dim=-1) for group in groups], dim=1)


def make_inputs(b, n, d, out_dim, drop_cls, has_bias, dtype, weight_dtype=None):
    feats = torch.randn(b, n + (1 if drop_cls else 0), d, dtype=dtype, device=DEVICE, requires_grad=True)
    weight = (torch.randn(out_dim, 4 * d, device=DEVICE) / (4 * d) ** 0.5).to(weight_dtype or dtype).requires_grad_()
    bias = torch.randn(out_dim, dtype=weight_dtype or dtype, device=DEVICE, requires_grad=True) if has_bias else None
    return feats, weight, bias


def float64_twins(*tensors):
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


# Both dtypes for the two EVA-like layouts; the small drop_cls=False cases once each (interpreter time).
DTYPED_CASES = [(*CASES[0], torch.float32), (*CASES[0], torch.bfloat16), (*CASES[1], torch.float32),
                (*CASES[1], torch.bfloat16), (*CASES[2], torch.float16), (*CASES[3], torch.float32)]  # fmt: skip


@pytest.mark.parametrize("b, n, d, out_dim, layout, drop_cls, has_bias, dtype", DTYPED_CASES)
def test_forward_and_gradients(b, n, d, out_dim, layout, drop_cls, has_bias, dtype):
    tol = TOLERANCE[dtype]
    feats, weight, bias = make_inputs(b, n, d, out_dim, drop_cls, has_bias, dtype)
    y = grouped_projection(feats, weight, bias, group=4, layout=layout, drop_cls=drop_cls)
    f64, w64, b64 = float64_twins(feats, weight, bias)
    grouped = explicit_groups(f64, layout, drop_cls)
    ref = grouped @ w64.T + (b64 if has_bias else 0)
    assert y.shape == (b, n // 4, out_dim) and y.dtype == dtype
    assert rel(y, ref) < tol
    dy = torch.randn_like(ref)
    y.backward(dy.to(dtype))
    ref.backward(dy)
    assert rel(weight.grad, w64.grad) < tol
    assert rel(feats.grad, f64.grad) < tol
    if drop_cls:
        assert bool((feats.grad[:, 0] == 0).all())
    if has_bias:
        assert rel(bias.grad, b64.grad) < tol


def test_reference_matches_the_explicit_grouping():
    feats = torch.randn(2, 37, 5, dtype=torch.float64)
    for layout in ("sequence", "spatial"):
        weight = torch.randn(6, 20, dtype=torch.float64)
        ref = grouped_projection_reference(feats, weight, None, layout=layout)
        torch.testing.assert_close(ref, explicit_groups(feats, layout, True) @ weight.T)


def test_spatial_layout_is_idefics3_pixel_shuffle():
    idefics3 = pytest.importorskip("transformers.models.idefics3.modeling_idefics3")
    side, d = 6, 3
    feats = torch.randn(2, side * side, d, device=DEVICE)
    # pixel_shuffle reads nothing from self; the connector's own config is irrelevant here.
    shuffled = idefics3.Idefics3Connector.pixel_shuffle(None, feats, scale_factor=2)
    identity = torch.eye(4 * d, device=DEVICE)
    got = grouped_projection(feats, identity, None, layout="spatial", drop_cls=False)
    assert torch.equal(got, shuffled)
    assert torch.equal(grouped_projection_reference(feats, identity, None, layout="spatial", drop_cls=False), shuffled)


def test_strided_features_and_fp32_master_weights():
    """Non-contiguous feats are read through their strides; fp32 weight/bias with fp16 activations."""
    big = torch.randn(2, 17, 30, dtype=torch.float16, device=DEVICE)
    feats_view = big[:, :, 3:22]  # D = 19, token stride 30
    assert not feats_view.is_contiguous()
    weight = (torch.randn(21, 4 * 19, device=DEVICE) / 9).requires_grad_()
    bias = torch.randn(21, device=DEVICE, requires_grad=True)
    y = grouped_projection(feats_view, weight, bias)
    f64, w64, b64 = float64_twins(feats_view, weight, bias)
    ref = grouped_projection_reference(f64, w64, b64)
    assert y.dtype == torch.float16 and rel(y, ref) < 2e-3
    dy = torch.randn_like(ref)
    y.backward(dy.half())
    ref.backward(dy)
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    assert rel(weight.grad, w64.grad) < 2e-3 and rel(bias.grad, b64.grad) < 2e-3
    feats_grad_path = big[:, :, 3:22].detach().requires_grad_()
    grouped_projection(feats_grad_path, weight.detach(), None).backward(dy.half())
    assert rel(feats_grad_path.grad, f64.grad) < 2e-3


def placement_case(dtype=torch.float32):
    b, n, d, out_dim, seq = 2, 16, 6, 19, 9
    feats, weight, bias = make_inputs(b, n, d, out_dim, True, True, dtype)
    # image tokens at positions 2..5 of sequence 0 and 4..7 of sequence 1 (the 2nd one at the end)
    rows = torch.tensor([2, 3, 4, 5, seq + 4, seq + 5, seq + 6, seq + 7], device=DEVICE)
    text = torch.randn(b * seq, out_dim, dtype=dtype, device=DEVICE)
    return feats, weight, bias, text, rows


def test_placement_writes_exactly_the_given_rows():
    feats, weight, bias, text, rows = placement_case()
    buffer = text.clone()
    buffer[rows] = float("nan")  # poisoned: each of these rows must be overwritten
    untouched = torch.ones(len(buffer), dtype=torch.bool, device=DEVICE)
    untouched[rows] = False
    returned = grouped_projection(feats, weight, bias, out=buffer, row_index=rows)
    assert returned.data_ptr() == buffer.data_ptr()  # in place, no concatenated copy
    assert torch.equal(buffer[untouched], text[untouched])  # bit for bit
    assert not torch.isnan(buffer).any()
    f64, w64, b64 = float64_twins(feats, weight, bias)
    projected = (explicit_groups(f64, "sequence", True) @ w64.T + b64).reshape(-1, weight.shape[0])
    assert rel(buffer[rows], projected) < 1e-5


def test_placement_gradients_flow_from_the_rows_of_out():
    feats, weight, bias, text, rows = placement_case()
    text = text.requires_grad_()
    placed = grouped_projection(feats, weight, bias, out=text.clone(), row_index=rows)
    f64, w64, b64, t64 = float64_twins(feats, weight, bias, text)
    ref = grouped_projection_reference(f64, w64, b64, out=t64.clone(), row_index=rows)
    assert rel(placed, ref) < 1e-5
    dy = torch.randn_like(ref)
    placed.backward(dy.float())
    ref.backward(dy)
    for got, want in ((feats.grad, f64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad), (text.grad, t64.grad)):
        assert rel(got, want) < 1e-5
    assert bool((text.grad[rows] == 0).all())  # overwritten rows pass no gradient to the text


@pytest.mark.parametrize("layout", ["sequence", "spatial"])
def test_custom_ops_pass_opcheck(layout):
    """torch.library's checks for every op: schema, fake tensors (shapes, dtypes and strides),
    autograd registration, and AOT dispatch with static and dynamic shapes."""
    feats, weight, bias = (t.detach() for t in make_inputs(2, 16, 5, 7, True, True, torch.float32))
    ops = torch.ops.pefomed
    torch.library.opcheck(ops.grouped_projection.default, (feats, weight, bias, 4, layout, True))
    torch.library.opcheck(
        ops.grouped_projection.default, (feats.requires_grad_(), weight.requires_grad_(), None, 4, layout, True)
    )
    feats, weight = feats.detach(), weight.detach()
    rows = torch.tensor([0, 2, 4, 6, 9, 11, 13, 15], device=DEVICE)
    out = torch.randn(17, 7, device=DEVICE)
    torch.library.opcheck(ops.grouped_projection_place_.default, (feats, weight, bias, out, rows, 4, layout, True))
    dy = torch.randn(2, 4, 7, device=DEVICE)
    for needs in ((True, True, True), (False, True, False), (True, False, False)):
        torch.library.opcheck(
            ops.grouped_projection_backward.default, (dy, feats, weight, None, 4, layout, True, *needs, torch.float32)
        )
    d_out = torch.randn(17, 7, device=DEVICE)
    torch.library.opcheck(
        ops.grouped_projection_backward.default,
        (d_out, feats, weight, rows, 4, layout, True, True, True, True, torch.float32),
    )


def test_compiles_fullgraph_with_gradients():
    feats, weight, bias, text, rows = placement_case()
    # Random upstream gradients for both outputs (a plain sum() would send 1 to every element).
    g_plain = torch.randn(feats.shape[0], 4, weight.shape[0], device=DEVICE)
    g_placed = torch.randn(text.shape, device=DEVICE)

    def step(feats, weight, bias, text):
        plain = grouped_projection(feats, weight, bias, layout="spatial")
        placed = grouped_projection(feats, weight, bias, out=text * 1.0, row_index=rows)
        return (plain * g_plain).sum() + (placed * g_placed).sum()

    text = text.requires_grad_()
    # aot_eager: dynamo + AOT autograd + functionalization of the in-place op, as inductor sees
    # them, without inductor's C++ build (40 s on these shared CPUs).
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(feats, weight, bias, text)
    loss.backward()
    f64, w64, b64, t64 = float64_twins(feats, weight, bias, text)
    plain = grouped_projection_reference(f64, w64, b64, layout="spatial")
    placed = grouped_projection_reference(f64, w64, b64, out=t64 * 1.0, row_index=rows)
    ref = (plain * g_plain.double()).sum() + (placed * g_placed.double()).sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5 * abs(ref.item())
    for got, want in ((feats.grad, f64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad), (text.grad, t64.grad)):
        assert rel(got, want) < 1e-5


def test_bad_inputs_are_clear():
    def t(*shape, dtype=torch.float32):
        return torch.randn(*shape, dtype=dtype, device=DEVICE)

    def rows(*values):
        return torch.tensor(values, device=DEVICE)

    with pytest.raises(ValueError, match="cannot be grouped by 4"):
        grouped_projection(t(1, 8, 4), t(3, 16), None)  # 7 tokens after CLS
    with pytest.raises(ValueError, match="even square patch grid"):
        grouped_projection(t(1, 13, 4), t(3, 16), None, layout="spatial")  # 12 tokens
    with pytest.raises(ValueError, match=r"weight must be \[out_dim, group\*D\] = \[out_dim, 16\]"):
        grouped_projection(t(1, 9, 4), t(3, 12), None)
    with pytest.raises(ValueError, match=r"bias has shape \[4\], expected \[3\]"):
        grouped_projection(t(1, 9, 4), t(3, 16), t(4))
    with pytest.raises(ValueError, match="layout 'grid'"):
        grouped_projection(t(1, 9, 4), t(3, 16), None, layout="grid")
    with pytest.raises(ValueError, match="go together"):
        grouped_projection(t(1, 9, 4), t(3, 16), None, out=t(5, 3))
    with pytest.raises(ValueError, match="row_index must be a 1-D int64/int32 tensor of 2 row numbers"):
        grouped_projection(t(1, 9, 4), t(3, 16), None, out=t(5, 3), row_index=rows(1))
    with pytest.raises(ValueError, match=r"out must be \[rows, 3\]"):
        grouped_projection(t(1, 9, 4), t(3, 16), None, out=t(5, 4), row_index=rows(1, 2))
    if DEVICE == "cpu":  # checked on the host for CPU indices; on the GPU the kernel masks them instead
        with pytest.raises(ValueError, match=r"outside \[0, 5\)"):
            grouped_projection(t(1, 9, 4), t(3, 16), None, out=t(5, 3), row_index=rows(1, 5))
    with pytest.raises(TypeError, match="float64"):
        grouped_projection(t(1, 9, 4, dtype=torch.float64), t(3, 16), None)
    if DEVICE == "cuda":
        with pytest.raises(ValueError, match="different devices"):
            grouped_projection(t(1, 9, 4), torch.randn(3, 16), None)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["sequence", "spatial"])
def test_bf16_eva_sized_on_gpu(layout):
    feats = torch.randn(3, 1025, 1408, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = (torch.randn(4096, 5632, device="cuda") / 75).to(torch.bfloat16).requires_grad_()
    bias = torch.randn(4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = grouped_projection(feats, weight, bias, layout=layout)
    f64, w64, b64 = float64_twins(feats, weight, bias)
    ref = grouped_projection_reference(f64, w64, b64, layout=layout)
    assert rel(y, ref) < 1e-2
    dy = torch.randn_like(ref)
    y.backward(dy.bfloat16())
    ref.backward(dy)
    for got, want in ((feats.grad, f64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad)):
        assert rel(got, want) < 1e-2
    assert bool((feats.grad[:, 0] == 0).all())


@pytest.mark.gpu
def test_bf16_placement_on_gpu():
    feats = torch.randn(2, 1025, 1408, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(4096, 5632, device="cuda") / 75).to(torch.bfloat16)
    seq = 300
    rows = (torch.arange(2, device="cuda")[:, None] * seq + 7 + torch.arange(256, device="cuda")).reshape(-1)
    buffer = torch.full((2 * seq, 4096), float("nan"), device="cuda", dtype=torch.bfloat16)
    grouped_projection(feats, weight, None, out=buffer, row_index=rows)
    ref = grouped_projection_reference(feats.double(), weight.double(), None).reshape(-1, 4096)
    assert rel(buffer[rows], ref) < 1e-2
    untouched = torch.ones(2 * seq, dtype=torch.bool, device="cuda")
    untouched[rows] = False
    assert bool(torch.isnan(buffer[untouched]).all())


# --- bf16 with fp32 master weights, strides, sizes, offsets -------------------------------------


class _CastLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.casts = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == "aten::_to_copy" and isinstance(args[0], torch.Tensor):
            self.casts.append((tuple(args[0].shape), args[0].dtype, (kwargs or {}).get("dtype")))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("layout", ["sequence", "spatial"])
@pytest.mark.parametrize("placed", [False, True])
def test_bf16_features_with_fp32_master_weight(layout, placed):
    """The engine's case: bf16 features, fp32 trainable weight and bias. bf16 dots (checked in
    float64 with the GPU's bf16 semantics), the weight cast to bf16 once per step (the forward's
    cast serves d_feats too), dW and dbias in fp32."""
    feats, weight, bias = make_inputs(2, 36, 24, 40, True, True, torch.bfloat16, weight_dtype=torch.float32)
    f64, w64, b64 = float64_twins(feats, weight, bias)
    log = _CastLog()
    with log:
        if placed:
            rows = torch.arange(18, device=DEVICE) * 2 + 1
            y = grouped_projection(feats, weight, bias, layout=layout, out=torch.zeros(40, 40, dtype=torch.bfloat16, device=DEVICE),
                                   row_index=rows)  # fmt: skip
            ref = grouped_projection_reference(
                f64, w64, b64, layout=layout, out=torch.zeros(40, 40, dtype=torch.float64), row_index=rows
            )
        else:
            y = grouped_projection(feats, weight, bias, layout=layout)
            ref = grouped_projection_reference(f64, w64, b64, layout=layout)
        dy = torch.randn_like(ref)
        y.backward(dy.bfloat16())
    ref.backward(dy)
    assert y.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32
    tol = TOLERANCE[torch.bfloat16]
    assert rel(y, ref) < tol
    for got, want in ((feats.grad, f64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad)):
        assert rel(got, want) < tol
    weight_casts = [c for c in log.casts if c[0] == tuple(weight.shape) and c[2] == torch.bfloat16]
    assert len(weight_casts) == 1, log.casts


# Each argument's dimensions -> every non-contiguous layout that applies to it.
PROJ_ARGS = {"feats": 3, "weight": 2, "bias": 1, "out": 2, "row_index": 1}
PROJ_LAYOUTS = [
    (name, layout) for name, ndim in PROJ_ARGS.items() for layout in layouts_for((1,) * ndim) if layout != "contiguous"
]


@pytest.mark.parametrize("name, layout", PROJ_LAYOUTS)
def test_every_argument_in_every_layout(name, layout):
    """Each tensor argument (and out, written in place) in each memory layout, with the same values:
    the output and every gradient match float64, and nothing outside out's view is written."""
    b, n, d, out_dim, seq = 2, 16, 6, 19, 9
    feats, weight, bias = make_inputs(b, n, d, out_dim, True, True, torch.float32)
    rows = torch.tensor([2, 3, 4, 5, seq + 4, seq + 5, seq + 6, seq + 7], device=DEVICE)
    text = torch.randn(b * seq, out_dim, device=DEVICE)
    tensors = {"feats": feats, "weight": weight, "bias": bias, "row_index": rows}
    if name == "out":
        out = guarded_empty(text.shape, torch.float32, layout, device=DEVICE)
        out.copy_(text)
    else:
        out = text.clone()
        tensors[name] = as_layout(tensors[name], layout)
    feats, weight, bias, rows = (tensors[k] for k in ("feats", "weight", "bias", "row_index"))
    placed = grouped_projection(feats, weight, bias, layout="sequence", out=out, row_index=rows)
    assert placed.data_ptr() == out.data_ptr()
    f64, w64, b64 = float64_twins(feats, weight, bias)
    ref = grouped_projection_reference(f64, w64, b64, out=text.double(), row_index=rows)
    assert rel(placed, ref) < 1e-5
    dy = torch.randn_like(ref)
    placed.backward(dy.float())
    ref.backward(dy)
    for got, want in ((feats.grad, f64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad)):
        assert rel(got, want) < 1e-5
    if name == "out":
        assert_gaps_untouched(out)


@pytest.mark.parametrize(
    "b, d, out_dim, layout",
    [(1, 1, 17, "sequence"), (3, 17, 1, "spatial"), (2, 33, 67, "sequence"), (1, 3, 129, "spatial")],
)
def test_sizes_that_fit_no_block(b, d, out_dim, layout):
    """Channels, outputs and rows that are not multiples of any tile (1 included)."""
    n = 16 if layout == "spatial" else 12
    feats, weight, bias = make_inputs(b, n, d, out_dim, True, True, torch.float32)
    y = grouped_projection(feats, weight, bias, layout=layout)
    f64, w64, b64 = float64_twins(feats, weight, bias)
    ref = grouped_projection_reference(f64, w64, b64, layout=layout)
    assert rel(y, ref) < 1e-5
    dy = torch.randn_like(ref)
    y.backward(dy.float())
    ref.backward(dy)
    for got, want in ((feats.grad, f64.grad), (weight.grad, w64.grad), (bias.grad, b64.grad)):
        assert rel(got, want) < 1e-5
    assert ODD_SIZES  # the sizes above are drawn from tests/kernels/strided.py's ODD_SIZES


def _huge_stride(fill: torch.Tensor) -> torch.Tensor:
    """`fill`'s values in a view whose dim-0 stride is 2**30 + 1 elements: its third entry lies
    beyond 2**31, where a 32-bit index product wraps into the untouched (zero) start of the 8 GB
    virtual buffer. Only the entries written are ever touched."""
    big = torch.empty(2**32, dtype=fill.dtype)
    strides = (2**30 + 1, *torch.empty(fill.shape[1:]).stride())
    view = torch.as_strided(big, fill.shape, strides, 2**31 - 2**20)
    view.copy_(fill)
    return view


@pytest.mark.skipif(DEVICE == "cuda", reason="the 8 GB virtual buffer is a CPU (interpreter) trick")
def test_largest_offsets_pass_int32():
    """feats, out and dY with offsets beyond 2**31 elements: every kernel indexes in 64 bits."""
    feats, weight, bias = (t.detach() for t in make_inputs(3, 4, 5, 7, True, True, torch.float16))
    big_feats = _huge_stride(feats)  # 3 images of 1 + 4 tokens: one projected row each
    rows = torch.tensor([0, 1, 2])
    out = _huge_stride(torch.zeros(3, 7, dtype=torch.float16))
    placed = grouped_projection(big_feats, weight, bias, out=out, row_index=rows)
    ref = grouped_projection_reference(feats.double(), weight.double(), bias.double())
    assert rel(placed, ref.reshape(3, 7)) < TOLERANCE[torch.float16]
    dy = torch.randn(3, 7, dtype=torch.float16)
    d_feats, d_weight, d_bias = vp_mod.projection_backward(
        _huge_stride(dy), big_feats, weight, rows, 4, "sequence", True, True, True, True
    )
    f64, w64, b64 = float64_twins(feats, weight, bias)
    grouped_projection_reference(f64, w64, b64).reshape(3, 7).backward(dy.double())
    for got, want in ((d_feats, f64.grad), (d_weight, w64.grad), (d_bias, b64.grad)):
        assert rel(got, want) < TOLERANCE[torch.float16]


def test_connector_project_into_through_the_engine_ops():
    """models.connectors.GroupedProjection with engine.ops.kernel_ops("triton"): project_into places
    the tokens at the image placeholders as the plain PyTorch connector does, gradients included."""
    from pefomed.engine.ops import kernel_ops
    from pefomed.models.connectors import GroupedProjection

    torch.manual_seed(0)
    connectors = {
        kernels: GroupedProjection(6, 19, projection=kernel_ops(kernels, DEVICE).grouped_projection).to(DEVICE)
        for kernels in ("torch", "triton")
    }
    connectors["triton"].load_state_dict(connectors["torch"].state_dict())
    feats = torch.randn(2, 17, 6, device=DEVICE)
    embeds = torch.randn(2, 9, 19, device=DEVICE)
    mask = torch.zeros(2, 9, dtype=torch.bool, device=DEVICE)
    mask[0, 2:6] = True
    mask[1, 5:9] = True
    outs = {}
    for kernels, module in connectors.items():
        f = feats.clone().requires_grad_()
        out = module.project_into(f, embeds, mask)
        dy = torch.ones_like(out).cumsum(-1)
        out.backward(dy)
        outs[kernels] = (out.detach(), f.grad, module.llama_proj.weight.grad, module.llama_proj.bias.grad)
    for got, want in zip(outs["triton"], outs["torch"]):
        assert rel(got, want.double()) < 1e-5
    assert torch.equal(outs["triton"][0][~mask], embeds[~mask])  # text positions untouched
