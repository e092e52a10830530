"""FSDP2 in torchtitan's order: meta build, `fully_shard`, `to_empty`, each rank reads its rows.

A pretrained LLM folder (two safetensors shards and an index, HF names) and a LAVIS-layout ViT file
are written by the test; the sharded model of 1 and 2 ranks, gathered, must equal `build_model`'s
tensor for tensor (frozen weights from the files, fresh adapters and projection drawn as
`build_model` draws them, a stage-1 projection and adapter loaded over them), with each rank
holding about 1/world of the bytes. With a model whose bf16 weights dominate memory, each rank's
peak resident memory while loading (VmHWM, reset first) stays well below one full copy of the state
dict, where a whole-model build on one process goes above it.

QLoRA (NF4) loads meta-first too: each rank's NF4 shard (packed codes, absmax, nested state) is
the one `torch.chunk` cuts from the whole build's weight, and the one FSDP2 gives when it shards
the whole build, bit for bit: for the pieces alone over many shapes and rank counts
(`nf4_shard`), and for whole models from files and from rank 0's random init, LLaMA (GQA) and
Idefics2 (Mistral text model). A few QLoRA training steps from files give the loss curve of the
whole-build FSDP2 run and of one process; each rank's peak memory while loading stays well below
one dense copy of the model.

This file is also the torchrun worker: `python -m torch.distributed.run ... this.py MODE
CONFIG_JSON OUT`, CONFIG_JSON being the overrides of configs/demo.yaml or
`{"config": path, "overrides": [...]}`.
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
STAGE1 = ROOT / "configs/med_idefics_stage1_roco.yaml"


def slow_distributed(test):
    """Starts torchrun subprocesses."""
    return pytest.mark.slow(pytest.mark.distributed(test))


def write_llm_folder(folder: Path, overrides: dict, dtype: torch.dtype, shards: int = 2) -> int:
    """A HF-style LLaMA folder with random weights: config.json, `shards` safetensors files and
    their index. Returns the bytes of its tensors."""
    from pefomed.engine.build import with_overrides
    from pefomed.models import llama

    config = with_overrides(llama.CONFIGS["tiny"], overrides)
    torch.manual_seed(123)
    model = llama.LlamaForCausalLM(config).to(dtype)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({**config.to_hf_dict(), "torch_dtype": str(dtype)[6:]}))
    return write_shards(folder, model.state_dict(), shards)


def write_shards(folder: Path, state: dict, shards: int) -> int:
    """`state` as `shards` safetensors files and their index, as Hugging Face writes a folder."""
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in state.items()}
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


def load(overrides: list[str] | dict):
    from pefomed.engine.config import load_config

    if isinstance(overrides, dict):
        return load_config(overrides["config"], overrides["overrides"])
    return load_config(ROOT / "configs/demo.yaml", overrides)


def torchrun(nproc: int, mode: str, overrides: list[str] | dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", __file__,
           mode, json.dumps(overrides), str(out)]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "process group is destroyed but still referenced" not in result.stderr  # see shutdown_distributed


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


@slow_distributed
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


@slow_distributed
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


@slow_distributed
def test_qlora_under_fsdp2_shards_the_nf4_weights_and_trains_the_same_curve(tmp_path):
    """A random-init QLoRA model (the demo) under FSDP2: rank 0 quantizes it whole and each rank keeps
    its NF4 rows, about half of the packed NF4 bytes; 2 ranks train the curve of one process."""
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
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-12000:]
    curves = [[json.loads(line)["loss"] for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
              for out in ("single", "fsdp2")]  # fmt: skip
    assert len(curves[1]) == 4 and max(abs(a - b) for a, b in zip(*curves)) < 1e-5, curves
    torchrun(2, "nf4", [*common, "train.device=cpu"], tmp_path / "bytes")
    results = [json.loads((tmp_path / "bytes" / f"rank{r}.json").read_text()) for r in (0, 1)]
    total = results[0]["nf4_total_bytes"]
    assert total > 0 and all(r["nf4_weights"] == results[0]["nf4_weights"] > 10 for r in results)
    for r in results:
        assert abs(r["nf4_local_bytes"] - total / 2) < 0.05 * total, (r, total)


# ---------------------------------------------------------------- QLoRA and Idefics2 meta-first

# (shape, ranks, whether the shards keep double quantization): FSDP2's shards of a double-quantized
# weight keep it only when every shard starts on a 256-block boundary (64 * 256 values).
NF4_CASES = [
    ((256, 256), 2, True),  # 16384 values a rank
    ((1024, 96), 2, True),  # 3 nested blocks a rank
    ((344, 128), 2, False),  # LLaMA-tiny's MLP: 22016 values a rank, plain fp32 absmax
    ((256, 128), 4, False),  # starts at 8192, 16384, 24576: one on a boundary, so the piece alone would keep it
    ((48, 96), 3, False),
    ((7, 9), 1, True),  # one rank: a tail block and an odd number of values
]


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize(("shape", "world", "keeps_nesting"), NF4_CASES)
def test_nf4_shard_is_the_chunk_of_the_whole_quantized_weight(monkeypatch, shape, world, keeps_nesting, dtype,
                                                              double_quant):  # fmt: skip
    """Each rank quantizes only its rows, in blocks of rows, and double-quantizes the all-gathered
    absmax: its shard equals `torch.chunk(to_nf4(whole weight), world)[rank]`, every inner tensor."""
    from pefomed.engine import sharded_loading
    from pefomed.kernels.nf4 import to_nf4

    monkeypatch.setattr(sharded_loading, "NF4_BLOCK_BYTES", 2048)  # several blocks of rows per rank
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(shape, generator=g) * (torch.rand(shape[0], 1, generator=g) * 4)  # the fp32 file
    dense.view(-1)[64:128] = 0  # an all-zero quantization block
    layout = to_nf4(torch.empty(shape, dtype=dtype, device="meta"), double_quant=double_quant)
    want = torch.chunk(to_nf4(dense.to(dtype), double_quant=double_quant), world, dim=0)
    ranges = [sharded_loading.row_range(shape[0], world, r) for r in range(world)]
    own = [sharded_loading.quantize_rows(sharded_loading.whole(dense), layout, a, b, torch.device("cpu"))
           for a, b in ranges]  # fmt: skip
    absmax = torch.cat([o.absmax for o in own]) if double_quant else None  # what all_gather gives
    for rank, ((start, _), rows) in enumerate(zip(ranges, own)):
        got = sharded_loading.nf4_shard(layout, rows, absmax, start, world, rank)
        names, meta = got.__tensor_flatten__()
        assert (names, meta, got.shape, got.dtype) == (*want[rank].__tensor_flatten__(), want[rank].shape, dtype)
        assert got.nested == (double_quant and keeps_nesting)
        for name in names:
            assert torch.equal(getattr(got, name), getattr(want[rank], name)), (rank, name)


def test_nf4_weights_that_fsdp2_cannot_cut_evenly_are_refused_naming_the_fix():
    from pefomed.engine.config import ConfigError
    from pefomed.engine.sharded_loading import check_nf4_sharding
    from pefomed.kernels.nf4 import to_nf4

    def meta(*shape):
        return to_nf4(torch.empty(shape, device="meta"))

    check_nf4_sharding({"w": meta(344, 128)}, 2)
    with pytest.raises(ConfigError, match=r"mlp.gate_proj.weight \[344, 128\] cannot be cut into 3 equal shards.*"
                                          r"divides 344.*train.strategy=ddp"):  # fmt: skip
        check_nf4_sharding({"w": meta(6, 64), "mlp.gate_proj.weight": meta(344, 128)}, 3)
    with pytest.raises(ConfigError, match=r"shards of a multiple of 64 values"):
        check_nf4_sharding({"w": meta(6, 96)}, 2)  # 3 rows of 96 a rank: 288 values


QLORA_LLM = {"vocab_size": 512, "hidden_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2}  # fmt: skip  # GQA; 256-wide: some shards on nested boundaries, some not


def idefics2_hf_config(c):
    """transformers' Idefics2Config for our `Idefics2Config` c (as its config.json says it)."""
    import transformers

    return transformers.Idefics2Config(
        vision_config=dict(hidden_size=c.vision.hidden_size, intermediate_size=c.vision.intermediate_size,
                           num_hidden_layers=c.vision.num_layers, num_attention_heads=c.vision.num_heads,
                           patch_size=c.vision.patch_size, image_size=c.vision.image_size),
        perceiver_config=dict(hidden_size=c.perceiver.hidden_size, resampler_n_latents=c.perceiver.n_latents,
                              resampler_depth=c.perceiver.depth, resampler_n_heads=c.perceiver.n_heads,
                              resampler_head_dim=c.perceiver.head_dim,
                              num_key_value_heads=c.perceiver.num_key_value_heads, rms_norm_eps=c.perceiver.rms_norm_eps),
        text_config=dict(model_type="mistral", vocab_size=c.text.vocab_size, hidden_size=c.text.hidden_size,
                         intermediate_size=c.text.intermediate_size, num_hidden_layers=c.text.num_hidden_layers,
                         num_attention_heads=c.text.num_attention_heads, num_key_value_heads=c.text.num_key_value_heads,
                         rms_norm_eps=c.text.rms_norm_eps, sliding_window=c.text.sliding_window, pad_token_id=0,
                         max_position_embeddings=c.text.max_position_embeddings),
        image_token_id=c.image_token_id,
    )  # fmt: skip


