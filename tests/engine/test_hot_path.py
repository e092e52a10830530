"""The step's options around the model: activation checkpointing policies, regional compilation,
and the session that applies them (with packing and the feature cache, through a resume)."""

import json
from pathlib import Path

import pytest
import torch

from pefomed.engine import activation_checkpointing as ac
from pefomed.engine import distributed
from pefomed.engine.build import build_model
from pefomed.engine.compile import compile_layers
from pefomed.engine.config import ConfigError, load_config
from pefomed.engine.data.collate import collate

ROOT = Path(__file__).resolve().parents[2]
WRAPPED = "_checkpoint_wrapped_module."
SINGLE = distributed.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def tiny_config(*extra):
    return load_config(ROOT / "configs/demo.yaml", ["lora.dropout=0.3", "model.dtype=float32", "train.device=cpu", *extra])


def make_batch(cfg, seed=10):
    """Two right-padded rows (prompt, image positions, answer); the second is shorter."""
    from pefomed.engine.build import n_image_tokens

    g = torch.Generator().manual_seed(seed)
    n_img = n_image_tokens(cfg)
    items = []
    for row, extra in enumerate((12, 9)):
        ids = torch.randint(3, 500, (1 + n_img + extra,), generator=g)
        mask = torch.zeros(len(ids), dtype=torch.bool)
        mask[1 : 1 + n_img] = True
        labels = ids.clone()
        labels[: 1 + n_img + 4] = -100
        size = cfg.model.image_size
        items.append({"pixel_values": torch.randn(3, size, size, generator=g), "input_ids": ids, "labels": labels,
                      "image_token_mask": mask, "index": row})  # fmt: skip
    return collate(items, pad_token_id=0)


def live_adapters(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.05)
    return model


