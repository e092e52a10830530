import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from models.loading import CheckpointError, load_into, read_state_dict


def tensors():
    return {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(5)}


def test_formats_round_trip(tmp_path):
    sd = tensors()
    save_file(sd, str(tmp_path / "x.safetensors"))
    torch.save({"model": sd}, tmp_path / "lavis.pth")  # LAVIS / MiniGPT-v2 layout
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    save_file({"a.weight": sd["a.weight"]}, str(shard_dir / "model-00001-of-00002.safetensors"))
    save_file({"b.bias": sd["b.bias"]}, str(shard_dir / "model-00002-of-00002.safetensors"))
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a.weight": "model-00001-of-00002.safetensors", "b.bias": "model-00002-of-00002.safetensors"}}))
    for path in (tmp_path / "x.safetensors", tmp_path / "lavis.pth", shard_dir):
        got = read_state_dict(path)
        assert got.keys() == sd.keys()
        for k in sd:
            assert torch.equal(got[k], sd[k])


def test_missing_shard_is_named(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="gone.safetensors"):
        read_state_dict(tmp_path)


class Evil:
    """Any non-tensor object: weights_only loading must refuse to build it."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "obj": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        read_state_dict(tmp_path / "evil.pth")


def test_meta_load_assigns_and_checks(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3))
    sd = {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3)}
    load_into(model, sd, dtype=torch.float64)
    assert model[0].weight.dtype == torch.float64 and not model[0].weight.is_meta
    with torch.device("meta"):
        other = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match=r"0.weight has shape \[2, 4\]"):
        load_into(other, {"0.weight": torch.randn(2, 4), "0.bias": torch.randn(3)}, source="ckpt.safetensors")
    with pytest.raises(CheckpointError, match="missing from the checkpoint.*0.bias"):
        load_into(other, {"0.weight": torch.randn(3, 4)})
