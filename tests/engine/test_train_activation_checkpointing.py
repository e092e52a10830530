"""train.activation_checkpointing: the same loss and gradients, with LoRA dropout live.

The recompute in backward must draw the same dropout masks as the forward did, so the loss and
every trainable gradient equal the run without checkpointing. Checked in one process and under
2-rank FSDP2 (this file is also the torchrun worker: `python -m torch.distributed.run ... this.py OUT`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pefomed.engine import distributed
from pefomed.engine.build import build_model, n_image_tokens
from pefomed.engine.config import load_config

ROOT = Path(__file__).resolve().parents[2]
WRAPPED = "_checkpoint_wrapped_module."


def tiny_config():
    return load_config(ROOT / "configs/demo.yaml", ["lora.dropout=0.3", "model.dtype=float32", "train.device=cpu"])


def make_batch(cfg, seed: int) -> dict:
    """Two right-padded rows: prompt, image positions, answer tokens; the second row is shorter."""
    g = torch.Generator().manual_seed(seed)
    n_img, t = n_image_tokens(cfg), n_image_tokens(cfg) + 12
    input_ids = torch.randint(3, 500, (2, t), generator=g)
    image_token_mask = torch.zeros(2, t, dtype=torch.bool)
    image_token_mask[:, 1 : 1 + n_img] = True
    labels = input_ids.clone()
    labels[:, : 1 + n_img + 4] = -100
    attention_mask = torch.ones(2, t, dtype=torch.long)
    attention_mask[1, -3:] = 0
    labels[1, -3:] = -100
    size = cfg.model.image_size
    pixel_values = torch.randn(2, 3, size, size, generator=g)
    return dict(pixel_values=pixel_values, input_ids=input_ids, attention_mask=attention_mask,
                labels=labels, image_token_mask=image_token_mask)  # fmt: skip


def loss_and_grads(model, batch: dict, dropout_seed: int) -> tuple[float, dict[str, torch.Tensor]]:
    model.train()
    torch.manual_seed(dropout_seed)
    loss, _ = model(batch)
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
            grads[name.replace(WRAPPED, "")] = grad.detach().clone()
    return float(loss.detach()), grads


def worst_relative_error(got: dict, want: dict) -> float:
    assert got.keys() == want.keys() and want
    return max(float((got[k] - want[k]).abs().max() / want[k].abs().max().clamp_min(1e-30)) for k in want)


def compare(strategy: str, env: distributed.DistEnv) -> dict:
    """Loss and gradients without and with activation checkpointing (and with another dropout draw)."""
    cfg = tiny_config()
    batch = make_batch(cfg, seed=10 + env.rank)
    results = {}
    for name, checkpointing in (("plain", False), ("checkpointed", True)):
        model = build_model(cfg, "cpu")
        model = distributed.apply_strategy(model, strategy, env, torch.float32, activation_checkpointing=checkpointing)
        calls: list[int] = []
        inner = distributed.decoder_layers(model)[0]
        inner = getattr(inner, "_checkpoint_wrapped_module", inner)
        inner.mlp.register_forward_pre_hook(lambda *_, calls=calls: calls.append(1))  # a recompute may stop early
        results[name] = (*loss_and_grads(model, batch, dropout_seed=5 + env.rank), len(calls))
        if name == "plain":
            model.zero_grad(set_to_none=True)
            results["other_dropout"] = loss_and_grads(model, batch, dropout_seed=99 + env.rank)
    (loss, grads, calls), (ck_loss, ck_grads, ck_calls) = results["plain"], results["checkpointed"]
    return {
        "loss": loss,
        "checkpointed_loss": ck_loss,
        "grad_rel_err": worst_relative_error(ck_grads, grads),
        "other_dropout_rel_diff": worst_relative_error(results["other_dropout"][1], grads),
        "n_grads": len(grads),
        "mlp_calls": calls,
        "checkpointed_mlp_calls": ck_calls,
    }


def check(result: dict) -> None:
    assert result["mlp_calls"] == 1 and result["checkpointed_mlp_calls"] == 2  # the layer was recomputed
    assert result["other_dropout_rel_diff"] > 1e-3  # dropout is live: another draw moves the gradients
    assert abs(result["checkpointed_loss"] - result["loss"]) <= 1e-6 * abs(result["loss"])
    assert result["grad_rel_err"] < 1e-6, result


def test_single_process_same_loss_and_gradients():
    result = compare("single", distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    # 3 layers x 7 projections x (A, B) + the projection's weight and bias
    assert result["n_grads"] == 3 * 7 * 2 + 2
    check(result)


def test_frozen_vit_is_not_wrapped_and_names_come_back_in_checkpoints():
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    cfg = tiny_config()
    model = build_model(cfg, "cpu")
    plain = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))
    assert distributed.apply_activation_checkpointing(model) == 3  # the LLM's layers only
    assert not any(WRAPPED in n for n, _ in model.vit.named_parameters())
    wrapped = set(get_model_state_dict(model, options=StateDictOptions(ignore_frozen_params=True)))
    assert wrapped == plain


@pytest.mark.slow
@pytest.mark.distributed
def test_fsdp2_two_ranks_same_loss_and_gradients(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__, str(tmp_path)]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for rank in (0, 1):
        check(json.loads((tmp_path / f"rank{rank}.json").read_text()))


if __name__ == "__main__":
    run_env = distributed.init_distributed("cpu")
    with distributed.leaving_together():
        out = compare("fsdp2", run_env)
        Path(sys.argv[1], f"rank{run_env.rank}.json").write_text(json.dumps(out))