def loss_and_grads(model, batch, seed=5):
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, _ = model(batch)
    loss.backward()
    grads = {n.replace(WRAPPED, ""): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads


def worst(got, want):
    assert got.keys() == want.keys() and want
    return max(float((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-30)) for k in want)


def test_policies_choose_their_layers():
    assert ac.chosen_layers(5, "none") == [] and ac.chosen_layers(5, False) == []
    assert ac.chosen_layers(5, "full") == ac.chosen_layers(5, True) == [0, 1, 2, 3, 4]
    assert ac.chosen_layers(5, "selective", every=2) == [0, 2, 4]
    assert ac.chosen_layers(5, "selective", every=3) == [0, 3]
    with pytest.raises(ValueError, match="expected one of none, full, selective"):
        ac.chosen_layers(5, "sometimes")


@pytest.mark.parametrize("mode,every,wrapped", [("none", 2, 0), ("selective", 2, 2), ("full", 2, 3)])
def test_checkpointing_recomputes_the_chosen_layers_with_the_same_gradients(mode, every, wrapped):
    """Dropout live: the recompute must draw the forward's masks again."""
    cfg = tiny_config()
    batch = make_batch(cfg)
    want_loss, want = loss_and_grads(live_adapters(build_model(cfg, "cpu")), batch)
    model = live_adapters(build_model(cfg, "cpu"))
    model = distributed.apply_strategy(model, "single", SINGLE, torch.float32, activation_checkpointing=mode,
                                       ac_every=every)  # fmt: skip
    layers = distributed.decoder_layers(model)
    is_wrapped = [WRAPPED.rstrip(".") in dict(layer.named_children()) for layer in layers]
    assert sum(is_wrapped) == wrapped and is_wrapped == [i in ac.chosen_layers(3, mode, every) for i in range(3)]
    calls = []
    for layer in layers:
        inner = getattr(layer, "_checkpoint_wrapped_module", layer)
        inner.mlp.register_forward_pre_hook(lambda *_: calls.append(1))
    loss, grads = loss_and_grads(model, batch)
    assert len(calls) == 3 + wrapped  # each checkpointed layer ran its MLP twice
    assert abs(float(loss - want_loss)) <= 1e-6 * abs(float(want_loss))
    assert worst(grads, want) < 1e-6
    _, other = loss_and_grads(model, batch, seed=77)
    assert worst(other, grads) > 1e-3  # another dropout draw moves the gradients: dropout is live


def test_checkpointing_option_accepts_the_old_booleans():
    assert tiny_config("train.activation_checkpointing=true").train.activation_checkpointing == "full"
    assert tiny_config("train.activation_checkpointing=false").train.activation_checkpointing == "none"
    cfg = tiny_config("train.activation_checkpointing=selective", "train.ac_every=3")
    assert (cfg.train.activation_checkpointing, cfg.train.ac_every) == ("selective", 3)
    with pytest.raises(ConfigError, match="train.ac_every=3 does nothing with train.activation_checkpointing=full"):
        tiny_config("train.activation_checkpointing=full", "train.ac_every=3")


@pytest.mark.slow
def test_compiled_layers_equal_eager_with_checkpointing_and_dropout():
    """Inductor on the CPU, fullgraph, each decoder layer; selective checkpointing around some.

    `fallback_random` makes inductor draw dropout masks as eager does, so the two compare draw for
    draw; the bound is fp32 reassociation in the fused kernels.
    """
    import torch._inductor.config as inductor_config

    # The config's own patch, not monkeypatch: its restore would hide the option for later tests.
    with inductor_config.patch(fallback_random=True):
        compiled_equals_eager()


def compiled_equals_eager() -> None:
    cfg = tiny_config()
    batch = make_batch(cfg)
    want_loss, want = loss_and_grads(live_adapters(build_model(cfg, "cpu")), batch)
    model = live_adapters(build_model(cfg, "cpu"))
    model = distributed.apply_strategy(model, "single", SINGLE, torch.float32, activation_checkpointing="selective")
    assert compile_layers(model) == 3 and compile_layers(model) == 0  # a second call compiles nothing
    loss, grads = loss_and_grads(model, batch)
    assert abs(float(loss - want_loss)) <= 1e-5 * abs(float(want_loss))
    assert worst(grads, want) < 1e-4
    loss2, grads2 = loss_and_grads(model, make_batch(cfg, seed=11))  # another batch reuses the graphs
    want2 = loss_and_grads(live_adapters(build_model(cfg, "cpu")), make_batch(cfg, seed=11))
    assert abs(float(loss2 - want2[0])) <= 1e-5 * abs(float(want2[0])) and worst(grads2, want2[1]) < 1e-4


# ---------------------------------------------------------------- through the session


def run_config(tmp_path, out, *extra):
    data = tmp_path / "data"
    return load_config(ROOT / "configs/demo.yaml", [
        f"train.output_dir={tmp_path / out}", f"data.train=[{{kind: synthetic, path: {data}, split: train}}]",
        f"model.tokenizer={data}/tokenizer", "data.synthetic_train=24", "data.synthetic_test=4",
        "train.progress_bar=false", "train.micro_batch_size=6", "model.dtype=float32", "lora.dropout=0.0",
        "train.save_every=2", *extra,
    ])  # fmt: skip


def losses(out: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_session_applies_packing_checkpointing_compile_and_the_cache_through_a_resume(tmp_path, monkeypatch):
    """One reference run; then the same run with the hot-path options, stopped after 2 steps and
    resumed to 4: the losses agree step for step (the feature cache starts empty on resume and
    refills with the same features; packing changes the layout, not the math). No dropout here:
    packed rows draw masks of another shape (the checkpointing test above keeps dropout live)."""
    from pefomed.engine import compile as compile_module
    from pefomed.engine import session

    train = session.train_from_config
    train(run_config(tmp_path, "plain", "train.max_steps=4"))
    applied = {"compiled": 0, "ac": []}
    real_apply = ac.apply_activation_checkpointing

    def record_ac(model, mode="full", every=2):
        applied["ac"].append((mode, every))
        return real_apply(model, mode, every)

    def record_compile(model, **kwargs):  # compilation itself is the slow test above
        applied["compiled"] += len(distributed.decoder_layers(model))
        return 0

    from pefomed.engine.data import collate as collate_module
    from pefomed.models.vlm import FeatureCache

    real_collate, real_get = collate_module.collate, FeatureCache.get
    seen = {"packed": 0, "hits": 0}

    def record_collate(items, pad_token_id, pack_tokens=None):
        batch = real_collate(items, pad_token_id, pack_tokens)
        seen["packed"] += "cu_seqlens" in batch and len(batch["seq_lens"]) > batch["input_ids"].shape[0]
        return batch

    def record_get(self, key):
        found = real_get(self, key)
        seen["hits"] += found is not None
        return found

    monkeypatch.setattr(collate_module, "collate", record_collate)
    monkeypatch.setattr(FeatureCache, "get", record_get)
    monkeypatch.setattr(ac, "apply_activation_checkpointing", record_ac)
    monkeypatch.setattr(compile_module, "compile_layers", record_compile)
    options = ["model.feature_cache=true", "data.packing=true", "data.pack_tokens=256",
               "train.activation_checkpointing=selective", "train.ac_every=2", "train.compile=true"]  # fmt: skip
    train(run_config(tmp_path, "hot", "train.max_steps=2", *options))
    train(run_config(tmp_path, "hot", "train.max_steps=4", *options))
    assert applied == {"compiled": 6, "ac": [("selective", 2)] * 2}
    assert seen["packed"] == 4 and seen["hits"] > 0  # every micro-batch packed; images seen again
    want, got = losses(tmp_path / "plain"), losses(tmp_path / "hot")
    assert len(want) == len(got) == 4
    for a, b in zip(got, want):
        assert abs(a - b) <= 1e-5 * abs(b), (got, want)