def write_idefics2_folder(folder: Path) -> None:
    """A transformers-format Idefics2 folder (tiny-idefics2, random fp32 weights, two shards)."""
    from pefomed.models import idefics2

    config = idefics2.CONFIGS["tiny-idefics2"]
    folder.mkdir(parents=True)
    idefics2_hf_config(config).save_pretrained(str(folder))
    torch.manual_seed(321)
    write_shards(folder, idefics2.Idefics2ForConditionalGeneration(config).state_dict(), 2)


@pytest.fixture(scope="module")
def qlora_folders(tmp_path_factory) -> dict[str, Path]:
    """A LLaMA folder, an Idefics2 folder and a stage-1 adapter for it (non-zero B, so that every
    adapter gradient is non-zero)."""
    from safetensors.torch import save_file

    from pefomed.engine.build import build_model
    from pefomed.engine.lora import adapter_state_dict, peft_adapter_config, write_adapter_config

    tmp = tmp_path_factory.mktemp("qlora")
    folders = {"llama": tmp / "llama", "idefics2": tmp / "idefics2", "idefics2_adapter": tmp / "stage1"}
    write_llm_folder(folders["llama"], QLORA_LLM, torch.float32)
    write_idefics2_folder(folders["idefics2"])
    cfg = load(qlora_config("idefics2", {**folders, "idefics2_adapter": None}, tmp))
    stage1 = build_model(cfg, "cpu")
    with torch.no_grad():
        for p in stage1.parameters():
            if p.requires_grad:
                p.normal_(std=0.05)
    adapter = adapter_state_dict(stage1.llm)
    folders["idefics2_adapter"].mkdir()
    save_file(adapter, str(folders["idefics2_adapter"] / "adapter_model.safetensors"))
    write_adapter_config(folders["idefics2_adapter"] / "adapter_config.json",
                         peft_adapter_config(cfg.lora, str(folders["idefics2"]), adapter))  # fmt: skip
    return folders


