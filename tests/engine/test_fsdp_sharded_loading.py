"""FSDP2 in torchtitan's order: meta build, `fully_shard`, `to_empty`, each rank reads its rows.

A pretrained LLM folder (two safetensors shards and an index, HF names) and a LAVIS-layout ViT file
are written by the test; the sharded model of 1 and 2 ranks, gathered, must equal `build_model`'s
tensor for tensor (frozen weights from the files, fresh adapters and projection drawn as
`build_model` draws them, a stage-1 projection and adapter loaded over them), with each rank
holding about 1/world of the bytes. With a model whose bf16 weights dominate memory, each rank's
peak resident memory while loading (VmHWM, reset first) stays well below one full copy of the state
dict, where a whole-model build on one process goes above it. This file is also the torchrun
worker: `python -m torch.distributed.run ... this.py MODE CONFIG_JSON OUT`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def write_llm_folder(folder: Path, overrides: dict, dtype: torch.dtype, shards: int = 2) -> int:
    """A HF-style LLaMA folder with random weights: config.json, `shards` safetensors files and
    their index. Returns the bytes of its tensors."""
    from safetensors.torch import save_file

    from pefomed.engine.build import with_overrides
    from pefomed.models import llama

    config = with_overrides(llama.CONFIGS["tiny"], overrides)
    torch.manual_seed(123)
    model = llama.LlamaForCausalLM(config).to(dtype)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**config.to_hf_dict(), "torch_dtype": str(dtype)[6:]}))
    keys = list(state)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: state[k] for k in keys[i::shards]}
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return sum(t.numel() * t.element_size() for t in state.values())


def base_overrides(tmp: Path, llm: Path, vision: Path | None) -> list[str]:
    out = [f"model.llm={llm}", "model.random_init=false", "train.device=cpu", "lora.dropout=0.0", "train.seed=7"]
    if vision is not None:
        out += [f"model.vision_checkpoint={vision}", "model.vision_layout=lavis"]
    return out


def load(overrides: list[str]):
    from pefomed.engine.config import load_config

    return load_config(ROOT / "configs/demo.yaml", overrides)


def torchrun(nproc: int, mode: str, overrides: list[str], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           mode, json.dumps(overrides), str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> list[str]:
    """An LLM folder, a LAVIS ViT file, and a stage-1 projection and adapter to start from."""
    from safetensors.torch import save_file

    from pefomed.engine.build import build_model, vision_config
    from pefomed.engine.lora import adapter_state_dict, peft_adapter_config, write_adapter_config
    from pefomed.models import vit

    tmp = tmp_path_factory.mktemp("pretrained")
    write_llm_folder(tmp / "llm", {"vocab_size": 503, "num_hidden_layers": 3}, torch.float32)
    cfg = load([*base_overrides(tmp, tmp / "llm", None), "model.dtype=bfloat16"])
    torch.manual_seed(5)
    tower = vit.VisionTransformer(vision_config(cfg))
    save_file({k: v.contiguous() for k, v in tower.state_dict().items()}, str(tmp / "vit.safetensors"))
    # A stage-1 checkpoint: adapters and projection that differ from any fresh init.
    stage1 = build_model(load([*base_overrides(tmp, tmp / "llm", tmp / "vit.safetensors"), "train.seed=99"]), "cpu")
    with torch.no_grad():
        for p in stage1.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    (tmp / "stage1").mkdir()
    adapter = adapter_state_dict(stage1.llm)
    save_file(adapter, str(tmp / "stage1" / "adapter_model.safetensors"))
    write_adapter_config(
        tmp / "stage1" / "adapter_config.json", peft_adapter_config(cfg.lora, str(tmp / "llm"), adapter)
    )
    save_file(
        {k: v.contiguous() for k, v in stage1.connector.state_dict().items()}, str(tmp / "projection.safetensors")
    )
    return [str(tmp / "llm"), str(tmp / "vit.safetensors"), str(tmp / "stage1"), str(tmp / "projection.safetensors")]


@pytest.mark.parametrize("nproc", [1, 2])
@pytest.mark.parametrize("start", ["fresh", "stage1"])
def test_sharded_load_equals_build_model(pretrained, tmp_path, nproc, start):
    llm, vision, stage1, projection = pretrained
    overrides = [*base_overrides(tmp_path, Path(llm), Path(vision)), "model.dtype=bfloat16",
                 "train.activation_checkpointing=true"]  # fmt: skip
    if start == "stage1":
        overrides += [f"model.adapter_checkpoint={stage1}", f"model.projection_checkpoint={projection}"]
    torchrun(nproc, "equal", overrides, tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(nproc)]
    assert results[0]["equal"], results[0]["differ"]
    assert results[0]["n_tensors"] > 40 and results[0]["trainable_checked"] > 0
    total = results[0]["total_bytes"]
    for r in results:
        # torch.chunk rows: each rank's share is 1/world of every tensor, up to one row of each.
        assert abs(r["local_bytes"] - total / nproc) <= r["slack_bytes"], (r, total)
        assert r["dtensors"] == r["n_params"]  # every parameter is sharded, none replicated


def test_each_rank_peaks_well_below_one_full_copy(tmp_path):
    overrides = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 6,
                 "num_attention_heads": 16, "num_key_value_heads": 16}  # fmt: skip
    # An fp32 file for a bf16 model: the whole-model control must convert, so it holds its copy in
    # anonymous memory (a bf16 file of a bf16 model would be mapped, not copied, and page in lazily).
    write_llm_folder(tmp_path / "big", overrides, torch.float32)
    args = [*base_overrides(tmp_path, tmp_path / "big", None), "model.dtype=bfloat16"]
    torchrun(2, "memory", args, tmp_path / "sharded")
    torchrun(1, "memory_whole", args, tmp_path / "whole")
    sharded = [json.loads((tmp_path / "sharded" / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = json.loads((tmp_path / "whole" / "rank0.json").read_text())
    full = whole["state_dict_bytes"]  # the model's own bytes (bf16 weights, fp32 adapters)
    assert full > 250 * 2**20 and all(r["state_dict_bytes"] == full for r in sharded)
    mib = 2**20
    print(f"state dict {full / mib:.0f} MiB; peak while loading: whole model {whole['peak_increase'] / mib:.0f} MiB, "
          + ", ".join(f"rank {r} {x['peak_increase'] / mib:.0f} MiB" for r, x in enumerate(sharded)))  # fmt: skip
    # The control: building the whole model in one process does hold a full copy.
    assert whole["peak_increase"] > 0.95 * full, (whole, full)
    for r in sharded:
        # Its half of the weights, plus one block of rows in flight.
        assert r["peak_increase"] < 0.7 * full, (r, full)


def test_qlora_under_fsdp2_shards_the_nf4_weights_and_trains_the_same_curve(tmp_path):
    """QLoRA is built whole on every rank and then sharded (NF4 weights are not created on the meta
    device yet): each rank keeps about half of the packed NF4 bytes, and 2 ranks train the curve
    of one process."""
    data = tmp_path / "data"
    common = [f"data.train=[{{kind: synthetic, path: {data}, split: train}}]", f"model.tokenizer={data}/tokenizer",
              "data.synthetic_train=32", "data.synthetic_test=4", "train.max_steps=4", "train.progress_bar=false",
              "lora.dropout=0.0", "model.dtype=float32", "model.quantize_llm=nf4", "train.micro_batch_size=2"]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    script = [str(ROOT / "train/run.py"), "--config", str(ROOT / "configs/demo.yaml"), *common]
    for out, launcher, extra in (
        ("single", [sys.executable], ["train.grad_accum=2"]),
        ("fsdp2", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
         ["train.grad_accum=1", "train.strategy=fsdp2"]),
    ):  # fmt: skip
        cmd = [*launcher, *script, f"train.output_dir={tmp_path / out}", *extra]
        result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    curves = [[json.loads(line)["loss"] for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
              for out in ("single", "fsdp2")]  # fmt: skip
    assert len(curves[1]) == 4 and max(abs(a - b) for a, b in zip(*curves)) < 1e-4
    torchrun(2, "nf4", [*common, "train.device=cpu"], tmp_path / "bytes")
    results = [json.loads((tmp_path / "bytes" / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = results[0]["nf4_total_bytes"]
    assert total > 0 and all(r["nf4_weights"] == results[0]["nf4_weights"] > 10 for r in results)
    for r in results:
        assert abs(r["nf4_local_bytes"] - total / 2) < 0.05 * total, (r, total)


# ---------------------------------------------------------------- the torchrun worker


def nf4_bytes(t) -> int:
    names, _ = t.__tensor_flatten__()
    return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def worker(mode: str, overrides: list[str], out: Path) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from pefomed.engine import distributed
    from pefomed.engine.build import build_model
    from pefomed.engine.sharded_loading import build_sharded_model

    cfg = load([*overrides, "train.strategy=fsdp2"])
    env = distributed.init_distributed("cpu", "fsdp2")
    result: dict = {}
    try:
        meta = build_model(cfg, "meta")  # imports everything the builds import, before the baseline
        result["state_dict_bytes"] = sum(t.numel() * t.element_size() for t in meta.state_dict().values())
        del meta
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        before = rss_kib("VmRSS")
        if mode == "memory_whole":
            model = build_model(cfg, "cpu")
        elif mode == "nf4":
            from pefomed.engine.session import build_parallel_model
            from pefomed.kernels.nf4 import NF4Tensor

            model, _ = build_parallel_model(cfg, env)
            local = [p.to_local() for p in model.parameters() if hasattr(p, "to_local")]
            result["nf4_weights"] = sum(isinstance(t, NF4Tensor) for t in local)
            result["nf4_local_bytes"] = sum(nf4_bytes(t) for t in local if isinstance(t, NF4Tensor))
            whole = build_model(cfg, "cpu")
            result["nf4_total_bytes"] = sum(
                nf4_bytes(p.data) for p in whole.parameters() if isinstance(p.data, NF4Tensor)
            )
        else:
            model = build_sharded_model(cfg, env, activation_checkpointing=cfg.train.activation_checkpointing)
        result["peak_increase"] = (rss_kib("VmHWM") - before) * 1024
        if mode == "equal":
            params = list(model.parameters())
            local = [p.to_local() if hasattr(p, "to_local") else p for p in params]
            result["n_params"] = len(params)
            result["dtensors"] = sum(hasattr(p, "to_local") for p in params)
            result["local_bytes"] = sum(t.numel() * t.element_size() for t in local)
            result["total_bytes"] = sum(p.numel() * p.element_size() for p in params)
            result["slack_bytes"] = sum(p[0].numel() * p.element_size() if p.ndim else 0 for p in params)
            full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
            full = {k.replace("_checkpoint_wrapped_module.", ""): v for k, v in full.items()}
            if env.is_main:
                reference = build_model(cfg, "cpu")
                want = reference.state_dict()
                trainable = {n for n, p in reference.named_parameters() if p.requires_grad}
                differ = [
                    k
                    for k in want
                    if k not in full or full[k].dtype != want[k].dtype or not torch.equal(full[k], want[k])
                ]
                differ += [k for k in full if k not in want]
                result.update(equal=not differ, differ=differ[:10], n_tensors=len(want),
                              trainable_checked=len(trainable & set(want)))  # fmt: skip
        (out / f"rank{env.rank}.json").write_text(json.dumps(result))
    finally:
        distributed.shutdown_distributed()


if __name__ == "__main__":
    worker(sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]))
