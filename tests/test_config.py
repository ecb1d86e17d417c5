"""The config tree: YAML + overrides, errors that name the key and its source, the resolved file round
trip, the commented tree."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from xlsr_jax.config import (Config, ConfigError, DataConfig, describe_config, from_dict, load_config,
                             merge_overrides, save_config)
from xlsr_jax.errors import UserError

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


# Every shipped run config (sweep_demo.yaml is a search space, read by `xlsr-jax sweep --space`).
@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml") if p.name != "sweep_demo.yaml"))
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert isinstance(config, Config)
    assert config.data.train and config.data.eval
    if name.startswith("pretrain"):  # and pass `xlsr-jax pretrain`'s refusals
        from xlsr_jax.pretrain.objective import Pretraining

        Pretraining().check(config)


def test_common_voice_recipe_matches_the_seed_script():
    c = load_config(CONFIGS / "common_voice_tr.yaml")
    assert c.model.pretrained == "facebook/wav2vec2-large-xlsr-53"
    assert (c.optim.learning_rate, c.optim.warmup_steps) == (3e-4, 500)
    assert (c.train.per_device_batch_size, c.train.num_train_epochs, c.train.precision) == (16, 5.0, "bfloat16")
    assert (c.model.feat_proj_dropout, c.model.layerdrop) == (0.0, 0.1)
    assert c.model.remat_policy == "full" and c.model.freeze_feature_encoder and c.model.scan_layers


def test_overrides_are_parsed_as_yaml_and_typed():
    c = load_config(CONFIGS / "demo.yaml", [
        "train.max_steps=7", "optim.learning_rate=5e-4", "data.train=cv:/data/tr:train+dev",
        "data.eval=[cv:/a:dev, manifest:/b/m.tsv]", "model.scan_layers=false",
        "mesh.rules=[['.*q_proj/kernel', [null, fsdp]]]", "data.max_train_examples=null",
    ])
    assert c.train.max_steps == 7 and isinstance(c.train.max_steps, int)
    assert c.optim.learning_rate == 5e-4  # YAML 1.1 reads 5e-4 as a string; still a float here
    assert c.data.train == ("cv:/data/tr:train+dev",)
    assert c.data.eval == ("cv:/a:dev", "manifest:/b/m.tsv")
    assert c.model.scan_layers is False
    assert c.mesh.rules == ((".*q_proj/kernel", (None, "fsdp")),)
    assert c.data.max_train_examples is None


def test_token_budget_key_is_off_by_default_and_a_number():
    assert load_config(CONFIGS / "demo.yaml").train.per_device_audio_seconds is None
    c = load_config(CONFIGS / "demo.yaml", ["train.per_device_audio_seconds=200"])
    assert c.train.per_device_audio_seconds == 200.0 and isinstance(c.train.per_device_audio_seconds, float)


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown key train.max_step; did you mean 'max_steps'?"),
    ("trian.max_steps=3", "unknown key trian; did you mean 'train'?"),
    ("optim.learning_rate=fast", "optim.learning_rate: expected a number, got 'fast'"),
    ("train.per_device_batch_size=2.5", "train.per_device_batch_size: expected an integer, got 2.5"),
    ("train.precision=fp8", "train.precision must be float32 or bfloat16"),
    ("train.per_device_audio_seconds=0", "train.per_device_audio_seconds must be > 0 (and finite) or null"),
    ("train.per_device_audio_seconds=.inf", "train.per_device_audio_seconds must be > 0 (and finite) or null"),
    ("model.mask_time_prob=1.5", "model.mask_time_prob must be in [0, 1]"),
    ("model.scan_layers=maybe", "model.scan_layers: expected true or false, got 'maybe'"),
    ("model.remat_policy=most", "model.remat_policy must be one of none, full, dots_saveable, "
                                "dots_with_no_batch_dims_saveable"),
    ("model.attention=flash", "model.attention must be one of auto, xla, cudnn, plain"),
    ("mesh.rules=[[a, [1]]]", "mesh.rules[0][1][0]: expected a string, got 1"),
    ("checkpoint.best_metric=wer",
     "checkpoint.best_metric must be null or an eval/ metric (eval/wer, eval/cer, eval/loss)"),
    ("checkpoint.best_mode=lowest", "checkpoint.best_mode must be min or max"),
])
def test_an_override_error_names_the_override_not_the_file(override, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", ["optim.warmup_steps=10", override])
    assert str(err.value) == f"--set {override}: {message}"


@pytest.mark.parametrize("overrides, message", [
    (["train.max_steps"], "--set train.max_steps: expected section.key=value"),
    (["train=3", "train.max_steps=3"], "--set train.max_steps=3: train is not a section"),
])
def test_a_malformed_override_names_itself(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml", overrides)
    assert str(err.value) == message


@pytest.mark.parametrize("text, message", [
    ("train: {max_step: 3}", "unknown key train.max_step; did you mean 'max_steps'?"),
    ("train: {precision: fp8}", "train.precision must be float32 or bfloat16"),
    ("model: {pretrained: null}", "model.architecture is required when model.pretrained is not set"),
    ("data: {min_duration_s: 30}", "data.max_duration_s must be greater than data.min_duration_s >= 0"),
    ("data: {max_skip_fraction: 1.5}", "data.max_skip_fraction must be in [0, 1]"),
    ("data: {max_skip_fraction: -0.1}", "data.max_skip_fraction must be in [0, 1]"),
])
def test_a_file_error_names_the_file_even_with_overrides(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["optim.learning_rate=1e-3", "train.seed=1"])
    assert str(err.value) == f"{path}: {message}"


def test_a_file_that_is_not_yaml_names_the_file_and_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  max_steps: [1,\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:3: not valid YAML \(expected the node content"):
        load_config(path)


def test_a_cross_field_error_names_each_source_of_its_keys(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(CONFIGS / "demo.yaml",
                    ["train.max_steps=-1", "optim.learning_rate=1", "train.num_train_epochs=0"])
    assert str(err.value) == ("--set train.max_steps=-1, --set train.num_train_epochs=0: train.max_steps set "
                              "train.max_steps > 0 or train.num_train_epochs > 0")
    path = tmp_path / "run.yaml"
    path.write_text("data: {min_duration_s: 30}\n")
    with pytest.raises(ConfigError) as err:
        load_config(path, ["data.max_duration_s=25"])
    assert str(err.value) == (f"{path}, --set data.max_duration_s=25: "
                              "data.max_duration_s must be greater than data.min_duration_s >= 0")


def test_an_override_can_repair_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {pretrained: null}\ntrain: {precision: fp8}\n")
    c = load_config(path, ["model.architecture={hidden_size: 32}", "train.precision=bfloat16"])
    assert (c.model.architecture, c.train.precision) == ({"hidden_size": 32}, "bfloat16")


def test_merge_overrides_leaves_the_file_tree_alone():
    tree = {"model": {"architecture": {"hidden_size": 8}}}
    merged = merge_overrides(tree, ["model.architecture.hidden_size=16"])
    assert merged["model"]["architecture"]["hidden_size"] == 16
    assert tree == {"model": {"architecture": {"hidden_size": 8}}}


def test_config_error_is_a_user_error_and_a_value_error():
    with pytest.raises(UserError):
        load_config(None, ["train.max_step=3"])
    assert issubclass(ConfigError, ValueError)


def test_best_checkpoint_keys():
    assert (Config().checkpoint.best_metric, Config().checkpoint.best_mode) == ("eval/wer", "min")
    c = load_config(None, ["checkpoint.best_metric=null", "checkpoint.best_mode=max"])
    assert (c.checkpoint.best_metric, c.checkpoint.best_mode) == (None, "max")
    assert load_config(None, ["checkpoint.best_metric=eval/cer"]).checkpoint.best_metric == "eval/cer"


def test_from_scratch_needs_an_architecture():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.pretrained=null"])
    assert str(err.value) == ("--set model.pretrained=null: model.architecture is required when "
                              "model.pretrained is not set")


def test_resolved_config_round_trips(tmp_path):
    c = load_config(CONFIGS / "demo.yaml", ["train.max_steps=11", "data.eval=[cv:/x:dev, cv:/y:dev]"])
    save_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c


# --- describe_config ---------------------------------------------------------------------------------------

CHANGED = ["optim.learning_rate=0.001", "checkpoint.best_metric=null", "data.chars_to_ignore=\"'#\\nb\"",
           "mesh.rules=[['.*q_proj/kernel', [null, fsdp]]]", "model.architecture.extra={a: [1, 2]}"]


def _section_lines(text: str) -> dict[str, list[str]]:
    """section name -> its lines, from the commented tree."""
    sections, name = {}, None
    for line in text.splitlines():
        if line and not line.startswith((" ", "#")):
            name = line.rstrip(":")
            sections[name] = []
        elif name and line.startswith("  "):
            sections[name].append(line)
    return sections


@pytest.mark.parametrize("config", [
    Config(), load_config(CONFIGS / "demo.yaml", CHANGED), load_config(CONFIGS / "common_voice_tr.yaml"),
    dataclasses.replace(Config(), data=DataConfig(chars_to_ignore="a\nb", train=("x # y", "null"))),
])
def test_described_config_reads_back_equal(tmp_path, config):
    text = describe_config(config)
    assert from_dict(yaml.safe_load(text)) == config
    (tmp_path / "described.yaml").write_text(text)
    assert load_config(tmp_path / "described.yaml") == config


def test_every_key_is_described_under_its_section_header():
    text = describe_config(load_config(CONFIGS / "demo.yaml", CHANGED))
    sections, lines = _section_lines(text), text.splitlines()
    assert list(sections) == [s.name for s in dataclasses.fields(Config)]
    for section in dataclasses.fields(Config):
        assert section.metadata["help"]
        assert lines[lines.index(f"{section.name}:") - 1] == f"# {section.name}: {section.metadata['help']}"
        for field in dataclasses.fields(type(getattr(Config(), section.name))):
            line = next(line for line in sections[section.name] if line.startswith(f"  {field.name}:"))
            assert field.metadata["help"], f"{section.name}.{field.name} has no help"
            assert f"  # {field.metadata['help']}" in line, line


def test_a_changed_value_shows_its_default():
    lines = describe_config(load_config(CONFIGS / "demo.yaml", CHANGED)).splitlines()

    def shown(start: str, end: str) -> bool:
        return any(line.startswith(start) and line.endswith(end) for line in lines)

    assert "  learning_rate: 0.001  # peak AdamW learning rate (default: 0.0003)" in lines
    assert shown("  best_metric: null  # ", "(default: eval/wer)")
    assert shown("  pretrained: null  # ", "(default: facebook/wav2vec2-large-xlsr-53)")
    assert shown("  architecture:  # ", "(default: {})")
    assert "    extra: {a: [1, 2]}" in lines
    assert shown("  rules: [[", "(default: [])")
    unchanged = next(line for line in lines if line.startswith("  adam_b1:"))
    assert unchanged == "  adam_b1: 0.9  # AdamW beta1"


def _alias_bomb(levels: int = 12) -> str:
    """A "billion laughs" in train.max_steps: each anchor a list of ten aliases of the one before (10**12
    strings once expanded, as printing the value in an error would)."""
    lists = ["&a0 [x, x, x, x, x, x, x, x, x, x]"]
    lists += [f"&a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "train:\n  max_steps: [" + ", ".join(lists) + "]\n"


@pytest.mark.parametrize("text, message", [
    (_alias_bomb(), r"bomb.yaml:2: not valid YAML \(aliases \(\*a0\) are not allowed in a config\)"),
    ("train:\n  max_steps: " + "[" * 20_000 + "]" * 20_000 + "\n",
     r"bomb.yaml:2: not valid YAML \(nested deeper than 50 levels\)"),
    ("a: \xff\n", None),  # not UTF-8: written as bytes below
])
def test_a_hostile_file_is_refused_quickly_naming_it(tmp_path, text, message):
    import time

    path = tmp_path / "bomb.yaml"
    path.write_bytes(text.encode("latin-1") if message is None else text.encode())
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=message or r"bomb.yaml: not UTF-8 text \(invalid start byte at byte 3\)"):
        load_config(path)
    assert time.perf_counter() - start < 2.0


def test_a_deep_override_is_refused_naming_its_key():
    with pytest.raises(ConfigError, match=r"^--set train.max_steps=...: nested deeper than 50 levels$"):
        load_config(None, ["train.max_steps=" + "[" * 20_000 + "]" * 20_000])


def test_a_huge_value_is_shown_cut_short_in_the_error():
    with pytest.raises(ConfigError) as error:
        load_config(None, ["train.max_steps=[" + ", ".join(["x" * 1000] * 1000) + "]"])
    assert str(error.value).startswith("--set train.max_steps=[xxx") and len(str(error.value)) < 600
