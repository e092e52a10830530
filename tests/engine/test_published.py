"""Released MiniGPT-v2 / PeFoMed `.pth` checkpoints, converted and evaluated with our model.

The synthetic checkpoint is written in their layout (`torch.save` of `{"model", "optimizer",
"config", "scaler", "epoch"}`, LoRA keys `llama_model.base_model.model.<module>.lora_A.default.weight`,
`llama_proj.*`, a rotary buffer). The reference loads it the way MiniGPT-v2 does: transformers'
LLaMA wrapped by PEFT's `get_peft_model`, then `load_state_dict(ckpt["model"], strict=False)`;
its logits must equal those of our model built from the converted folder (fp32, rel err < 1e-5).
"""

import argparse
import json
import logging

import pytest
import torch
import torch.nn.functional as F

from pefomed.cli import main as cli_main
from pefomed.engine.build import build_model
from pefomed.engine.checkpoint import apply_exports, read_exports
from pefomed.engine.config import load_config, save_config
from pefomed.engine.published import MINIGPT_V2_LORA_ALPHA, convert_published, read_published
from pefomed.models.loading import CheckpointError

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

VOCAB, HIDDEN, R, ALPHA = 97, 64, 8, 4.0
VIT_WIDTH = 96  # models.vit.CONFIGS["tiny"]: 32 px images in 8 px patches, 16 tokens + CLS


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.fixture
def base(tmp_path):
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "llama")
    return tmp_path / "llama"


@pytest.fixture
def run_config(tmp_path, base):
    """The user's run config: names the base weights; its LoRA rank differs from the checkpoint's."""
    cfg = load_config(None, [f"model.llm={base}", "model.vision=tiny", "model.image_size=32", "model.dtype=float32",
                             "lora.r=64", "lora.alpha=16", "lora.target_modules=[q_proj, v_proj]"])
    save_config(cfg, tmp_path / "run.yaml")
    return tmp_path / "run.yaml"


def their_state_dict(generator, peft_names=True, vision_width=None):
    """What MiniGPT-v2's runner keeps: the trained projection and LoRA, plus a rotary buffer."""
    vision_width = vision_width or 4 * VIT_WIDTH  # group 4 x the tiny ViT's width
    state = {"llama_proj.weight": torch.randn(HIDDEN, vision_width, generator=generator) * 0.05,
             "llama_proj.bias": torch.randn(HIDDEN, generator=generator) * 0.05}
    adapter = "default." if peft_names else ""
    for layer in range(2):
        prefix = f"llama_model.base_model.model.model.layers.{layer}.self_attn"
        for proj in ("q_proj", "v_proj"):
            state[f"{prefix}.{proj}.lora_A.{adapter}weight"] = torch.randn(R, HIDDEN, generator=generator) * 0.2
            state[f"{prefix}.{proj}.lora_B.{adapter}weight"] = torch.randn(HIDDEN, R, generator=generator) * 0.2
        state[f"{prefix}.rotary_emb.inv_freq"] = torch.rand(8, generator=generator)
    return state


def save_theirs(path, state, config=None):
    exp_avg = {i: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3), "exp_avg_sq": torch.zeros(3)} for i in range(2)}
    torch.save({
        "model": state,
        "optimizer": {"state": exp_avg, "param_groups": [{"lr": 1e-5, "weight_decay": 0.05, "params": [0, 1]}]},
        "config": config if config is not None else
        {"model": {"arch": "minigpt_v2", "lora_r": R, "lora_alpha": ALPHA}, "run": {"init_lr": 1e-5}},
        "scaler": {"scale": 65536.0, "growth_factor": 2.0, "backoff_factor": 0.5, "growth_interval": 2000,
                   "_growth_tracker": 7},
        "epoch": 49,
    }, path)
    return path


