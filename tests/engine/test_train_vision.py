"""model.train_vision: the ViT trains with the connector (fp32, at optim.connector_lr), is written
to each checkpoint as vision.safetensors, resumes exactly, and is what evaluation and export load.
The default keeps the tower frozen, as the papers do."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pefomed.engine.build import build_model
from pefomed.engine.checkpoint import VISION_FILE, latest_checkpoint
from pefomed.engine.config import ConfigError, load_config
from pefomed.engine.export import export_checkpoint
from pefomed.engine.session import train_from_config
from pefomed.engine.trainer import param_groups
from pefomed.evaluate.run import load_eval_config, load_model_for_eval

ROOT = Path(__file__).resolve().parents[2]
TINY = ["model.random_init=true", "model.llm=tiny", "model.vision=tiny", "model.image_size=32", "lora.r=4",
        "lora.alpha=8", "lora.dropout=0.0", "model.llm_overrides={vocab_size: 300}", "optim.lr=2e-4",
        "optim.connector_lr=1e-2", "train.device=cpu"]  # fmt: skip


def config(*extra: str):
    return load_config(ROOT / "configs/demo.yaml", [*TINY, *extra])


def test_the_default_keeps_the_vit_frozen():
    model = build_model(config("model.dtype=bfloat16"), "cpu")
    assert not model.train_vit
    assert not any(p.requires_grad for p in model.vit.parameters())
    assert {p.dtype for p in model.vit.parameters()} == {torch.bfloat16}


def test_train_vision_trains_every_vit_parameter_in_fp32_at_the_connector_lr():
    cfg = config("model.dtype=bfloat16", "model.train_vision=true")
    model = build_model(cfg, "cpu")
    vit = dict(model.vit.named_parameters())
    assert model.train_vit and all(p.requires_grad and p.dtype == torch.float32 for p in vit.values())
    lr_of = {id(p): g["lr"] for g in param_groups(model, cfg.optim) for p in g["params"]}
    assert all(lr_of[id(p)] == 1e-2 for p in vit.values())
    assert all(lr_of[id(p)] == 2e-4 for n, p in model.named_parameters() if "lora_" in n)
    # The tower runs in fp32; what leaves ln_vision for the connector is in the compute dtype.
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    features = model.encode_images(pixels)
    assert features.dtype == torch.bfloat16 and features.requires_grad
    features.float().square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vit.values())
    with torch.no_grad():  # evaluation: the same features, without autograd
        assert torch.equal(model.encode_images(pixels), features.detach())


@pytest.mark.parametrize(
    ("extra", "fields"),
    [
        (["model.arch=idefics2", "model.llm=tiny-idefics2"], r"model\.train_vision.*model\.arch=idefics2"),
        (["model.feature_cache=true"], r"model\.feature_cache.*model\.train_vision=true.*feature_cache=false"),
    ],
)
def test_train_vision_refuses_what_it_cannot_do(extra, fields):
    with pytest.raises(ConfigError, match=fields):
        config("model.train_vision=true", *extra)


def run_config(tmp_path: Path, out: str, steps: int):
    data = tmp_path / "data"
    return config(
        f"train.output_dir={tmp_path / out}", f"data.train=[{{kind: synthetic, path: {data}, split: train}}]",
        f"data.eval=[{{kind: synthetic, path: {data}, split: test}}]", f"model.tokenizer={data}/tokenizer",
        "data.synthetic_train=24", "data.synthetic_test=4", "train.progress_bar=false", "train.micro_batch_size=4",
        "model.dtype=float32", "model.train_vision=true", f"train.max_steps={steps}", "train.save_every=2",
    )  # fmt: skip


def test_a_trained_vit_is_checkpointed_resumed_evaluated_and_exported(tmp_path):
    train_from_config(run_config(tmp_path, "straight", 3))
    train_from_config(run_config(tmp_path, "resumed", 2))
    train_from_config(run_config(tmp_path, "resumed", 3))  # from its step_2 checkpoint
    straight = latest_checkpoint(tmp_path / "straight")
    resumed = latest_checkpoint(tmp_path / "resumed")
    assert straight.name == resumed.name == "step_3"
    trained = load_file(str(straight / VISION_FILE))
    fresh = build_model(run_config(tmp_path, "fresh", 3), "cpu").vit.state_dict()
    assert trained.keys() == fresh.keys()
    assert all(not torch.equal(trained[k], fresh[k]) for k in trained if k.endswith("weight"))  # it trained
    again = load_file(str(resumed / VISION_FILE))
    assert all(torch.equal(trained[k], again[k]) for k in trained)  # the resume is exact

    model, _ = load_model_for_eval(load_eval_config(straight), straight)
    assert all(torch.equal(t, trained[k]) for k, t in model.vit.state_dict().items())

    out = export_checkpoint(straight, tmp_path / "export", merge=False)
    exported = load_file(str(out / VISION_FILE))
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert json.loads((out / "pefomed_export.json").read_text())["vision"]["trained"] == VISION_FILE


def test_a_frozen_vit_writes_no_vision_file(tmp_path):
    cfg = run_config(tmp_path, "frozen", 1)
    cfg.model.train_vision = False
    train_from_config(cfg)
    assert not (latest_checkpoint(tmp_path / "frozen") / VISION_FILE).exists()
