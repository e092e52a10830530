"""`pefomed export` against transformers and PEFT: the exported folder, loaded by transformers (merged)
or by PEFT on the untouched base (unmerged), gives our model's logits (fp32, relative error < 1e-5).

Bases are tiny LLaMA and Mistral folders written by transformers itself. The checkpoint is written
by hand in the documented format, with a non-zero LoRA B and projection so that merging matters.
For QLoRA the reference is built from bitsandbytes' own NF4 quantization of each frozen weight (its
codes, block statistics and code table, dequantized by the format's definition in float64), then
PEFT's `merge_and_unload`: an implementation of the merge that shares no code with ours.
bitsandbytes 0.50's CPU `dequantize_4bit` itself is not used: for weights whose rows are not a
multiple of 64 long ([64, 96], [32, 96]) it returns values that disagree with its own codes.
"""

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from pefomed.cli import main as cli_main
from pefomed.engine.build import build_model
from pefomed.engine.checkpoint import COMPLETE_MARK
from pefomed.engine.config import load_config, save_config
from pefomed.engine.export import ExportError, ShardWriter, export_checkpoint, export_projection
from pefomed.engine.lora import peft_adapter_config, write_adapter_config

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB = 97
TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def save_hf_base(folder, arch: str):
    """A tiny transformers model (LLaMA or Mistral), saved in several safetensors shards."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    if arch == "mistral":
        config, cls = transformers.MistralConfig(**common, sliding_window=32), transformers.MistralForCausalLM
    else:
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    torch.manual_seed(0)
    cls(config).eval().save_pretrained(folder, max_shard_size="60KB")
    return folder


def make_checkpoint(root, overrides, seed=5):
    """A complete step folder of a run on `overrides`, with trained-looking adapter and projection."""
    cfg = load_config(None, [
        "model.vision=tiny", "model.image_size=32", "model.dtype=float32", "model.kernels=torch",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", f"train.output_dir={root / 'run'}", "train.seed=3",
        *overrides,
    ])  # fmt: skip
    model = build_model(cfg, "cpu").eval()
    generator = torch.Generator().manual_seed(seed)
    adapter = {}
    for name, param in model.llm.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.2
            adapter[f"base_model.model.{name}"] = param.detach().clone()
    for param in model.connector.parameters():
        param.data = torch.randn(param.shape, generator=generator) * 0.05
    step = root / "run" / "checkpoints" / "step_3"
    step.mkdir(parents=True)
    save_file(adapter, str(step / "adapter_model.safetensors"))
    write_adapter_config(step / "adapter_config.json", peft_adapter_config(cfg.lora, cfg.model.llm, adapter))
    save_file({k: v.contiguous() for k, v in model.connector.state_dict().items()}, str(step / "projection.safetensors"))
    save_config(cfg, step / "config.yaml")
    (step / COMPLETE_MARK).write_text("3")
    return cfg, model, step


def bnb_nf4_round_trip(bnb_f, weight: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' NF4 codes and double-quantized block absmax of `weight`, as values (float64 math)."""
    with torch.compiler.set_stance("force_eager"):  # bitsandbytes' CPU fallbacks are compiled otherwise
        packed, state = bnb_f.quantize_4bit(weight.contiguous(), blocksize=64, compress_statistics=True,
                                            quant_type="nf4")
        absmax = bnb_f.dequantize_blockwise(state.absmax, state.state2).double() + float(state.offset)
    packed = packed.reshape(-1)
    codes = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1).long()  # high nibble first
    values = state.code.double()[codes][: weight.numel()]
    blocks = torch.arange(weight.numel()) // 64
    return (values * absmax[blocks]).view(weight.shape).to(weight.dtype)