def qlora_config(case: str, folders: dict[str, Path], tmp: Path) -> list[str] | dict:
    if case.startswith("idefics2"):  # Med-Idefics' QLoRA recipe at tiny size, from a transformers folder
        source = ["model.llm=tiny-idefics2", "model.random_init=true"] if case == "idefics2_random" else [
            f"model.llm={folders['idefics2']}", "model.random_init=false"]  # fmt: skip
        adapter = folders.get("idefics2_adapter") if case == "idefics2" else None
        return {"config": str(STAGE1), "overrides": [
            *source, "model.image_size=64", "model.dtype=float32", "model.kernels=torch",
            f"model.adapter_checkpoint={adapter or 'null'}",
            "lora.dropout=0.0", "train.device=cpu", "train.seed=7",
            f"data.train=[{{kind: synthetic, path: {tmp}, split: train}}]",
        ]}  # fmt: skip
    overrides = ["model.quantize_llm=nf4", "train.device=cpu", "lora.dropout=0.0", "train.seed=7"]
    if case == "llama_random":  # rank 0 builds and quantizes, the others receive the codes
        return [
            *overrides,
            "model.dtype=bfloat16",
            "model.llm_overrides={hidden_size: 256, num_key_value_heads: 2, num_hidden_layers: 2}",
        ]
    return [*overrides, f"model.llm={folders['llama']}", "model.random_init=false", "model.dtype=bfloat16"]


