"""Seed 2 (arXiv 2504.05575): BiomedCLIP + LLaMA-3-8B, configs/biomedclip_llama3_stage{1,2}.yaml.

- The configs hold the paper's setup, and build at full size on the meta device with the
  trainable-parameter counts that setup gives, computed here from the shapes and checked against
  PEFT on transformers' LLaMA-3-8B and transformers' LLaVA projector, also on the meta device.
- Both stages run a few steps at tiny size through `train/run.py`, stage 2 from stage 1's
  projector, with the vision tower read from a tiny checkpoint in BiomedCLIP's open_clip layout.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from pefomed.engine.build import build_model, n_image_tokens
from pefomed.engine.config import load_config
from pefomed.models.vit import CONFIGS as VIT_CONFIGS

ROOT = Path(__file__).resolve().parents[2]
STAGE1, STAGE2 = ROOT / "configs/biomedclip_llama3_stage1.yaml", ROOT / "configs/biomedclip_llama3_stage2.yaml"
# The released weights are not here: full size means the named configs with no weights, on meta.
FULL_SIZE = ["model.random_init=true", "model.llm=llama3-8b", "model.vision_checkpoint=null",
             "model.projection_checkpoint=null"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_count(r: int, layers: int, shapes: list[tuple[int, int]]) -> int:
    """LoRA's A [r, in] and B [out, r] for each adapted (in, out), in every layer."""
    return layers * sum(r * (i + o) for i, o in shapes)


# LLaMA-3-8B: width 4096, 8 KV heads of 128 (1024), MLP 14336, 32 layers.
LLAMA3_LORA_R8 = lora_count(8, 32, [(4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096),
                                    (4096, 14336), (4096, 14336), (14336, 4096)])
MLP2X_GELU = (768 * 4096 + 4096) + (4096 * 4096 + 4096)  # BiomedCLIP's 768 -> LLaMA-3's 4096


def test_the_configs_hold_the_papers_setup():
    for path in (STAGE1, STAGE2):
        cfg = load_config(path)
        m = cfg.model
        assert (m.arch, m.connector, m.vision, m.vision_layout, m.image_size, m.ln_vision) == (
            "llava", "mlp2x_gelu", "biomedclip-b-16", "open_clip", 224, False)
        assert (cfg.lora.r, cfg.lora.alpha, m.dtype, cfg.optim.warmup_steps) == (8, 32, "bfloat16", 100)
        assert cfg.train.micro_batch_size * cfg.train.grad_accum * 2 == 128  # on 2 GPUs
        assert n_image_tokens(cfg) == 196  # 14 x 14 patches, CLS dropped
    assert not load_config(STAGE1).lora.enabled
    stage2 = load_config(STAGE2)
    assert stage2.lora.enabled and [d.kind for d in stage2.data.train] == ["omnimedvqa"]
    assert stage2.model.projection_checkpoint.startswith(load_config(STAGE1).train.output_dir)


def trainable(model: torch.nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def test_stage1_builds_at_full_size_training_the_projector_alone():
    model = build_model(load_config(STAGE1, FULL_SIZE), "meta")
    counts = trainable(model)
    assert sorted(counts) == ["connector.mm_projector.0.bias", "connector.mm_projector.0.weight",
                              "connector.mm_projector.2.bias", "connector.mm_projector.2.weight"]
    assert sum(counts.values()) == MLP2X_GELU == 19_931_136
    # transformers' LLaVA projector for the same widths.
    cfg = transformers.LlavaConfig(vision_config=transformers.CLIPVisionConfig(hidden_size=768),
                                   text_config=transformers.LlamaConfig(hidden_size=4096))
    with torch.device("meta"):
        assert sum(p.numel() for p in LlavaMultiModalProjector(cfg).parameters()) == MLP2X_GELU


def test_stage2_builds_at_full_size_with_the_papers_lora():
    model = build_model(load_config(STAGE2, FULL_SIZE), "meta")
    counts = trainable(model)
    lora = sum(n for name, n in counts.items() if ".lora_" in name)
    assert lora == LLAMA3_LORA_R8 == 20_971_520
    assert sum(counts.values()) == LLAMA3_LORA_R8 + MLP2X_GELU == 40_902_656
    assert {name.split(".")[-3] for name in counts if ".lora_" in name} == set(TARGETS)
    # PEFT on transformers' LLaMA-3-8B (on meta) adapts the same layers with the same count.
    hf_cfg = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8)
    with torch.device("meta"):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    frozen_llm = sum(p.numel() for n, p in model.llm.named_parameters() if ".lora_" not in n)
    assert frozen_llm == sum(p.numel() for p in hf.parameters()) == 8_030_261_248
    peft_model = get_peft_model(hf, LoraConfig(r=8, lora_alpha=32, target_modules=TARGETS))
    assert sum(p.numel() for p in peft_model.parameters() if p.requires_grad) == lora
    # The frozen tower: BiomedCLIP's ViT-B/16 up to its second-to-last block.
    assert sum(p.numel() for p in model.vit.parameters()) == 85_798_656 - 7_087_872 - 2 * 768
    assert not any(p.requires_grad for p in model.vit.parameters())


# ---------------------------------------------------------------- tiny runs


