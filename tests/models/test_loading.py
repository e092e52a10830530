"""models.loading: every checkpoint format round-trips; meta-device loads leave no meta tensor."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pefomed.errors import UserError
from pefomed.models.loading import (
    CheckpointError,
    CheckpointNotFoundError,
    iter_state_dict,
    load_into,
    meta_tensor_names,
    read_state_dict,
)


def tensors():
    return {"a.weight": torch.randn(3, 4), "b.bias": torch.randn(5), "steps": torch.arange(4)}


def write_sharded_safetensors(folder, sd):
    folder.mkdir()
    names = sorted(sd)
    shard_of = {n: f"model-0000{1 + i % 2}-of-00002.safetensors" for i, n in enumerate(names)}
    for shard in set(shard_of.values()):
        save_file({n: sd[n] for n in names if shard_of[n] == shard}, str(folder / shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shard_of}))
    return folder


def write_sharded_bin(folder, sd):
    folder.mkdir()
    torch.save({"a.weight": sd["a.weight"]}, folder / "pytorch_model-00001-of-00002.bin")
    torch.save({k: v for k, v in sd.items() if k != "a.weight"}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {k: "pytorch_model-00002-of-00002.bin" for k in sd} | {"a.weight": "pytorch_model-00001-of-00002.bin"}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def all_formats(tmp_path, sd):
    single = tmp_path / "x.safetensors"
    save_file(sd, str(single))
    in_folder = tmp_path / "folder"
    in_folder.mkdir()
    save_file(sd, str(in_folder / "model.safetensors"))
    torch.save({"model": sd}, tmp_path / "lavis.pth")  # LAVIS / MiniGPT-v2 layout
    torch.save({"state_dict": sd, "epoch": 3}, tmp_path / "trainer.pt")
    torch.save(sd, tmp_path / "plain.bin")
    bin_folder = tmp_path / "bin_folder"
    bin_folder.mkdir()
    torch.save(sd, bin_folder / "pytorch_model.bin")
    open_clip = tmp_path / "open_clip"  # one non-standard file name, as BiomedCLIP ships it
    open_clip.mkdir()
    torch.save(sd, open_clip / "open_clip_pytorch_model.bin")
    return {
        "safetensors": single, "folder": in_folder, "lavis_pth": tmp_path / "lavis.pth",
        "state_dict_pt": tmp_path / "trainer.pt", "bin": tmp_path / "plain.bin", "bin_folder": bin_folder,
        "one_file_folder": open_clip,
        "sharded_safetensors": write_sharded_safetensors(tmp_path / "sharded", sd),
        "sharded_bin": write_sharded_bin(tmp_path / "sharded_bin", sd),
    }


def test_every_format_round_trips(tmp_path):
    sd = tensors()
    for kind, path in all_formats(tmp_path, sd).items():
        got = read_state_dict(path)
        assert got.keys() == sd.keys(), kind
        for k in sd:
            assert got[k].dtype == sd[k].dtype and torch.equal(got[k], sd[k]), (kind, k)


def test_sharded_iteration_reads_one_shard_at_a_time(tmp_path):
    folder = write_sharded_safetensors(tmp_path / "s", tensors())
    it = iter_state_dict(folder)
    first_name, _ = next(it)
    # The second shard is opened only when reached: removing it now fails later, not earlier.
    (folder / "model-00002-of-00002.safetensors").unlink()
    names = [first_name]
    with pytest.raises(CheckpointNotFoundError, match="model-00002-of-00002.safetensors: missing"):
        for name, _ in it:
            names.append(name)
    assert names == ["a.weight", "steps"]  # shard 1 holds the 1st and 3rd sorted names


def test_missing_shard_is_named(tmp_path):
    folder = write_sharded_safetensors(tmp_path / "s", tensors())
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json names shard\(s\) that are missing.*model-00002-of-00002.safetensors"):
        read_state_dict(folder)
    with pytest.raises(FileNotFoundError):  # also an OS error about a path, for callers that catch those
        read_state_dict(folder)


def test_nothing_loadable_names_the_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("no weights here")
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}: no weights found"):
        read_state_dict(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere: no such checkpoint"):
        read_state_dict(tmp_path / "nowhere")
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="weight_map"):
        read_state_dict(tmp_path)


class Evil:
    """Any non-tensor object: weights_only loading must refuse to build it."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": {"w": torch.ones(1)}, "obj": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="evil.pth: cannot be read with torch.load.weights_only=True.: it holds objects"):
        read_state_dict(tmp_path / "evil.pth")