def test_converted_checkpoint_gives_minigpt_v2s_own_outputs(tmp_path, base, run_config):
    state = their_state_dict(torch.Generator().manual_seed(3))
    pth = save_theirs(tmp_path / "pefomed_vqarad.pth", state)
    out = convert_published(pth, run_config, tmp_path / "converted")

    # Ours: the converted folder, loaded the way evaluation loads any checkpoint.
    from pefomed.evaluate.run import resolve_checkpoint

    assert resolve_checkpoint(out) == out
    cfg = load_config(out / "config.yaml")
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (R, ALPHA, ["q_proj", "v_proj"])
    model = build_model(cfg, "cpu").eval()
    apply_exports(model, read_exports(out), out)

    # Theirs: MiniGPT-v2's loading path, transformers + PEFT + load_state_dict(strict=False).
    reference = peft.get_peft_model(
        transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"], lora_dropout=0.05, bias="none",
                        task_type="CAUSAL_LM"))
    llm_state = {k[len("llama_model."):]: v for k, v in state.items() if k.startswith("llama_model.")}
    result = reference.load_state_dict(llm_state, strict=False)
    assert not [k for k in result.missing_keys if "lora_" in k]  # every adapter weight found its place
    reference.eval()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_err(model.llm(ids), reference(input_ids=ids).logits) < 1e-5

    # The projection: MiniGPT-v2's encode_img, drop CLS, view(B, N/4, 4D), llama_proj, in float64.
    feats = torch.randn(2, 1 + 16, VIT_WIDTH, dtype=torch.float64)
    expected = F.linear(feats[:, 1:].reshape(2, 4, 4 * VIT_WIDTH), state["llama_proj.weight"].double(),
                        state["llama_proj.bias"].double())
    model.connector.double()
    assert torch.allclose(model.connector(feats), expected, rtol=0, atol=1e-12)

    record = json.loads((out / "converted_from.json").read_text())
    assert record["epoch"] == 49 and record["lora_alpha_from"] == "config.model.lora_alpha of the file"
    assert len(record["ignored_buffers"]) == 2 and len(record["sha256"]) == 64


def test_old_peft_names_and_the_default_alpha(tmp_path):
    state = their_state_dict(torch.Generator().manual_seed(4), peft_names=False)
    published = read_published(save_theirs(tmp_path / "old.pth", state, config={"run": {}}))
    assert published.alpha == MINIGPT_V2_LORA_ALPHA and "default" in published.alpha_source
    assert published.r == R and published.target_modules == ["q_proj", "v_proj"]
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    assert torch.equal(published.adapter[key], state["llama_model.base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"])


def test_what_is_not_a_minigpt_v2_lora_checkpoint_is_refused(tmp_path, run_config):
    generator = torch.Generator().manual_seed(5)
    full = {**their_state_dict(generator), "llama_model.base_model.model.model.layers.0.mlp.up_proj.weight": torch.zeros(2)}
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) are neither the projection .*layers\.0\.mlp\.up_proj\.weight"):
        read_published(save_theirs(tmp_path / "full.pth", full))
    half = {k: v for k, v in their_state_dict(generator).items() if "layers.1.self_attn.q_proj.lora_B" not in k}
    with pytest.raises(CheckpointError, match=r"without their A/B partner: \['base_model\.model\.model\.layers\.1\."
                                              r"self_attn\.q_proj'\]"):
        read_published(save_theirs(tmp_path / "half.pth", half))
    no_proj = {k: v for k, v in their_state_dict(generator).items() if not k.startswith("llama_proj")}
    with pytest.raises(CheckpointError, match=r"no llama_proj\.weight or llama_proj\.bias"):
        read_published(save_theirs(tmp_path / "noproj.pth", no_proj))
    # A vision width the config's model does not have: named before anything is written.
    wide = save_theirs(tmp_path / "wide.pth", their_state_dict(generator, vision_width=4 * 1408))
    with pytest.raises(CheckpointError, match=r"llama_proj\.weight is \[64, 5632\] but the config's model needs "
                                              r"\[64, 384\] .* use model\.vision=eva-g-14"):
        convert_published(wide, run_config, tmp_path / "never")
    assert not (tmp_path / "never").exists() and not list(tmp_path.glob(".never.*"))


def run_cli(capsys, *argv):
    """`pefomed <argv>` in this process -> (exit status, stderr), its log handler taken off afterwards."""
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


def test_untrusted_pickles_are_refused_and_the_cli_converts(tmp_path, run_config, capsys):
    state = their_state_dict(torch.Generator().manual_seed(6))
    torch.save({"model": state, "config": argparse.Namespace(lora_alpha=4)}, tmp_path / "pickled.pth")
    code, err = run_cli(capsys, "convert", "--checkpoint", tmp_path / "pickled.pth", "--config", run_config,
                        "--out", tmp_path / "a")
    assert code == 2 and "cannot be read with torch.load(weights_only=True)" in err
    save_theirs(tmp_path / "ok.pth", state)
    code, _ = run_cli(capsys, "convert", "--checkpoint", tmp_path / "ok.pth", "--config", run_config, "--out",
                      tmp_path / "b")
    assert code == 0
    assert (tmp_path / "b" / "COMPLETE").is_file() and (tmp_path / "b" / "adapter_model.safetensors").is_file()
