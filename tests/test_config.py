"""The config tree: YAML + overrides, errors that name the key, the resolved file round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from xlsr_jax.config import Config, ConfigError, load_config, save_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("name", ["demo.yaml", "common_voice_tr.yaml"])
def test_shipped_configs_load(name):
    config = load_config(CONFIGS / name)
    assert isinstance(config, Config)
    assert config.data.train and config.data.eval


def test_common_voice_recipe_matches_the_seed_script():
    c = load_config(CONFIGS / "common_voice_tr.yaml")
    assert c.model.pretrained == "facebook/wav2vec2-large-xlsr-53"
    assert (c.optim.learning_rate, c.optim.warmup_steps) == (3e-4, 500)
    assert (c.train.per_device_batch_size, c.train.num_train_epochs, c.train.precision) == (16, 5.0, "bfloat16")
    assert (c.model.feat_proj_dropout, c.model.layerdrop) == (0.0, 0.1)
    assert c.model.gradient_checkpointing and c.model.freeze_feature_encoder


def test_overrides_are_parsed_as_yaml_and_typed():
    c = load_config(CONFIGS / "demo.yaml", [
        "train.max_steps=7", "optim.learning_rate=5e-4", "data.train=cv:/data/tr:train+dev",
        "data.eval=[cv:/a:dev, manifest:/b/m.tsv]", "model.gradient_checkpointing=true",
        "mesh.rules=[['.*q_proj/kernel', [null, fsdp]]]", "data.max_train_examples=null",
    ])
    assert c.train.max_steps == 7 and isinstance(c.train.max_steps, int)
    assert c.optim.learning_rate == 5e-4  # YAML 1.1 reads 5e-4 as a string; still a float here
    assert c.data.train == ("cv:/data/tr:train+dev",)
    assert c.data.eval == ("cv:/a:dev", "manifest:/b/m.tsv")
    assert c.model.gradient_checkpointing is True
    assert c.mesh.rules == ((".*q_proj/kernel", (None, "fsdp")),)
    assert c.data.max_train_examples is None


@pytest.mark.parametrize("override, message", [
    ("train.max_step=3", "unknown key train.max_step; did you mean 'max_steps'"),
    ("trian.max_steps=3", "unknown key trian; did you mean 'train'"),
    ("optim.learning_rate=fast", "optim.learning_rate: expected a number, got 'fast'"),
    ("train.per_device_batch_size=2.5", "train.per_device_batch_size: expected an integer"),
    ("train.precision=fp16", "train.precision must be float32 or bfloat16"),
    ("model.mask_time_prob=1.5", "model.mask_time_prob must be in [0, 1]"),
    ("model.gradient_checkpointing=maybe", "model.gradient_checkpointing: expected true or false"),
    ("train.max_steps", "expected section.key=value"),
])
def test_bad_keys_and_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as err:
        load_config(CONFIGS / "demo.yaml", [override])
    assert message in str(err.value)
    assert "demo.yaml" in str(err.value)


def test_from_scratch_needs_an_architecture():
    with pytest.raises(ConfigError, match="model.architecture is required"):
        load_config(None, ["model.pretrained=null"])


def test_resolved_config_round_trips(tmp_path):
    c = load_config(CONFIGS / "demo.yaml", ["train.max_steps=11", "data.eval=[cv:/x:dev, cv:/y:dev]"])
    save_config(c, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == c
