"""The DeepSpeed JSON that a run config maps to, a user's JSON over it, and the config rules.

No process group and no DeepSpeed engine: `deepspeed_config` is plain data. The mapped values are
checked against the run config field by field, and the bucket sizes against the model's own
parameter counts.
"""

import json
import math
from pathlib import Path

import pytest
import torch

from pefomed.engine.build import build_model
from pefomed.engine.config import ConfigError, load_config
from pefomed.engine.deepspeed_strategy import OWNED_KEYS, deepspeed_config, generated_config
from pefomed.engine.distributed import DistEnv
from pefomed.engine.lora import adapter_modules

ROOT = Path(__file__).resolve().parents[2]
ENV4 = DistEnv(rank=0, world_size=4, local_rank=0, device=torch.device("cpu"))


def config(*overrides):
    return load_config(ROOT / "configs/demo.yaml", ["train.strategy=deepspeed", *overrides])


@pytest.fixture(scope="module")
def model():
    return build_model(config("model.dtype=float32"), "cpu")


@pytest.mark.parametrize("stage,dtype", [(2, "bfloat16"), (3, "float16"), (2, "float32")])
def test_generated_config_maps_the_run_config(model, stage, dtype):
    cfg = config(f"train.deepspeed_stage={stage}", f"model.dtype={dtype}", "train.micro_batch_size=3",
                 "train.grad_accum=5", "optim.grad_clip=0.7")  # fmt: skip
    ds = generated_config(cfg, ENV4, model)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 5
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["gradient_clipping"] == 0.7
    assert ds["bf16"]["enabled"] == (dtype == "bfloat16") and ds["fp16"]["enabled"] == (dtype == "float16")
    assert ("communication_data_type" in ds) == (dtype != "float32")  # fp32 reduction, as FSDP2's reduce_dtype
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage and "offload_optimizer" not in zero and "offload_param" not in zero
    assert zero["overlap_comm"] is False  # side streams only on CUDA
    assert ds["checkpoint"]["load_universal"] is False
    # Buckets from the model's own counts: a quarter of the trainable parameters (at least the
    # largest trainable tensor); under ZeRO-3 every adapter tensor below the persistence threshold
    # and one decoder layer per prefetch.
    trainable = [p.numel() for p in model.parameters() if p.requires_grad]
    assert zero["reduce_bucket_size"] == max(max(trainable), math.ceil(sum(trainable) / 4))
    if stage == 3:
        adapters = [p.numel() for _, m in adapter_modules(model) for _, p in m.adapter_params()]
        assert zero["stage3_param_persistence_threshold"] == max(adapters)
        layer = sum(p.numel() for p in model.llm.model.layers[0].parameters())
        assert zero["stage3_prefetch_bucket_size"] == layer
    else:
        assert zero["allgather_bucket_size"] == zero["reduce_bucket_size"]


def test_offload_maps_to_zero_sections(model):
    ds = generated_config(config("train.deepspeed_stage=3", "train.offload_optimizer=cpu", "train.offload_params=cpu"),
                          ENV4, model)  # fmt: skip
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert zero["offload_param"] == {"device": "cpu", "pin_memory": False}