LEGACY = {"w": torch.arange(6.0).reshape(2, 3), "steps": torch.arange(4)}


def damaged_files(tmp_path):
    """Files that look like checkpoints by name and are not: cut short, random bytes, empty."""
    save_file(tensors(), str(tmp_path / "good.safetensors"))
    torch.save(tensors(), tmp_path / "good.pth")
    legacy = tmp_path / "legacy.pth"  # the pre-zip torch.save format: readable, just not mmap-able
    torch.save(LEGACY, legacy, _use_new_zipfile_serialization=False)
    files = {}
    for suffix in ("safetensors", "pth"):
        data = (tmp_path / f"good.{suffix}").read_bytes()
        for kind, content in (("truncated", data[: len(data) // 2]), ("header-only", data[:40]),
                              ("garbage", bytes(range(256)) * 4), ("empty", b"")):  # fmt: skip
            path = tmp_path / f"{kind}.{suffix}"
            path.write_bytes(content)
            files[path.name] = path
    return files, legacy


def test_damaged_files_are_checkpoint_errors_that_name_the_file(tmp_path):
    files, legacy = damaged_files(tmp_path)
    for name, path in files.items():
        with pytest.raises(CheckpointError) as err:
            read_state_dict(path)
        message = str(err.value)
        assert message.startswith(f"{path}: not a readable checkpoint, the file is truncated or corrupt"), name
        assert isinstance(err.value, UserError)
    got = read_state_dict(legacy)
    assert got.keys() == LEGACY.keys() and all(torch.equal(got[k], v) for k, v in LEGACY.items())


def test_damaged_shard_is_named_when_it_is_reached(tmp_path):
    folder = write_sharded_safetensors(tmp_path / "s", tensors())
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-7])
    with torch.device("meta"):
        model = nn.Sequential()
    with pytest.raises(CheckpointError, match=f"{shard}: not a readable checkpoint"):
        load_into(model, iter_state_dict(folder), strict=False)


