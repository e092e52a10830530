"""optim.connector_lr: the connector's own parameter groups, each group on the warmup-cosine
schedule scaled to its own peak, and a resume that restores every group's lr and state."""

import math

import pytest
import torch

from pefomed.engine.build import build_model
from pefomed.engine.checkpoint import load_dcp_state, save_dcp_state
from pefomed.engine.config import ConfigError, load_config
from pefomed.engine.trainer import WarmupCosine, build_optimizer, param_groups

TINY = ["model.random_init=true", "model.llm=tiny", "model.vision=tiny", "model.image_size=32", "model.dtype=float32",
        "lora.r=4", "lora.alpha=8", "lora.dropout=0.0", "model.llm_overrides={vocab_size: 300}",
        "optim.lr=2e-4", "optim.min_lr=2e-5", "optim.warmup_steps=3", "train.max_steps=10", "optim.weight_decay=0.1"]


def config(*extra: str):
    return load_config("configs/demo.yaml", [*TINY, *extra])


def reference_schedule(step: int, peak: float, floor_ratio: float, warmup: int, max_steps: int) -> float:
    """Linear warmup to `peak` over `warmup` steps, then cosine down to `peak * floor_ratio`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min((step - warmup) / (max_steps - warmup), 1.0)
    low = peak * floor_ratio
    return low + (peak - low) * (1 + math.cos(math.pi * t)) / 2


def fake_step(model, optimizer, scheduler) -> None:
    """An optimizer step with a gradient on every trainable parameter."""
    loss = sum((p.float() - 0.5).pow(2).sum() for p in model.parameters() if p.requires_grad)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()


def test_groups_split_the_connector_and_the_decay():
    cfg = config("optim.connector_lr=1e-3")
    model = build_model(cfg, "cpu")
    groups = param_groups(model, cfg.optim)
    names = {id(p): n for n, p in model.named_parameters()}
    seen = [names[id(p)] for g in groups for p in g["params"]]
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert sorted(seen) == trainable  # each trainable parameter in exactly one group
    for g in groups:
        kinds = {names[id(p)].startswith("connector.") for p in g["params"]}
        assert len(kinds) == 1
        assert g["lr"] == (1e-3 if kinds.pop() else 2e-4)
        assert {p.ndim >= 2 for p in g["params"]} == {g["weight_decay"] > 0}
        assert g["weight_decay"] in (0.0, 0.1)
    # LoRA's matrices; the connector's weight; its bias (LoRA has no 1-d parameter: no empty group)
    assert [(g["lr"], g["weight_decay"], len(g["params"])) for g in groups][1:] == [(1e-3, 0.1, 1), (1e-3, 0.0, 1)]
    assert len(groups) == 3
    # without connector_lr, the groups are the decay split alone, at optim.lr
    plain = param_groups(model, config().optim)
    assert [(g["lr"], g["weight_decay"]) for g in plain] == [(2e-4, 0.1), (2e-4, 0.0)]


def test_every_group_follows_its_own_peak_and_resumes(tmp_path):
    cfg = config("optim.connector_lr=1e-3")
    model = build_model(cfg, "cpu")
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = WarmupCosine(optimizer, cfg.optim, cfg.train.max_steps)
    peaks = [g["initial_lr"] for g in optimizer.param_groups]  # the lr each group was built with
    assert sorted(set(peaks)) == [2e-4, 1e-3]

    def check(opt, step):
        for g, peak in zip(opt.param_groups, peaks):
            assert g["lr"] == pytest.approx(reference_schedule(step, peak, 0.1, 3, 10), rel=1e-12), (step, peak)

    for step in range(6):
        check(optimizer, step)
        fake_step(model, optimizer, scheduler)
    check(optimizer, 6)
    save_dcp_state(model, optimizer, tmp_path)

    # A resumed run: built from the config, its state read back, its schedule set from the step.
    again = build_model(cfg, "cpu")
    resumed = build_optimizer(again, cfg.optim)
    resumed_scheduler = WarmupCosine(resumed, cfg.optim, cfg.train.max_steps)
    load_dcp_state(again, resumed, tmp_path)
    resumed_scheduler.set_step(6)
    check(resumed, 6)
    for step in range(6, 12):  # past max_steps: the floor
        fake_step(model, optimizer, scheduler)
        fake_step(again, resumed, resumed_scheduler)
        check(resumed, step + 1)
    ours = dict(model.named_parameters())
    for name, p in again.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, ours[name]), name


def test_scheduler_state_restores_the_step():
    cfg = config("optim.connector_lr=5e-4")
    model = build_model(cfg, "cpu")
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = WarmupCosine(optimizer, cfg.optim, cfg.train.max_steps)
    for _ in range(4):
        fake_step(model, optimizer, scheduler)
    fresh = build_optimizer(model, cfg.optim)
    fresh_scheduler = WarmupCosine(fresh, cfg.optim, cfg.train.max_steps)
    fresh_scheduler.load_state_dict(scheduler.state_dict())
    assert [g["lr"] for g in fresh.param_groups] == pytest.approx([g["lr"] for g in optimizer.param_groups], rel=1e-12)
    assert {round(g["lr"], 12) for g in fresh.param_groups} == {
        round(reference_schedule(4, peak, 0.1, 3, 10), 12) for peak in (2e-4, 5e-4)}


@pytest.mark.parametrize("value", ["0", "-1e-3", "nan"])
def test_config_refuses_a_connector_lr_out_of_range(value):
    with pytest.raises(ConfigError, match=r"optim\.connector_lr"):
        load_config("configs/demo.yaml", [f"optim.connector_lr={value}"])


def test_connector_lr_null_is_optim_lr():
    cfg = load_config("configs/demo.yaml", ["optim.connector_lr=null"])
    assert cfg.optim.connector_lr is None
