import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pefomed.engine.config import Config, ConfigError, load_config, save_config


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_and_overrides(tmp_path):
    path = write(tmp_path, "lora:\n  r: 8\n  target_modules: [q_proj, k_proj]\noptim:\n  lr: 1e-4\n")
    cfg = load_config(path, ["lora.alpha=32", "train.max_steps=7", "optim.betas=[0.9, 0.95]"])
    assert cfg.lora.r == 8 and cfg.lora.alpha == 32.0
    assert cfg.lora.target_modules == ["q_proj", "k_proj"]
    assert cfg.optim.lr == pytest.approx(1e-4)  # YAML reads 1e-4 as a string; it is coerced
    assert cfg.train.max_steps == 7
    assert cfg.optim.betas == (0.9, 0.95)


def test_unknown_key_names_key_and_file(tmp_path):
    path = write(tmp_path, "lora:\n  rank: 8\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "lora.rank" in message and str(path) in message and "known keys here: r, alpha" in message


def test_typo_gets_a_suggestion():
    with pytest.raises(ConfigError, match="did you mean 'target_modules'"):
        load_config(None, ["lora.target_module=[q_proj]"])


def test_unknown_override_key():
    with pytest.raises(ConfigError, match="train.max_step"):
        load_config(None, ["train.max_step=3"])


def test_bad_type_and_choice(tmp_path):
    with pytest.raises(ConfigError, match="train.max_steps must be int"):
        load_config(None, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match="not one of"):
        load_config(None, ["train.strategy=zero"])


def test_dataset_specs_and_required_fields(tmp_path):
    cfg = load_config(None, ["data.train=[{kind: vqa_rad, path: /x}]"])
    assert cfg.data.train[0].kind == "vqa_rad" and cfg.data.train[0].split == "train"
    with pytest.raises(ConfigError, match="missing required key"):
        load_config(None, ["data.train=[{kind: vqa_rad}]"])


def test_round_trip(tmp_path):
    cfg = load_config(None, ["lora.r=4", "data.train=[{kind: caption, path: a.json}]"])
    save_config(cfg, tmp_path / "out.yaml")
    again = load_config(tmp_path / "out.yaml")
    assert again == cfg
    assert isinstance(again, Config)


def test_malformed_yaml(tmp_path):
    path = write(tmp_path, "lora: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


# ---------------------------------------------------------------- every option is checked at load time

# Each numeric option with a value just outside its allowed range and the range the error must
# state, written out from the issue rather than read from engine.config.RANGES.
OUT_OF_RANGE = [
    ("train.micro_batch_size=0", ">= 1"),
    ("train.grad_accum=0", ">= 1"),
    ("train.max_steps=0", ">= 1"),
    ("train.log_every=0", ">= 1"),
    ("train.save_every=-1", ">= 0"),
    ("train.seed=-1", ">= 0"),
    ("optim.lr=0", "> 0"),
    ("optim.min_lr=-1e-9", ">= 0"),
    ("optim.weight_decay=-0.01", ">= 0"),
    ("optim.betas=[1.0, 0.999]", "in [0, 1)"),
    ("optim.betas=[0.9, -0.5]", "in [0, 1)"),
    ("optim.eps=0", "> 0"),
    ("optim.warmup_steps=-1", ">= 0"),
    ("optim.grad_clip=-1", ">= 0"),
    ("lora.r=0", ">= 1"),
    ("lora.alpha=0", "> 0"),
    ("lora.dropout=1.0", "in [0, 1)"),
    ("lora.dropout=-0.1", "in [0, 1)"),
    ("data.max_length=0", ">= 1"),
    ("data.max_bad_fraction=1.5", "in [0, 1]"),
    ("data.max_bad_fraction=-0.1", "in [0, 1]"),
    ("data.short_prompt_prob=1.01", "in [0, 1]"),
    ("data.num_workers=-1", ">= 0"),
    ("data.synthetic_train=0", ">= 1"),
    ("data.synthetic_test=0", ">= 1"),
    ("model.image_size=0", ">= 1"),
    ("model.group=0", ">= 1"),
    ("model.feature_cache_mb=0", ">= 1"),
    ("data.pack_tokens=0", ">= 1"),
    ("train.ac_every=0", ">= 1"),
    ("eval.batch_size=0", ">= 1"),
    ("eval.max_new_tokens=0", ">= 1"),
    ("align.steps=-1", ">= 0"),
    ("align.batch_size=1", ">= 2"),
    ("align.lr=0", "> 0"),
    ("align.temperature=0", "> 0"),
]

# The bounds themselves, where they are allowed, load.
AT_THE_BOUND = [
    "train.save_every=0", "train.seed=0", "optim.min_lr=0", "optim.weight_decay=0", "optim.betas=[0, 0.999]",
    "optim.warmup_steps=0", "optim.grad_clip=0", "lora.r=1", "lora.dropout=0", "data.max_bad_fraction=0",
    "data.max_bad_fraction=1", "data.short_prompt_prob=1", "data.num_workers=0", "train.micro_batch_size=1",
    "data.max_length=1", "eval.batch_size=1", "eval.max_new_tokens=1", "data.synthetic_train=1",
    "align.steps=0", "align.batch_size=2",
]


@pytest.mark.parametrize("item,allowed", OUT_OF_RANGE, ids=[item for item, _ in OUT_OF_RANGE])
def test_out_of_range_override_is_refused_naming_the_override(item, allowed):
    key, _, value = item.partition("=")
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    message = str(err.value)
    assert message.startswith(f"override {item!r}: "), message
    assert "is out of range" in message and message.endswith(f"it must be {allowed}"), message
    assert "\n" not in message


def test_every_ranged_option_has_a_case_above():
    from pefomed.engine.config import RANGES

    assert {item.partition("=")[0] for item, _ in OUT_OF_RANGE} == set(RANGES)


@pytest.mark.parametrize("item", AT_THE_BOUND)
def test_values_at_an_allowed_bound_load(item):
    key, _, value = item.partition("=")
    cfg = load_config(None, [item])
    section, name = key.split(".")
    assert getattr(getattr(cfg, section), name) == (tuple(yaml.safe_load(value)) if value.startswith("[") else yaml.safe_load(value))


def test_error_in_the_file_names_the_file_and_an_override_can_fix_it(tmp_path):
    path = write(tmp_path, "train:\n  micro_batch_size: 0\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["train.max_steps=3"])
    assert str(err.value).startswith(f"{path}: train.micro_batch_size=0 is out of range")
    # what is checked is the final value: an override that repairs the file's value loads
    assert load_config(path, ["train.micro_batch_size=2"]).train.micro_batch_size == 2


def test_a_rule_across_options_blames_the_latest_origin(tmp_path):
    path = write(tmp_path, "optim:\n  lr: 1.0e-3\n  min_lr: 1.0e-2\n")
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}: optim.min_lr=0.01 is above optim.lr=0.001"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"^override 'optim.lr=1e-7': optim.min_lr=1e-06 is above optim.lr=1e-07"):
        load_config(None, ["optim.lr=1e-7"])
    with pytest.raises(ConfigError, match=r"^override 'optim.min_lr=0.1': "):
        load_config(None, ["optim.lr=0.01", "optim.min_lr=0.1"])
    assert load_config(path, ["optim.min_lr=1e-4"]).optim.min_lr == pytest.approx(1e-4)


def test_errors_in_overrides_name_the_override_not_the_file(tmp_path):
    path = write(tmp_path, "lora:\n  r: 8\n")
    with pytest.raises(ConfigError, match=r"^override 'train.max_step=3': unknown key 'train.max_step'"):
        load_config(path, ["train.max_step=3"])
    with pytest.raises(ConfigError, match=r"^override 'train.max_steps=abc': train.max_steps must be int"):
        load_config(path, ["train.max_steps=abc"])
    with pytest.raises(ConfigError, match=r"^override 'data.train=\[\{kind: ': the value is not valid YAML"):
        load_config(path, ["data.train=[{kind: "])
    with pytest.raises(ConfigError, match=r"^override 'data.train=\[\{kind: vqa_rad\}\]': missing required key\(s\) path"):
        load_config(path, ["data.train=[{kind: vqa_rad}]"])
    with pytest.raises(ConfigError, match=r"^override 'optim.lr=.inf': optim.lr must be a finite number"):
        load_config(path, ["optim.lr=.inf"])
    with pytest.raises(ConfigError, match=r"^override 'optim.lr=.nan': optim.lr must be a finite number"):
        load_config(path, ["optim.lr=.nan"])


def test_override_into_an_empty_section(tmp_path):
    path = write(tmp_path, "train:\nlora:\n  r: 4\n")
    assert load_config(path, ["train.max_steps=9"]).train.max_steps == 9


def test_options_not_supported_yet_are_refused(monkeypatch):
    # Every value a Literal names is implemented today; the mechanism stays for the next one.
    from pefomed.engine import config

    assert config.NOT_SUPPORTED_YET == {}
    monkeypatch.setitem(config.NOT_SUPPORTED_YET, "model.quantize_llm", (("nf4",), "none"))
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.quantize_llm=nf4"])
    assert str(err.value) == "override 'model.quantize_llm=nf4': model.quantize_llm='nf4' is not supported yet; use none"


@pytest.mark.parametrize("backend,package", [("flash_attention_2", "flash_attn"), ("xformers", "xformers")])
def test_attention_backend_is_refused_only_when_its_package_does_not_import(monkeypatch, backend, package):
    import sys
    import types

    item = f"model.attn_implementation={backend}"
    monkeypatch.setitem(sys.modules, package, None)  # None in sys.modules: the import fails
    monkeypatch.setitem(sys.modules, f"{package}.ops", None)
    with pytest.raises(ConfigError) as err:
        load_config(None, [item])
    message = str(err.value)
    assert message.startswith(f"override {item!r}: model.attn_implementation={backend} needs the {package} package")
    assert "pip install 'pefomed[gpu]'" in message and "or use model.attn_implementation=sdpa" in message
    fake = types.ModuleType(package)
    monkeypatch.setitem(sys.modules, package, fake)
    monkeypatch.setitem(sys.modules, f"{package}.ops", types.ModuleType(f"{package}.ops"))
    assert load_config(None, [item]).model.attn_implementation == backend


def test_deepspeed_stage_without_deepspeed_is_refused():
    with pytest.raises(ConfigError, match=r"train.deepspeed_stage=3 does nothing with train.strategy='ddp'"):
        load_config(None, ["train.strategy=ddp", "train.deepspeed_stage=3"])
    assert load_config(None, ["train.strategy=fsdp2"]).train.deepspeed_stage == 2  # the default is no claim


def test_prompt_templates_are_checked_against_the_prompt_module():
    from pefomed.engine.data.prompts import TEMPLATES, build_prompt

    assert set(TEMPLATES) == {"minigptv2", "expert", "short", "smollm2"}
    for template in TEMPLATES:  # every accepted name builds a prompt, in its model's chat format
        cfg = load_config(None, [f"data.template={template}", f"eval.prompt={template}"])
        prompt = build_prompt("vqa", "is it?", cfg.data.template)
        if template == "smollm2":
            assert prompt.endswith("is it?\nAnswer the question using a single word or phrase.<|im_end|>\n"
                                   "<|im_start|>assistant\n")
        else:
            assert prompt.endswith("is it? [/INST]")
    for key in ("data.template", "eval.prompt"):
        with pytest.raises(ConfigError) as err:
            load_config(None, [f"{key}=minigpt2"])
        assert str(err.value) == (f"override '{key}=minigpt2': {key}='minigpt2' is not one of: minigptv2, expert, "
                                  "short, smollm2; did you mean 'minigptv2'?")


def test_dataset_kinds_and_splits_are_checked_against_the_readers():
    from pefomed.engine.data.readers import READERS

    with pytest.raises(ConfigError) as err:
        load_config(None, ["data.eval=[{kind: coco, path: /x}]"])
    message = str(err.value)
    assert message.startswith("override 'data.eval=[{kind: coco, path: /x}]': data.eval[0].kind='coco' is not one of: ")
    assert all(kind in message for kind in READERS) and "mimic" in message
    assert load_config(None, ["data.train=[{kind: mimic, path: /x/annotation.json}]"]).data.train[0].kind == "mimic"
    with pytest.raises(ConfigError, match=r"data.train\[1\].split='val': dataset kind vqa_rad has the splits train, test$"):
        load_config(None, ["data.train=[{kind: slake, path: /s, split: validation}, {kind: vqa_rad, path: /v, split: val}]"])
    cfg = load_config(None, ["data.train=[{kind: roco, path: /r, split: validation}, {kind: iu_xray, path: /i, split: val}]"])
    assert [s.split for s in cfg.data.train] == ["validation", "val"]


def test_free_names_are_checked_against_what_exists():
    with pytest.raises(ConfigError, match=r"^override 'model.vision=tiyn': model.vision='tiyn' is not one of: .*tiny.*"
                                          r"; did you mean 'tiny'\?$"):
        load_config(None, ["model.vision=tiyn"])
    with pytest.raises(ConfigError, match=r"model.llm='huge' with model.random_init=true must name a built-in config"):
        load_config(None, ["model.random_init=true", "model.llm=huge"])
    assert load_config(None, ["model.llm=/models/Llama-2-7b-chat-hf"]).model.llm.endswith("chat-hf")  # a folder: not a name
    with pytest.raises(ConfigError, match=r"^override 'lora.target_modules=\[\]': lora.target_modules is empty"):
        load_config(None, ["lora.target_modules=[]"])


def test_image_size_must_fit_the_patch_grid_and_group():
    # model.vision=tiny has 8-pixel patches
    with pytest.raises(ConfigError, match=r"model.image_size=4 is smaller than the patch size 8"):
        load_config(None, ["model.vision=tiny", "model.image_size=4"])
    with pytest.raises(ConfigError, match=r"model.image_size=24 gives 3x3=9 patches of 8 px, which model.group=4 does not"):
        load_config(None, ["model.vision=tiny", "model.image_size=24"])
    with pytest.raises(ConfigError, match=r"group_layout=spatial .* needs model.group=4 \(got 2\)"):
        load_config(None, ["model.vision=tiny", "model.image_size=32", "model.group=2", "model.group_layout=spatial"])
    assert load_config(None, ["model.vision=tiny", "model.image_size=24", "model.group=3"]).model.group == 3
    with pytest.raises(ConfigError, match=r"model.image_size=8: the synthetic dataset needs at least 16 px"):
        load_config(None, ["model.vision=tiny", "model.image_size=8", "model.group=1",
                           "data.train=[{kind: synthetic, path: /d}]"])


def test_shipped_configs_load_and_validate_accepts_them_again():
    from pefomed.engine.config import validate

    for path in sorted(Path(__file__).resolve().parents[2].joinpath("configs").glob("*.yaml")):
        assert validate(load_config(path)) is not None
    bad = Config()
    bad.train.micro_batch_size = 0
    with pytest.raises(ConfigError, match=r"^<config>: train.micro_batch_size=0 is out of range"):
        validate(bad)


def _pefomed() -> list[str]:
    script = Path(sys.executable).with_name("pefomed")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pefomed"]


def test_cli_reports_a_bad_override_in_one_line_and_exits_2():
    root = Path(__file__).resolve().parents[2]
    command = _pefomed() + ["train", "--config", "configs/demo.yaml", "train.micro_batch_size=0"]
    done = subprocess.run(command, cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines == ["error: override 'train.micro_batch_size=0': train.micro_batch_size=0 is out of range: it must be >= 1"]
    debug = subprocess.run(command + ["--debug"], cwd=root, capture_output=True, text=True, timeout=300)
    assert debug.returncode not in (0, 2)
    assert "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError: override 'train.micro_batch_size=0': train.micro_batch_size=0 is out of range" in debug.stderr
