"""`xlsr-jax train` on a Common Voice folder it has never seen, given only the data overrides."""

from __future__ import annotations

import json
from pathlib import Path

from xlsr_jax.cli import main

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = ["model.architecture.hidden_size=32", "model.architecture.num_hidden_layers=1",
        "model.architecture.intermediate_size=37", "model.architecture.conv_dim=[16,16,16]",
        "model.architecture.conv_kernel=[10,3,3]", "model.architecture.conv_stride=[5,2,2]"]


def test_train_command_on_a_new_common_voice_folder(cv_dir, tmp_path):
    overrides = [f"data.train=cv:{cv_dir}:train", f"data.eval=cv:{cv_dir}:dev",  # the only data settings
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.per_device_batch_size=1",
                 f"data.cache_dir={tmp_path / 'cache'}", *TINY]
    args = ["train", "--config", str(CONFIGS / "demo.yaml")]
    for item in overrides:
        args += ["--set", item]
    assert main(args) == 0
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["eval/examples"] == 2
    assert (tmp_path / "run" / "hf_model" / "model.safetensors").exists()


def test_config_errors_exit_2_with_the_key(capsys):
    assert main(["train", "--config", str(CONFIGS / "demo.yaml"), "--set", "train.max_step=3"]) == 2
    assert "did you mean 'max_steps'" in capsys.readouterr().err