class WithRope(nn.Module):
    """A linear layer beside a non-persistent buffer that must be recomputed after a meta build."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(4, 3)
        self.register_buffer("counts", torch.zeros(2, dtype=torch.long))
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    @staticmethod
    def compute_inv_freq(device=None):
        return 1.0 / (10000 ** (torch.arange(0, 8, 2, device=device, dtype=torch.float32) / 8))

    def reset_buffers(self):
        self.inv_freq = self.compute_inv_freq(self.inv_freq.device)


def test_meta_load_materializes_everything_and_recomputes_buffers(tmp_path):
    sd = {"proj.weight": torch.randn(3, 4), "proj.bias": torch.randn(3), "counts": torch.tensor([1, 2])}
    save_file(sd, str(tmp_path / "m.safetensors"))
    with torch.device("meta"):
        model = WithRope()
    load_into(model, iter_state_dict(tmp_path / "m.safetensors"), dtype=torch.float64)
    assert meta_tensor_names(model) == []
    assert model.proj.weight.dtype == torch.float64 and model.counts.dtype == torch.long
    assert torch.equal(model.proj.weight, sd["proj.weight"].double())
    assert torch.equal(model.counts, sd["counts"])
    expected = 1.0 / (10000 ** (torch.tensor([0.0, 2.0, 4.0, 6.0], dtype=torch.float64) / 8))
    assert torch.allclose(model.inv_freq.double(), expected, rtol=1e-6)
    assert model.proj.weight.requires_grad


def test_shape_mismatch_lists_every_tensor_and_the_hint():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    bad = {"0.weight": torch.randn(5, 4), "0.bias": torch.randn(5), "1.weight": torch.randn(2, 3), "1.bias": torch.randn(2)}

    def hint(name, got, want):
        return f"config says width={want[0]} but {name} is {list(got)}"

    with pytest.raises(CheckpointError) as err:
        load_into(model, bad, source="ckpt.safetensors", shape_hint=hint)
    message = str(err.value)
    assert message.startswith("ckpt.safetensors: 2 tensor(s) have the wrong shape")
    assert r"0.weight is [5, 4] in the checkpoint but [3, 4] in the model: config says width=3" in message
    assert "0.bias is [5]" in message and "1.weight" not in message


def test_missing_and_unexpected_keys_are_listed_separately():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(CheckpointError, match=r"ckpt.pth: .*missing from the checkpoint \['0.bias'\]"):
        load_into(model, {"0.weight": torch.randn(3, 4)}, source="ckpt.pth")
    extra = {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3), "head.weight": torch.randn(1)}
    with pytest.raises(CheckpointError, match=r"not in the model \['head.weight'\].*ignore="):
        load_into(model, extra)
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3))
    load_into(model, extra, ignore=[r"^head\."])
    assert meta_tensor_names(model) == []
    with torch.device("meta"):
        loose = nn.Sequential(nn.Linear(4, 3))
    report = load_into(loose, {"0.weight": torch.randn(3, 4), "x": torch.ones(1)}, strict=False)
    assert report.missing == ["0.bias"] and report.unexpected == ["x"]


def test_rename_drops_and_maps_keys():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3))
    sd = {"visual.proj.weight": torch.randn(3, 4), "visual.proj.bias": torch.randn(3), "text.w": torch.randn(2)}

    def rename(key):
        return key.replace("visual.proj.", "0.") if key.startswith("visual.") else None

    load_into(model, sd, rename=rename)
    assert torch.equal(model[0].weight, sd["visual.proj.weight"])


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.head = nn.Linear(4, 6, bias=False)
        self.head.weight = self.embed.weight


def test_tied_weights_stay_tied_after_a_meta_load():
    with torch.device("meta"):
        model = Tied()
    weight = torch.randn(6, 4)
    load_into(model, {"embed.weight": weight})
    assert model.head.weight is model.embed.weight and torch.equal(model.head.weight, weight)
    with torch.device("meta"):
        model = Tied()
    load_into(model, {"head.weight": weight})  # either name of a tied pair fills both
    assert model.head.weight is model.embed.weight and not model.embed.weight.is_meta


class StoresRounded(nn.Module):
    """A layer that keeps its weight in its own format (here: fp16), set as each tensor arrives."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(3, 4), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(3))
        self.seen = []

    def convert_loaded(self, name, tensor):
        self.seen.append((name, tensor.dtype))
        return tensor.half() if name == "weight" else tensor


def test_owner_module_converts_each_tensor_as_it_is_assigned():
    with torch.device("meta"):
        model = nn.Sequential(StoresRounded(), nn.Linear(3, 2))
    sd = {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3), "1.weight": torch.randn(2, 3), "1.bias": torch.randn(2)}
    load_into(model, sd, dtype=torch.float64)
    layer = model[0]
    assert layer.seen == [("weight", torch.float64), ("bias", torch.float64)]  # after the cast, once each
    assert layer.weight.dtype == torch.float16 and not layer.weight.requires_grad
    assert torch.equal(layer.weight, sd["0.weight"].double().half())
    assert layer.bias.dtype == torch.float64 and layer.bias.requires_grad
    assert model[1].weight.dtype == torch.float64


def test_allowed_missing_names_stay_on_meta_for_the_caller():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    sd = {"0.weight": torch.randn(3, 4), "0.bias": torch.randn(3)}
    with pytest.raises(CheckpointError, match=r"missing from the checkpoint \['1.weight', '1.bias'\]"):
        load_into(model, sd)
    load_into(model, sd, allow_missing=[r"^1\."])
    assert meta_tensor_names(model) == ["1.weight", "1.bias"]
    assert meta_tensor_names(model, allow=[r"^1\."]) == []
