"""NF4Tensor under FSDP2 `fully_shard`: 2 gloo ranks on the CPU equal one process.

A small model of NF4 frozen linears with trainable LoRA-style params is sharded per layer, then at
the root. Each rank must hold about half of every weight's packed bytes, and the forward output and
the trainable gradients (two steps, so the second all-gather refills the first one's buffers) must
equal the single-process model's (fp32, relative error < 1e-5). The layers cover a double-quantized
weight whose shards start on 256-block boundaries (nesting kept), one whose shards do not (shards
carry fp32 absmax), a plain one with rows that straddle blocks, and bf16 dequantization.
This file is also the torchrun worker: `python -m torch.distributed.run ... this.py OUT`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pefomed.kernels.nf4 import NF4Tensor, to_nf4

ROOT = Path(__file__).resolve().parents[2]

# (in, out, double_quant): shards of 64 x 256 = one 256-block of 64 -> nesting kept;
# 48 x 128 = 96 blocks -> fp32 absmax shards; 32 x 96: rows straddle 64-blocks.
LAYERS = [(256, 128, True), (128, 96, True), (96, 64, False)]


class Block(nn.Module):
    def __init__(self, d_in: int, d_out: int, double_quant: bool, r: int = 4) -> None:
        super().__init__()
        dense = torch.randn(d_out, d_in) / math.sqrt(d_in)
        self.weight = nn.Parameter(to_nf4(dense, double_quant=double_quant), requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) / math.sqrt(d_in))
        self.lora_B = nn.Parameter(torch.randn(d_out, r) / math.sqrt(r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(F.linear(x, self.weight) + (x @ self.lora_A.t()) @ self.lora_B.t())


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(*spec) for spec in LAYERS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def nbytes(q: NF4Tensor) -> int:
    names, _ = q.__tensor_flatten__()
    return sum(getattr(q, n).numel() * getattr(q, n).element_size() for n in names)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


def steps(model: nn.Module, inputs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    outputs, grads = [], []
    for x in inputs:
        y = model(x)
        y.square().sum().backward()
        outputs.append(y.detach())
        step = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                step[name] = grad.detach().clone()
                p.grad = None
        grads.append(step)
    return outputs, grads


def worker(out: Path) -> None:
    import torch.distributed as dist

    from pefomed.engine.distributed import leaving_together

    dist.init_process_group("gloo")
    with leaving_together():
        report = sharded_report()  # the sharded models, and their device mesh, die with that frame
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(report))


def sharded_report() -> dict:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))  # CPU and gloo, also where there is a GPU
    torch.manual_seed(0)
    model = Model()
    single = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    inputs = [torch.randn(5, LAYERS[0][0], generator=g) for _ in range(2)]
    ref_out, ref_grads = steps(single, inputs)

    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    report: dict = {"weights": {}}
    for name, p in model.named_parameters():
        local = p.to_local()
        if isinstance(local, NF4Tensor):
            full = dict(single.named_parameters())[name]
            report["weights"][name] = {
                "local_bytes": local.packed.numel(),
                "full_bytes": full.packed.numel(),
                "local_total": nbytes(local),
                "full_total": nbytes(full),
                "local_shape": list(local.shape),
                "nested": local.nested,
                "full_nested": full.nested,
                "gathered_equal": bool(torch.equal(p.full_tensor().dequantize(), full.dequantize())),
            }
    out_fsdp, grads_fsdp = steps(model, inputs)
    report["output_err"] = [rel(a, b) for a, b in zip(out_fsdp, ref_out)]
    report["grad_err"] = [{n: rel(s[n], r[n]) for n in r} for s, r in zip(grads_fsdp, ref_grads)]

    # The sharded state dict holds DTensors of NF4 shards; it loads into another sharded model.
    torch.manual_seed(5)
    other = Model()
    for layer in other.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(other, mesh=mesh)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():
        report["state_dict_err"] = rel(other(inputs[0]), model(inputs[0]))

    # FSDP2 mixed precision: the all-gathered NF4Tensor dequantizes to bf16 (the codes stay).
    mixed = copy.deepcopy(single)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in mixed.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(mixed, mesh=mesh, mp_policy=policy)
    y = mixed(inputs[0])
    single_bf16 = copy.deepcopy(single).to(torch.bfloat16)
    report["bf16_dtype"] = str(y.dtype)
    report["bf16_err"] = rel(y, single_bf16(inputs[0].bfloat16()))
    return report


@pytest.mark.distributed
def test_fully_shard_two_ranks_equal_one_process(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)  # the torch path: no Triton in the workers
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, w in report["weights"].items():
            assert w["local_bytes"] * 2 == w["full_bytes"], (name, w)
            assert w["local_total"] < 0.55 * w["full_total"], (name, w)  # + the replicated maps (1.1 kB)
            assert w["gathered_equal"], name
        kept, plain, straddling = (report["weights"][f"layers.{i}.weight"] for i in range(3))
        assert kept["nested"] and kept["full_nested"]
        assert plain["full_nested"] and not plain["nested"]  # shards carry fp32 absmax
        assert kept["local_shape"] == [64, 256] and straddling["local_shape"] == [32, 96]
        assert all(err < 1e-5 for err in report["output_err"]), report["output_err"]
        assert report["state_dict_err"] == 0.0
        for step in report["grad_err"]:
            assert len(step) == 6 and all(err < 1e-5 for err in step.values()), step
        assert report["bf16_dtype"] == "torch.bfloat16" and report["bf16_err"] < 1e-2


def test_uneven_rows_raise_a_clear_error():
    """FSDP2 pads the last shard to the others' size, which a packed NF4 shard cannot be."""

    class Mesh:
        def size(self) -> int:
            return 2

    q = to_nf4(torch.randn(5, 64))
    with pytest.raises(ValueError, match=r"unevenly over 2 ranks.*divisible by the world size"):
        q.fsdp_pre_all_gather(Mesh(), q.shape, q.stride(), None, None)


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