def open_clip_checkpoint(path: Path) -> None:
    """A random tiny BiomedCLIP file: the timm tower under visual.trunk, CLIP's head, a text tower."""
    c = VIT_CONFIGS["tiny-biomedclip"]
    g = torch.Generator().manual_seed(0)
    d, t = c.hidden_size, "visual.trunk."

    def r(*shape):
        return 0.05 * torch.randn(*shape, generator=g)

    sd = {t + "cls_token": r(1, 1, d), t + "pos_embed": r(1, c.num_patches + 1, d),
          t + "patch_embed.proj.weight": r(d, 3, c.patch_size, c.patch_size), t + "patch_embed.proj.bias": r(d),
          t + "norm.weight": 1 + r(d), t + "norm.bias": r(d), "visual.head.proj.weight": r(16, d),
          "text.proj.0.weight": r(16, 8), "logit_scale": torch.tensor(4.6)}
    for i in range(c.num_layers):
        b = f"{t}blocks.{i}."
        for name, shape in (("norm1", (d,)), ("norm2", (d,)), ("attn.qkv", (3 * d, d)), ("attn.proj", (d, d)),
                            ("mlp.fc1", (c.intermediate_size, d)), ("mlp.fc2", (d, c.intermediate_size))):
            sd[b + name + ".weight"] = (1 + r(*shape)) if name.startswith("norm") else r(*shape)
            sd[b + name + ".bias"] = r(shape[0])
    torch.save(sd, path)


def run(config: Path, out: Path, data: Path, vision: Path, extra: list[str]) -> None:
    overrides = [
        f"train.output_dir={out}", "model.random_init=true", "model.llm=tiny-llama3", "model.vision=tiny-biomedclip",
        "model.image_size=32", f"model.vision_checkpoint={vision}", f"model.tokenizer={data}/tokenizer",
        "model.dtype=float32", "model.kernels=torch", "train.strategy=single", "train.device=cpu",
        "train.micro_batch_size=4", "train.grad_accum=1", "train.max_steps=3", "train.save_every=0",
        "train.progress_bar=false", "optim.warmup_steps=1", "data.synthetic_train=24", "data.synthetic_test=4",
        "data.max_length=96", *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(ROOT / "train/run.py"), "--config", str(config), *overrides]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_both_stages_run_at_tiny_size(tmp_path):
    data, vision = tmp_path / "data", tmp_path / "open_clip_pytorch_model.bin"
    open_clip_checkpoint(vision)
    stage1 = tmp_path / "stage1"
    run(STAGE1, stage1, data, vision, [f"data.train=[{{kind: synthetic, path: {data}, split: train}}]"])
    assert len(losses(stage1)) == 3 and all(x == x for x in losses(stage1))
    final1 = stage1 / "checkpoints/step_3"
    projection = load_file(str(final1 / "projection.safetensors"))
    assert sorted(projection) == ["mm_projector.0.bias", "mm_projector.0.weight", "mm_projector.2.bias",
                                  "mm_projector.2.weight"]
    assert load_file(str(final1 / "adapter_model.safetensors")) == {}  # no adapter in stage 1

    stage2 = tmp_path / "stage2"
    run(STAGE2, stage2, data, vision, [
        f"data.train=[{{kind: synthetic, path: {data}, split: train}}]", "data.eval=[]",
        f"model.projection_checkpoint={final1 / 'projection.safetensors'}",
    ])
    assert len(losses(stage2)) == 3
    final2 = stage2 / "checkpoints/step_3"
    adapter = load_file(str(final2 / "adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in adapter} == set(TARGETS)
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in adapter
    config = json.loads((final2 / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (8, 32)
    # Stage 2 builds with stage 1's projector, and trains it further.
    vocab = len(json.loads((data / "tokenizer/tokenizer.json").read_text())["model"]["vocab"])
    cfg = load_config(STAGE2, [
        "model.random_init=true", "model.llm=tiny-llama3", f"model.llm_overrides={{vocab_size: {vocab}}}",
        "model.vision=tiny-biomedclip", "model.image_size=32", f"model.vision_checkpoint={vision}",
        f"model.projection_checkpoint={final1 / 'projection.safetensors'}", "model.dtype=float32",
        "model.kernels=torch", f"data.train=[{{kind: synthetic, path: {data}, split: train}}]", "data.eval=[]",
    ])
    start = build_model(cfg).connector.state_dict()
    assert all(torch.equal(start[k], projection[k]) for k in projection)
    moved = load_file(str(final2 / "projection.safetensors"))
    assert any(not torch.equal(moved[k], projection[k]) for k in projection)


def test_mismatched_parts_are_refused_naming_the_option():
    from pefomed.engine.config import ConfigError

    with pytest.raises(ConfigError, match=r"override 'model.connector=grouped': model.connector=grouped does not "
                                          r"fit model.arch=llava"):
        load_config(STAGE1, ["model.connector=grouped"])
    with pytest.raises(ConfigError, match="model.image_splitting=true applies to model.arch=idefics2 only"):
        load_config(STAGE1, ["model.image_splitting=true"])
    load_config(STAGE1, ["lora.target_modules=[]"])  # no adapters in stage 1: no list needed
    with pytest.raises(ConfigError, match="lora.target_modules is empty"):
        load_config(STAGE2, ["lora.target_modules=[]"])
    with pytest.raises(ConfigError, match=r"lora.target_modules: \['qkv_proj'\] match no linear layer"):
        build_model(load_config(STAGE2, [*FULL_SIZE, "lora.target_modules=[qkv_proj]"]), "meta")
