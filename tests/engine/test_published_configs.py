"""Seed 1 as published: the stage configs carry PeFoMed's own hyperparameters, and each stage starts
from the previous stage's checkpoint folder.

The reference values are PeFoMed's release (jinlHe/PeFoMed, pefomed/projects/pefomed/*.yaml):
`init_lr`, `min_lr`, `warmup_steps`, `weight_decay`, `max_epoch` x `iters_per_epoch`, `lora_r`,
`lora_alpha`, `image_size`, and its VQA instruction pool of two templates (one short).
"""

import dataclasses

import pytest
import torch
from safetensors.torch import save_file

from pefomed.engine.build import build_model
from pefomed.engine.checkpoint import COMPLETE_MARK
from pefomed.engine.config import load_config

PUBLISHED = {  # file -> (init_lr, min_lr, warmup_steps, weight_decay, max_epoch * iters_per_epoch)
    "pefomed_stage1": (1e-5, 1e-6, 1000, 0.05, 5 * 1000),
    "pefomed_stage2_vqa": (1e-5, 1e-6, 100, 0.05, 50 * 100),
    "pefomed_stage2_reports": (3e-5, 1e-5, 100, 0.05, 4 * 100),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_stage_configs_carry_the_published_recipe(name):
    cfg = load_config(f"configs/{name}.yaml")
    o, t, m = cfg.optim, cfg.train, cfg.model
    assert (o.lr, o.min_lr, o.warmup_steps, o.weight_decay, t.max_steps) == PUBLISHED[name]
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) == (64, 16, 0.05, ["q_proj", "v_proj"])
    assert (m.vision, m.image_size, m.group, m.group_layout, m.ln_vision) == ("eva-g-14", 448, 4, "sequence", True)
    assert "Llama-2-7b-chat" in m.llm
    if name == "pefomed_stage1":
        assert t.micro_batch_size * 4 == 100  # torchrun --nproc_per_node=4: the paper's batch of 100
        assert {s.kind for s in cfg.data.train} == {"caption", "mimic"}
    else:
        assert t.micro_batch_size == 1 and cfg.eval.max_new_tokens == 300


def test_stage_two_starts_from_stage_ones_last_checkpoint_folder():
    stage1 = load_config("configs/pefomed_stage1.yaml")
    last = f"{stage1.train.output_dir}/checkpoints/step_{stage1.train.max_steps}"
    for name in ("pefomed_stage2_vqa", "pefomed_stage2_reports", "pefomed_vqarad"):
        m = load_config(f"configs/{name}.yaml").model
        assert m.projection_checkpoint == m.adapter_checkpoint == last, name
    vqa = load_config("configs/pefomed_stage2_vqa.yaml")
    assert vqa.data.short_prompt_prob == 0.5  # one of PeFoMed's two VQA templates is the short one
    assert [s.kind for s in vqa.data.train + vqa.data.eval] == ["vqa_rad", "vqa_rad"]
    assert dataclasses.asdict(load_config("configs/pefomed_vqarad.yaml")) == dataclasses.asdict(vqa)


def test_a_checkpoint_folder_is_a_valid_start(tmp_path):
    """`model.projection_checkpoint` and `model.adapter_checkpoint` take a step folder as stage 1 saves it."""
    overrides = ["model.llm=tiny", "model.random_init=true", "model.vision=tiny", "model.image_size=32",
                 "model.dtype=float32", "lora.r=4", "lora.alpha=8", "lora.target_modules=[q_proj, v_proj]",
                 "model.llm_overrides={vocab_size: 50, hidden_size: 32, intermediate_size: 48, num_hidden_layers: 1, "
                 "num_attention_heads: 4}"]
    stage1 = build_model(load_config(None, overrides), "cpu")
    generator = torch.Generator().manual_seed(0)
    step = tmp_path / "checkpoints" / "step_5000"
    (step / "trainer_state" / "dcp").mkdir(parents=True)
    (step / "trainer_state" / "dcp" / "__0_0.distcp").write_bytes(b"\0" * 16)  # what DCP leaves beside the exports
    (step / "trainer_state" / "progress.json").write_text("{}")
    adapter, projection = {}, {}
    for name, p in stage1.llm.named_parameters():
        if ".lora_" in name:
            adapter[f"base_model.model.{name}"] = torch.randn(p.shape, generator=generator)
    for name, p in stage1.connector.named_parameters():
        projection[name] = torch.randn(p.shape, generator=generator)
    save_file(adapter, str(step / "adapter_model.safetensors"))
    save_file(projection, str(step / "projection.safetensors"))
    (step / COMPLETE_MARK).write_text("5000")
    stage2 = build_model(load_config(None, [*overrides, f"model.projection_checkpoint={step}",
                                            f"model.adapter_checkpoint={step}"]), "cpu")
    params = dict(stage2.named_parameters())
    for key, value in adapter.items():
        assert torch.equal(params["llm." + key.removeprefix("base_model.model.")], value), key
    for key, value in projection.items():
        assert torch.equal(params["connector." + key], value), key


@pytest.mark.parametrize("name", ["pefomed_stage1.yaml", "pefomed_stage2_vqa.yaml", "pefomed_stage2_reports.yaml"])
def test_stage_configs_build_at_full_size_with_the_papers_trainable_count(name):
    """EVA ViT-g/14 at 448 px + grouped projection + LLaMA-2-7b-chat with LoRA r=64 on q,v, built on
    meta from the stage config itself: 23,072,768 + 33,554,432 = 56,627,200 trainable (the paper's 56.63M)."""
    full_size = ["model.random_init=true", "model.llm=llama2-7b-chat", "model.vision_checkpoint=null",
                 "model.projection_checkpoint=null", "model.adapter_checkpoint=null", "train.device=cpu"]
    model = build_model(load_config(f"configs/{name}", full_size), "meta")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    projection = sum(v for n, v in trainable.items() if n.startswith("connector."))
    lora = sum(v for n, v in trainable.items() if ".lora_" in n)
    assert projection == 5632 * 4096 + 4096 == 23_072_768
    assert lora == 32 * 2 * (64 * 4096 + 4096 * 64) == 33_554_432
    assert sum(trainable.values()) == projection + lora == 56_627_200
    vit_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("vit."))
    assert vit_params > 900_000_000  # EVA ViT-g/14 (39 of its 40 blocks, as MiniGPT-v2 uses), frozen