def write(tmp_path, data) -> str:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_a_users_json_overrides_what_it_may(tmp_path, model):
    user = {
        "zero_optimization": {"reduce_bucket_size": 12345, "overlap_comm": True, "stage": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 5,  # equal to ours: no contradiction
        "wall_clock_breakdown": True,
        "comms_logger": {"enabled": True},
    }
    cfg = config("train.grad_accum=5", f"train.deepspeed_config={write(tmp_path, user)}")
    ds = deepspeed_config(cfg, ENV4, model)
    ours = generated_config(cfg, ENV4, model)
    assert ds["zero_optimization"]["reduce_bucket_size"] == 12345 and ds["zero_optimization"]["overlap_comm"] is True
    assert ds["zero_optimization"]["stage"] == 2  # "auto" keeps ours
    assert ds["train_micro_batch_size_per_gpu"] == ours["train_micro_batch_size_per_gpu"]
    assert ds["wall_clock_breakdown"] is True and ds["comms_logger"] == {"enabled": True}
    # Everything else is ours, untouched.
    assert ds["zero_optimization"]["contiguous_gradients"] == ours["zero_optimization"]["contiguous_gradients"]
    assert ds["gradient_clipping"] == ours["gradient_clipping"]


@pytest.mark.parametrize("user,key,option", [
    ({"train_micro_batch_size_per_gpu": 7}, "train_micro_batch_size_per_gpu", "train.micro_batch_size"),
    ({"gradient_accumulation_steps": 3}, "gradient_accumulation_steps", "train.grad_accum"),
    ({"train_batch_size": 1000}, "train_batch_size", "train.micro_batch_size x train.grad_accum"),
    ({"gradient_clipping": 5.0}, "gradient_clipping", "optim.grad_clip"),
    ({"bf16": {"enabled": True}}, "bf16.enabled", "model.dtype"),
    ({"zero_optimization": {"stage": 3}}, "zero_optimization.stage", "train.deepspeed_stage"),
    ({"zero_optimization": {"offload_optimizer": {"device": "cpu"}}}, "zero_optimization.offload_optimizer.device",
     "train.offload_optimizer"),
])  # fmt: skip
def test_keys_that_contradict_the_run_config_are_errors(tmp_path, model, user, key, option):
    path = write(tmp_path, user)
    with pytest.raises(ConfigError) as raised:
        deepspeed_config(config("model.dtype=float32", f"train.deepspeed_config={path}"), ENV4, model)
    message = str(raised.value)
    assert message.startswith(f"train.deepspeed_config={path}: {key}=") and f"set {option}" in message
    assert key in OWNED_KEYS


@pytest.mark.parametrize("section", ["optimizer", "scheduler"])
def test_an_optimizer_or_scheduler_section_is_refused(tmp_path, model, section):
    path = write(tmp_path, {section: {"type": "AdamW", "params": {"lr": 1e-3}}})
    with pytest.raises(ConfigError, match=rf"train.deepspeed_config={path}: the '{section}' section would replace"):
        deepspeed_config(config(f"train.deepspeed_config={path}"), ENV4, model)


def test_unreadable_user_json_is_named(tmp_path, model):
    path = write(tmp_path, "{not json")
    with pytest.raises(ConfigError, match=rf"train.deepspeed_config={path}: not valid JSON"):
        deepspeed_config(config(f"train.deepspeed_config={path}"), ENV4, model)
    path = write(tmp_path, "[1, 2]")
    with pytest.raises(ConfigError, match="the top level must be a JSON object"):
        deepspeed_config(config(f"train.deepspeed_config={path}"), ENV4, model)


@pytest.mark.parametrize("overrides,message", [
    (["train.strategy=fsdp2", "train.offload_optimizer=cpu"],
     "override 'train.offload_optimizer=cpu': train.offload_optimizer=cpu does nothing with train.strategy='fsdp2'"),
    (["train.strategy=ddp", "train.deepspeed_stage=3"],
     "override 'train.deepspeed_stage=3': train.deepspeed_stage=3 does nothing with train.strategy='ddp'"),
    (["train.strategy=deepspeed", "train.offload_params=cpu"],
     "override 'train.offload_params=cpu': train.offload_params=cpu needs train.deepspeed_stage=3"),
    (["train.strategy=deepspeed", "train.deepspeed_stage=3", "model.quantize_llm=nf4"],
     "override 'model.quantize_llm=nf4': train.deepspeed_stage=3 with model.quantize_llm=nf4"),
    (["train.strategy=deepspeed", "train.deepspeed_config=/no/such.json"],
     "override 'train.deepspeed_config=/no/such.json': train.deepspeed_config=/no/such.json: no such file"),
])  # fmt: skip
def test_config_rules(overrides, message):
    with pytest.raises(ConfigError) as raised:
        load_config(None, overrides)
    assert str(raised.value).startswith(message), str(raised.value)


def test_deepspeed_loads_with_its_options():
    cfg = load_config(None, ["train.strategy=deepspeed", "train.deepspeed_stage=3", "train.offload_optimizer=cpu",
                             "train.offload_params=cpu"])  # fmt: skip
    assert (cfg.train.deepspeed_stage, cfg.train.offload_optimizer, cfg.train.offload_params) == (3, "cpu", "cpu")


def test_deepspeed_missing_is_a_config_error_that_names_the_fix(monkeypatch):
    """The strategy imports DeepSpeed before it creates the process group (its backend would hold
    the group otherwise): without DeepSpeed that is a clear error, and no group is created."""
    import sys

    import torch.distributed as dist

    from pefomed.engine.distributed import init_distributed

    monkeypatch.setitem(sys.modules, "deepspeed", None)
    with pytest.raises(ConfigError, match=r"train\.strategy=deepspeed needs DeepSpeed.*pefomed\[deepspeed\]"):
        init_distributed("cpu", "deepspeed")
    assert not dist.is_initialized()
