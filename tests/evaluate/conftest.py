"""Shared by the evaluation tests.

- `cli`: run a `pefomed` command in this process; returns (exit status, stdout, stderr).
- `tiny`: a tiny config, its synthetic data and tokenizer, a model with trained-looking weights
  (non-zero LoRA B and projection, so that loading them matters) and that model's checkpoint,
  written by hand in the documented format (PEFT adapter keys, `projection.safetensors`,
  `config.yaml`, the `COMPLETE` marker) inside a run's output_dir.
- `greedy_tokens` / `greedy_reply`: the reference decode, a plain greedy loop on a model held in
  memory: no KV cache, no padding, one item at a time, the whole sequence recomputed at each step,
  stopping only at the tokenizer's EOS.
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

MAX_NEW = 4


def _reset_pefomed_logging() -> None:
    """Undo `pefomed.errors.configure_logging`, whose handler holds the stderr of the test that ran it."""
    logger = logging.getLogger("pefomed")
    for handler in [h for h in logger.handlers if getattr(h, "_pefomed", False)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


@pytest.fixture
def cli(capsys):
    from pefomed.cli import main

    def run(*argv) -> tuple[int, str, str]:
        capsys.readouterr()
        _reset_pefomed_logging()
        try:
            code = main([str(a) for a in argv])
        finally:
            _reset_pefomed_logging()
        out, err = capsys.readouterr()
        return code, out, err

    return run


def greedy_tokens(model, tokenizer, cfg, image: str, task: str, question: str | None, template: str = "minigptv2",
                  max_new: int = MAX_NEW) -> list[int]:
    from pefomed.engine.build import n_image_tokens
    from pefomed.engine.data.collate import encode_prompt
    from pefomed.engine.data.images import load_image
    from pefomed.engine.data.prompts import build_prompt

    ids, mask = encode_prompt(tokenizer, build_prompt(task, question, template), n_image_tokens(cfg))
    pixels = load_image(image, cfg.model.image_size)[None]
    ids, mask = torch.tensor([ids]), torch.tensor([mask])
    out: list[int] = []
    with torch.no_grad():
        prompt = model.embed(pixels, ids, mask)
        for _ in range(max_new):
            emb = prompt if not out else torch.cat([prompt, model.llm.get_input_embeddings()(torch.tensor([out]))], 1)
            token = int(model.llm(inputs_embeds=emb)[0, -1].argmax())
            out.append(token)
            if token == tokenizer.eos_token_id:
                break
    return out


def greedy_reply(model, tokenizer, cfg, image: str, task: str, question: str | None, template: str = "minigptv2",
                 max_new: int = MAX_NEW) -> str:
    tokens = greedy_tokens(model, tokenizer, cfg, image, task, question, template, max_new)
    return tokenizer.decode(tokens, skip_special_tokens=True)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    from pefomed.engine.build import build_model
    from pefomed.engine.checkpoint import COMPLETE_MARK
    from pefomed.engine.config import load_config, save_config
    from pefomed.engine.data.sources import fit_vocab_to_tokenizer, load_run_tokenizer, load_samples

    root = tmp_path_factory.mktemp("tiny_eval")
    data = root / "data"
    cfg = load_config(None, [
        "model.llm=tiny", "model.random_init=true", f"model.tokenizer={data / 'tokenizer'}",
        "model.llm_overrides={hidden_size: 64, intermediate_size: 96, num_hidden_layers: 2, num_attention_heads: 4}",
        "model.vision=tiny", "model.image_size=32", "model.dtype=float32", "model.kernels=torch",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "lora.target_modules=[q_proj, v_proj]",
        f"data.train=[{{kind: synthetic, path: {data}, split: train}}]",
        f"data.eval=[{{kind: synthetic, path: {data}, split: test}}]",
        "data.synthetic_train=24", "data.synthetic_test=10", "data.max_length=128",
        f"train.output_dir={root / 'run'}", "train.seed=3", "train.device=cpu",
        f"eval.max_new_tokens={MAX_NEW}", "eval.batch_size=4",
    ])
    test_samples = load_samples(cfg.data.eval, cfg)  # writes the dataset and the demo tokenizer
    tokenizer = load_run_tokenizer(cfg)
    fit_vocab_to_tokenizer(cfg, tokenizer)
    model = build_model(cfg, "cpu").eval()
    generator = torch.Generator().manual_seed(11)
    adapter = {}
    for name, param in model.llm.named_parameters():
        if ".lora_A." in name or ".lora_B." in name:
            param.data = torch.randn(param.shape, generator=generator) * 0.3
            adapter[f"base_model.model.{name}"] = param.detach().clone()
    for param in model.connector.parameters():
        param.data = torch.randn(param.shape, generator=generator) * 0.05
    step = root / "run" / "checkpoints" / "step_7"
    step.mkdir(parents=True)
    save_file(adapter, str(step / "adapter_model.safetensors"))
    save_file({k: v.contiguous() for k, v in model.connector.state_dict().items()}, str(step / "projection.safetensors"))
    save_config(cfg, step / "config.yaml")
    (step / COMPLETE_MARK).write_text("7")
    return {"cfg": cfg, "root": root, "data": data, "run": root / "run", "step": step, "model": model,
            "tokenizer": tokenizer, "test": test_samples}


@pytest.fixture(scope="session")
def greedy():
    """`greedy.tokens(model, tokenizer, cfg, image, task, question[, template, max_new])`, and `.reply`."""
    return SimpleNamespace(tokens=greedy_tokens, reply=greedy_reply)
