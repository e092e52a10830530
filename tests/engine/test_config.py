import pytest

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