@slow_distributed
@pytest.mark.parametrize("case", ["llama_files", "llama_random", "idefics2", "idefics2_random"])
def test_qlora_meta_first_shards_are_the_whole_builds_nf4_shards(qlora_folders, tmp_path, case):
    """On each of 2 ranks, every NF4 shard (packed codes, absmax, nested state) is the one
    `torch.chunk` cuts from the whole build's weight and the one FSDP2 gives when it shards the
    whole build; every other parameter holds the whole build's rows. Idefics2 (SigLIP, connector,
    Mistral, head from one folder, and a stage-1 adapter over the fresh ones): the loss and the
    adapters' gradients of one step too."""
    torchrun(2, "nf4_shards", qlora_config(case, qlora_folders, tmp_path), tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in results:
        assert not r["differ"], r["differ"]
        assert r["nf4"] == 14 and r["dense"] > 20, r  # 2 layers of 7 NF4 linears
        if case.startswith("llama"):  # 256 wide: q/k/v/o on nested boundaries, the MLP's shards plain
            assert (r["nested"], r["plain"]) == (8, 6), r
    if case.startswith("idefics2"):
        print({k: [r[k] for r in results] for k in ("loss", "whole_loss", "grad_err", "grads_checked", "zero_grads")})
        for r in results:
            assert abs(r["loss"] - r["whole_loss"]) <= 1e-6 * abs(r["whole_loss"]), r
            assert r["grad_err"] < 1e-6 and r["grads_checked"] > 20, r
            # Fresh adapters (B = 0) give A no gradient; the stage-1 adapter gives every one a gradient.
            assert r["zero_grads"] == (0 if case == "idefics2" else r["grads_checked"] // 2), r


@slow_distributed
def test_qlora_from_files_trains_the_whole_builds_curve(qlora_folders, tmp_path):
    """fp32 QLoRA from a model folder, 4 steps: FSDP2 built meta-first on 2 ranks, FSDP2 built whole
    on every rank and then sharded, and one process (2 micro-batches) give one loss curve. The two
    FSDP2 runs hold the same shards and run the same ops: their curves are identical."""
    from pefomed.engine.config import load_config
    from pefomed.engine.data.sources import ensure_synthetic, load_run_tokenizer

    data = tmp_path / "data"
    common = [f"data.train=[{{kind: synthetic, path: {data}, split: train}}]", f"model.tokenizer={data}/tokenizer",
              "data.synthetic_train=32", "data.synthetic_test=4", "train.max_steps=4", "train.progress_bar=false",
              "train.save_every=0", "lora.dropout=0.0", "model.dtype=float32", "model.quantize_llm=nf4",
              "train.micro_batch_size=2", f"model.llm={qlora_folders['llama']}", "model.random_init=false",
              "train.device=cpu"]  # fmt: skip
    cfg = load_config(ROOT / "configs/demo.yaml", common)
    ensure_synthetic(cfg.data.train[0], cfg)
    assert len(load_run_tokenizer(cfg)) <= QLORA_LLM["vocab_size"]
    single = [sys.executable, str(ROOT / "train/run.py"), "--config", str(ROOT / "configs/demo.yaml"), *common,
              f"train.output_dir={tmp_path / 'single'}", "train.grad_accum=2"]  # fmt: skip
    result = subprocess.run(single, env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-12000:]
    for mode in ("train", "train_whole"):
        torchrun(2, mode, [*common, f"train.output_dir={tmp_path / mode}", "train.grad_accum=1"], tmp_path / mode)
    curves = {
        out: [json.loads(line)["loss"] for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]
        for out in ("single", "train", "train_whole")
    }
    print(curves)
    assert all(len(c) == 4 for c in curves.values())
    assert curves["train"] == curves["train_whole"], curves
    assert max(abs(a - b) for a, b in zip(curves["train"], curves["single"])) < 1e-5, curves
    # The run freed its process group's gloo threads before returning, so none can free a work
    # while the interpreter finalizes (which aborts the process).
    for mode in ("train", "train_whole"):
        for rank in (0, 1):
            assert json.loads((tmp_path / mode / f"threads_rank{rank}.json").read_text()) == {"gloo_threads": 0}


@slow_distributed
def test_each_qlora_rank_peaks_well_below_one_dense_copy(tmp_path):
    """QLoRA from an fp32 folder of a bf16 model, on 2 ranks: each rank's peak resident memory while
    loading stays well below one dense copy of the model (its bf16 state dict)."""
    overrides = {"vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 6,
                 "num_attention_heads": 16, "num_key_value_heads": 16}  # fmt: skip
    write_llm_folder(tmp_path / "big", overrides, torch.float32)
    args = [*base_overrides(tmp_path, tmp_path / "big", None), "model.dtype=bfloat16", "model.quantize_llm=nf4"]
    torchrun(2, "memory", args, tmp_path / "sharded")
    torchrun(1, "memory_whole", args, tmp_path / "whole")
    sharded = [json.loads((tmp_path / "sharded" / f"rank{r}.json").read_text()) for r in (0, 1)]
    whole = json.loads((tmp_path / "whole" / "rank0.json").read_text())
    dense = whole["state_dict_bytes"]  # the model with dense bf16 weights (fp32 adapters)
    assert dense > 250 * 2**20 and all(r["state_dict_bytes"] == dense for r in sharded)
    mib = 2**20
    print(f"dense state dict {dense / mib:.0f} MiB; peak while loading: whole QLoRA build {whole['peak_increase'] / mib:.0f} "
          "MiB, " + ", ".join(f"rank {r} {x['peak_increase'] / mib:.0f} MiB" for r, x in enumerate(sharded)))  # fmt: skip
    # The control: the whole build, which quantizes as it loads, still maps the fp32 files and
    # quantizes whole weights (what fsdp2 did on every rank before it loaded QLoRA meta-first).
    assert whole["peak_increase"] > 0.95 * dense, (whole, dense)
    for r in sharded:
        # Its half of the NF4 codes and of the bf16 embeddings and head, plus one block of rows in flight.
        assert r["peak_increase"] < 0.6 * dense, (r, dense)


# ---------------------------------------------------------------- the torchrun worker


def nf4_bytes(t) -> int:
    names, _ = t.__tensor_flatten__()
    return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in names)


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def with_fsdp2(overrides: list[str] | dict) -> list[str] | dict:
    if isinstance(overrides, dict):
        return {**overrides, "overrides": [*overrides["overrides"], "train.strategy=fsdp2"]}
    return [*overrides, "train.strategy=fsdp2"]


def train(overrides: list[str] | dict, whole_build: bool, out: Path) -> None:
    """A training run (`engine.session`); `whole_build`: FSDP2 shards a model built whole on every
    rank, the path fsdp2 took for QLoRA before it loaded meta-first. Records how many gloo threads
    outlive the run: none, or a finished work could be freed during interpreter finalization."""
    from pefomed.engine import distributed, session, sharded_loading

    if whole_build:
        sharded_loading.supports_sharded_loading = lambda cfg: "the test's whole-build control"
    session.train_from_config(load(with_fsdp2(overrides)))
    rank = int(os.environ["RANK"])
    (out / f"threads_rank{rank}.json").write_text(json.dumps({"gloo_threads": distributed.gloo_threads()}))


def nf4_fields(t, with_flags: bool = True) -> tuple:
    """The inner tensors' names and the layout; `with_flags`: also `shares_offset`, which tells a
    piece still viewing its weight's codes (a `torch.chunk` piece) from a shard with its own."""
    names, meta = t.__tensor_flatten__()
    return names, meta if with_flags else meta[:3], tuple(t.shape), t.dtype


def compare_shards(model, env, cfg) -> dict:
    """Each rank's shards of the meta-first `model` against the whole build's, chunked as FSDP2 does
    and as FSDP2 shards it."""
    from pefomed.engine import distributed
    from pefomed.engine.build import DTYPES, build_model
    from pefomed.engine.sharded_loading import row_range
    from pefomed.kernels.nf4 import NF4Tensor

    reference = dict(build_model(cfg, env.device).named_parameters())
    control = build_model(cfg, env.device)
    distributed.fully_shard_model(control, env, DTYPES[cfg.model.dtype])
    fsdp_whole = dict(control.named_parameters())
    result = {"differ": [], "nf4": 0, "nested": 0, "plain": 0, "dense": 0}
    for name, p in model.named_parameters():
        name = name.replace("_checkpoint_wrapped_module.", "")
        local, want = p.to_local(), reference[name]
        if isinstance(local, NF4Tensor):
            chunk = torch.chunk(want, env.world_size, dim=0)[env.rank]
            result["nf4"] += 1
            result["nested" if local.nested else "plain"] += 1
            for other, flags in ((chunk, False), (fsdp_whole[name].to_local(), True)):
                names = nf4_fields(local)[0]
                same = nf4_fields(local, flags) == nf4_fields(other, flags) and all(
                    torch.equal(getattr(local, n), getattr(other, n)) for n in names
                )
                if not same:
                    result["differ"].append(name)
        else:
            a, b = row_range(want.shape[0], env.world_size, env.rank)
            result["dense"] += 1
            if local.dtype != want.dtype or not torch.equal(local, want[a:b]):
                result["differ"].append(name)
    return result


def idefics2_step(model, cfg, env) -> dict:
    """One forward and backward of the same batch on the sharded model and the whole build."""
    from pefomed.engine.build import build_model
    from pefomed.models import idefics2

    config = model.llm.config
    image, fake = config.image_token_id, config.image_token_id - 1
    span = [fake] + [image] * config.image_seq_len + [fake]
    g = torch.Generator().manual_seed(5)
    ids = torch.tensor([[1, 5, 6, *span, 7, 8, 9, 10, 11]] * 2)
    labels = ids.clone()
    labels[:, : 3 + len(span)] = -100
    batch = {"input_ids": ids, "labels": labels, "image_token_mask": ids == image,
             **idefics2.pad_images([[torch.randn(3, 40, 64, generator=g)], [torch.randn(3, 64, 48, generator=g)]])}  # fmt: skip
    whole = build_model(cfg, env.device)
    whole_loss, _ = whole(batch)
    whole_loss.backward()
    loss, _ = model(batch)
    loss.backward()  # FSDP2 sums the ranks' gradients: the same batch on both, so twice the whole build's
    grads = {n: p.grad for n, p in whole.named_parameters() if p.requires_grad}
    errors, zero = [], 0
    for name, p in model.named_parameters():
        if p.requires_grad:
            name = name.replace("_checkpoint_wrapped_module.", "")
            local = p.grad.to_local().double()
            want = torch.chunk(grads[name], env.world_size, dim=0)[env.rank].double() * env.world_size
            errors.append(float((local - want).norm() / want.norm().clamp(min=1e-30)))
            zero += bool(want.norm() == 0)
    return {"loss": loss.item(), "whole_loss": whole_loss.item(), "grad_err": max(errors),
            "grads_checked": len(errors), "zero_grads": zero}  # fmt: skip


def worker(mode: str, overrides: list[str] | dict, out: Path) -> None:
    from pefomed.engine import distributed

    if mode in ("train", "train_whole"):
        return train(overrides, whole_build=mode == "train_whole", out=out)
    cfg = load(with_fsdp2(overrides))
    env = distributed.init_distributed("cpu", "fsdp2")
    with distributed.leaving_together():
        result = measure(mode, cfg, env)  # its models, and their device meshes, die with that frame
        (out / f"rank{env.rank}.json").write_text(json.dumps(result))


def measure(mode: str, cfg, env) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from pefomed.engine.build import build_model
    from pefomed.engine.sharded_loading import build_sharded_model

    result: dict = {}
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
        result["nf4_total_bytes"] = sum(nf4_bytes(p.data) for p in whole.parameters() if isinstance(p.data, NF4Tensor))
    elif mode == "nf4_shards":
        model = build_sharded_model(cfg, env, activation_checkpointing=True)
    else:
        model = build_sharded_model(cfg, env, activation_checkpointing=cfg.train.activation_checkpointing)
    result["peak_increase"] = (rss_kib("VmHWM") - before) * 1024
    if mode == "nf4_shards":
        result.update(compare_shards(model, env, cfg))
        if cfg.model.arch == "idefics2":
            result.update(idefics2_step(model, cfg, env))
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
                k for k in want if k not in full or full[k].dtype != want[k].dtype or not torch.equal(full[k], want[k])
            ]
            differ += [k for k in full if k not in want]
            result.update(equal=not differ, differ=differ[:10], n_tensors=len(want),
                          trainable_checked=len(trainable & set(want)))  # fmt: skip
    return result


if __name__ == "__main__":
    worker(sys.argv[1], json.loads(sys.argv[2]), Path(sys.argv[3]))