def ids():
    return torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_merged_and_unmerged_exports_match_our_model(arch, tmp_path):
    base = save_hf_base(tmp_path / "base", arch)
    targets = "[q_proj, v_proj]" if arch == "llama" else "[all-linear]"
    cfg, model, step = make_checkpoint(tmp_path, [f"model.llm={base}", f"lora.target_modules={targets}"])
    with torch.no_grad():
        ours = model.llm(ids())

    merged = export_checkpoint(step, tmp_path / "merged", merge=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    assert type(hf).__name__ == ("MistralForCausalLM" if arch == "mistral" else "LlamaForCausalLM")
    with torch.no_grad():
        assert rel_err(hf(ids()).logits, ours) < TOL

    unmerged = export_checkpoint(step, tmp_path / "unmerged", merge=False)
    assert json.loads((unmerged / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base.resolve())
    assert not list(unmerged.glob("model*.safetensors"))  # the base is referenced, never copied
    hf_base = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with_adapter = peft.PeftModel.from_pretrained(hf_base, unmerged).eval()
    with torch.no_grad():
        assert rel_err(with_adapter(ids()).logits, ours) < TOL
        # PEFT's own merge gives the weights our export wrote.
        reference = with_adapter.merge_and_unload().state_dict()
    for name, tensor in hf.state_dict().items():
        assert rel_err(tensor, reference[name]) < 1e-6, name

    # The projection is MiniGPT-v2's llama_proj, the checkpoint's values.
    for folder in (merged, unmerged):
        projection = load_file(str(folder / "projection.safetensors"))
        assert set(projection) == {"llama_proj.weight", "llama_proj.bias"}
        assert torch.equal(projection["llama_proj.weight"], model.connector.llama_proj.weight.detach())
    record = json.loads((merged / "pefomed_export.json").read_text())
    assert record["merged"] and record["lora"]["scaling"] == 2.0 and record["vision"]["name"] == "tiny"


def test_qlora_base_is_dequantized_as_bitsandbytes_does(tmp_path):
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    base = save_hf_base(tmp_path / "base", "llama")
    cfg, model, step = make_checkpoint(tmp_path, [f"model.llm={base}", "model.quantize_llm=nf4",
                                                  "lora.target_modules=[q_proj, v_proj]"])
    with torch.no_grad():
        ours = model.llm(ids())
    merged = export_checkpoint(step, tmp_path / "merged", merge=True)

    # Reference: transformers' base with every decoder linear NF4-round-tripped by bitsandbytes,
    # then PEFT merges the adapter.
    reference = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        for module in reference.model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(bnb_nf4_round_trip(bnb_f, module.weight.data))
    step_adapter = tmp_path / "adapter_only"
    step_adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (step_adapter / name).write_bytes((step / name).read_bytes())
    reference = peft.PeftModel.from_pretrained(reference, step_adapter).merge_and_unload().eval()
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        exported, expected = hf(ids()).logits, reference(ids()).logits
    assert rel_err(exported, expected) < TOL
    assert rel_err(exported, ours) < TOL
    full_precision = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    full_state = full_precision.state_dict()
    k_proj = "model.layers.0.self_attn.k_proj.weight"
    assert rel_err(hf.state_dict()[k_proj], full_state[k_proj]) > 1e-3  # NF4 really changed the base

    unmerged = export_checkpoint(step, tmp_path / "unmerged", merge=False)
    assert "NF4" in json.loads((unmerged / "pefomed_export.json").read_text())["note"]


def test_random_init_base_is_written_for_both_exports(tmp_path):
    """The demo's random base exists nowhere else: both exports write it, from the run's seed."""
    cfg, model, step = make_checkpoint(tmp_path, [
        "model.llm=tiny", "model.random_init=true",
        f"model.llm_overrides={{vocab_size: {VOCAB}, hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, "
        "num_attention_heads: 4}", "lora.target_modules=[q_proj, v_proj]"])
    with torch.no_grad():
        ours = model.llm(ids())
    merged = export_checkpoint(step, tmp_path / "merged", merge=True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    unmerged = export_checkpoint(step, tmp_path / "unmerged", merge=False)
    base = json.loads((unmerged / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str((tmp_path / "unmerged" / "base").resolve())
    with_adapter = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), unmerged).eval()
    with torch.no_grad():
        assert rel_err(hf(ids()).logits, ours) < TOL
        assert rel_err(with_adapter(ids()).logits, ours) < TOL


def test_bf16_export_and_shards(tmp_path):
    base = save_hf_base(tmp_path / "base", "llama")
    _, model, step = make_checkpoint(tmp_path, [f"model.llm={base}", "lora.target_modules=[q_proj, v_proj]"])
    out = export_checkpoint(step, tmp_path / "bf16", merge=True, dtype="bfloat16", max_shard_gb=40e3 / 2**30)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((out / s).is_file() for s in shards) and not list(out.glob(".shard-*"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    state = hf.state_dict()
    q = "model.layers.1.self_attn.q_proj"
    layer = model.llm.get_submodule(q)
    expected = (layer.weight + layer.scaling * layer.lora_B.weight @ layer.lora_A.weight).to(torch.bfloat16)
    assert torch.equal(state[f"{q}.weight"], expected.float())  # merged in fp32, then rounded once


@pytest.fixture
def cli(capsys):
    """`pefomed <argv>` in this process -> (exit status, stderr); the command's log handler, which
    holds this test's captured stderr, is taken off again afterwards."""
    import logging

    def run(*argv):
        capsys.readouterr()
        logger = logging.getLogger("pefomed")
        try:
            code = cli_main([str(a) for a in argv])
        finally:
            for handler in [h for h in logger.handlers if getattr(h, "_pefomed", False)]:
                logger.removeHandler(handler)
            logger.setLevel(logging.NOTSET)
            logger.propagate = True
        return code, capsys.readouterr().err

    return run


def test_cli_export_refuses_an_existing_folder_and_an_incomplete_checkpoint(tmp_path, cli):
    base = save_hf_base(tmp_path / "base", "llama")
    _, _, step = make_checkpoint(tmp_path, [f"model.llm={base}", "lora.target_modules=[q_proj, v_proj]"])
    assert cli("export", "--checkpoint", tmp_path / "run", "--out", tmp_path / "x", "--merge")[0] == 0
    assert (tmp_path / "x" / "model.safetensors").is_file() or (tmp_path / "x" / "model.safetensors.index.json").is_file()
    code, err = cli("export", "--checkpoint", step, "--out", tmp_path / "x")
    assert code == 2 and f"{tmp_path / 'x'}: already exists" in err
    (step / COMPLETE_MARK).unlink()
    code, err = cli("export", "--checkpoint", step, "--out", tmp_path / "y")
    assert code == 2 and "not a complete checkpoint" in err
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y.*"))


def test_connector_names_and_shard_writer(tmp_path):
    w = torch.ones(2, 3)
    assert set(export_projection({"llama_proj.weight": w, "llama_proj.bias": w[0]})) == {"llama_proj.weight",
                                                                                       "llama_proj.bias"}
    llava = {"mm_projector.0.weight": w, "mm_projector.0.bias": w[0], "mm_projector.2.weight": w,
             "mm_projector.2.bias": w[0]}
    assert export_projection(llava) == llava  # LLaVA's mlp2x_gelu names, as models.connectors keeps them
    with pytest.raises(ExportError, match=r"keys \['proj\.0\.weight'\], neither MiniGPT-v2's llama_proj"):
        export_projection({"proj.0.weight": w})
    writer = ShardWriter(tmp_path, max_bytes=10)
    writer.add("a", torch.zeros(3))  # 12 bytes: alone in its shard, even over the limit
    writer.add("b", torch.zeros(1))
    assert writer.close() == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert math.isclose(json.loads((tmp_path / "model.safetensors.index.json").read_text())["metadata"]["total_size"],
                        16)


def test_idefics2_exports_the_whole_model_with_text_and_connector_lora_folded_in(tmp_path):
    """Seed 3: Idefics2 (SigLIP + perceiver connector + Mistral) in transformers' names, QLoRA's
    NF4 text model dequantized, the connector's LoRA merged too; transformers runs the folder."""
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, patch_size=8,
                  image_size=64)
    perceiver = dict(hidden_size=64, resampler_n_latents=4, resampler_depth=2, resampler_n_heads=4,
                     resampler_head_dim=16, num_key_value_heads=2)
    text = dict(model_type="mistral", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, sliding_window=None,
                pad_token_id=0)
    image_id = VOCAB - 1
    torch.manual_seed(0)
    transformers.Idefics2ForConditionalGeneration(transformers.Idefics2Config(
        vision_config=vision, perceiver_config=perceiver, text_config=text, image_token_id=image_id,
    )).save_pretrained(tmp_path / "idefics2")
    _, model, step = make_checkpoint(tmp_path, [
        "model.arch=idefics2", f"model.llm={tmp_path / 'idefics2'}", "model.image_size=64", "model.quantize_llm=nf4",
        "lora.target_modules=[q_proj, v_proj, gate_proj, up_proj, down_proj]"])
    adapted = load_file(str(step / "adapter_model.safetensors"))
    assert any(".connector.modality_projection." in k for k in adapted)  # the connector's LoRA is in the adapter
    input_ids = torch.tensor([[1, 5, 6] + [image_id] * 4 + [7, 8, 9], [1, 12, 16] + [image_id] * 4 + [13, 14, 15]])
    pixels = torch.randn(2, 1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 1, 64, 64, dtype=torch.bool)
    with torch.no_grad():
        ours = model.llm(input_ids, pixel_values=pixels, pixel_attention_mask=mask,
                         image_token_mask=input_ids == image_id)

    merged = export_checkpoint(step, tmp_path / "merged", merge=True)
    assert not (merged / "projection.safetensors").exists()
    hf = transformers.Idefics2ForConditionalGeneration.from_pretrained(merged, dtype=torch.float32).eval()
    with torch.no_grad():
        assert rel_err(hf(input_ids=input_ids, pixel_values=pixels, pixel_attention_mask=mask).logits, ours) < TOL
    # Unmerged: PEFT on the base as the note says to load it, its text model's linears in NF4
    # (bitsandbytes' codes), the connector in full precision.
    bnb_f = pytest.importorskip("bitsandbytes.functional")
    unmerged = export_checkpoint(step, tmp_path / "unmerged", merge=False)
    base = transformers.Idefics2ForConditionalGeneration.from_pretrained(tmp_path / "idefics2", dtype=torch.float32)
    with torch.no_grad():
        for module in base.model.text_model.layers.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(bnb_nf4_round_trip(bnb_f, module.weight.data))
    with_adapter = peft.PeftModel.from_pretrained(base, unmerged).eval()
    adapted = {n.split(".lora_")[0] for n, _ in with_adapter.named_parameters() if ".lora_A." in n}
    assert adapted and not any("vision_model" in n for n in adapted)  # SigLIP was never adapted
    with torch.no_grad():
        logits = with_adapter(input_ids=input_ids, pixel_values=pixels, pixel_attention_mask=mask).logits
    assert rel_err(logits, ours) < TOL
