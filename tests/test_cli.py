"""The `xlsr-jax` command as a newcomer meets it: help, config errors, a missing data source, a new
Common Voice folder, a rerun of a finished run, no PyTorch banner."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import make_cv_folder
from xlsr_jax.cli import build_parser, main
from xlsr_jax.config import Config, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
TINY = ["model.architecture.hidden_size=32", "model.architecture.num_hidden_layers=1",
        "model.architecture.intermediate_size=37", "model.architecture.conv_dim=[16,16,16]",
        "model.architecture.conv_kernel=[10,4,4]", "model.architecture.conv_stride=[5,4,4]"]  # as _runs.TINY_ARCH


def _args(*items: str) -> list[str]:
    return [a for item in items for a in ("--set", item)]


def test_help_describes_the_tool_and_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert "fine-tune XLSR-Wav2Vec2 speech recognition" in text
    (commands,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    assert set(commands.choices) == {"train", "pretrain", "sweep", "plan", "config", "evaluate", "pseudo-label",
                                     "export", "push", "transcribe", "build-lm", "inventory", "split"}
    for action in commands._choices_actions:  # each command with its one-line help
        assert action.dest in text and action.help.split()[0] in text, action.dest
    assert "xlsr-jax config" in text and "xlsr-jax evaluate" in text


def test_train_help_says_how_to_see_every_key(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "xlsr-jax config" in capsys.readouterr().out


def test_config_prints_every_key_as_a_loadable_file(capsys, tmp_path):
    assert main(["config", "--config", str(CONFIGS / "demo.yaml"), "--set", "optim.learning_rate=5e-4"]) == 0
    text = capsys.readouterr().out
    (tmp_path / "c.yaml").write_text(text)
    config = load_config(tmp_path / "c.yaml")
    assert config == load_config(CONFIGS / "demo.yaml", ["optim.learning_rate=5e-4"])
    assert "learning_rate: 0.0005  #" in text and "(default: 0.0003)" in text
    demo_steps = yaml.safe_load((CONFIGS / "demo.yaml").read_text())["train"]["max_steps"]
    assert isinstance(config, Config) and yaml.safe_load(text)["train"]["max_steps"] == demo_steps


def test_plan_command_passes_the_config_and_prints_the_table(monkeypatch, capsys):
    from xlsr_jax.train import plan as plan_module

    asked = {}

    def fake_plan(config, memory_gib, max_batch, topology, seconds):
        asked.update(config=config, memory_gib=memory_gib, max_batch=max_batch, topology=topology, seconds=seconds)
        return plan_module.Plan([plan_module.BucketPlan(0, 48000, 32, 12, 70 * plan_module.GIB)], 80 * plan_module.GIB,
                                "gpu", 1)

    monkeypatch.setattr(plan_module, "plan", fake_plan)
    assert main(["plan", "--config", str(CONFIGS / "demo.yaml"), "--set", "data.num_buckets=3",
                 "--memory-gib", "80", "--max-batch", "64", "--topology", "v5e:2x4", "--seconds", "15,5.5"]) == 0
    assert asked == {"config": load_config(CONFIGS / "demo.yaml", ["data.num_buckets=3"]), "memory_gib": 80.0,
                     "max_batch": 64, "topology": "v5e:2x4", "seconds": (15.0, 5.5)}
    out = capsys.readouterr().out
    assert "within 80.00 GiB" in out and out.splitlines()[3].split() == ["0", "3.00", "12", "70.00", "36.0"]
    assert "--set train.per_device_audio_seconds=36" in out


@pytest.mark.parametrize("seconds", ["0,5", "5,x", ""])
def test_plan_lengths_must_be_positive_numbers(seconds, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "--config", str(CONFIGS / "demo.yaml"), "--seconds", seconds])
    assert exit_.value.code == 2 and f"--seconds: {seconds!r}" in capsys.readouterr().err


def test_plan_as_configured_needs_a_topology(capsys):
    assert main(["plan", "--config", str(CONFIGS / "demo.yaml"), "--as-configured"]) == 2
    err = capsys.readouterr().err
    assert "give --topology" in err and "Traceback" not in err


def test_plan_on_a_cpu_needs_the_memory_size(capsys):
    assert main(["plan", "--config", str(CONFIGS / "demo.yaml")]) == 2
    err = capsys.readouterr().err
    assert "reports no memory size; give --memory-gib" in err and "Traceback" not in err


def test_a_set_typo_names_the_override(capsys):
    assert main(["train", "--config", str(CONFIGS / "demo.yaml"), "--set", "train.max_step=3"]) == 2
    err = capsys.readouterr().err
    assert "--set train.max_step=3: unknown key train.max_step; did you mean 'max_steps'?" in err
    assert "demo.yaml" not in err


@pytest.mark.parametrize("data, message", [
    ([], "data.train is empty"),
    (["data.train=cv:/no/such/folder:train"], "/no/such/folder: no such Common Voice folder"),
])
def test_train_without_data_exits_2_and_leaves_no_folder(tmp_path, capsys, data, message):
    run = tmp_path / "run"
    assert main(["train", *_args(f"train.output_dir={run}", f"data.cache_dir={tmp_path / 'cache'}", *data)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not run.exists()


@pytest.mark.slow  # trains
def test_train_command_on_a_new_common_voice_folder(cv_dir, tmp_path, capsys):
    overrides = [f"data.train=cv:{cv_dir}:train", f"data.eval=cv:{cv_dir}:dev",  # the only data settings
                 f"train.output_dir={tmp_path / 'run'}", "train.max_steps=2", "train.per_device_batch_size=1",
                 f"data.cache_dir={tmp_path / 'cache'}", *TINY]
    assert main(["train", "--config", str(CONFIGS / "demo.yaml"), *_args(*overrides)]) == 0
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["step"] == 2 and records[-1]["eval/examples"] == 2
    assert (run / "hf_model" / "model.safetensors").exists() and (run / "training_curves.png").exists()
    out = capsys.readouterr().out
    assert f"run: {run} finished at step 2 of 2" in out
    assert f"Hugging Face model: {run / 'hf_model'}" in out and f"training curves: {run / 'training_curves.png'}" in out
    assert "last evaluation (step 2)" in out


def test_rerun_of_a_finished_run_says_already_finished(trained_run, tmp_path, capsys):
    config, run = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    metrics = (copy / "metrics.jsonl").read_text()
    assert main(["train", "--config", str(copy / "config.yaml"), "--set", f"train.output_dir={copy}"]) == 0
    captured = capsys.readouterr()
    assert "already finished" in captured.out and f"run: {copy} finished at step 6 of 6" in captured.out
    assert "step/s" not in captured.err, "no progress bars"
    assert (copy / "metrics.jsonl").read_text() == metrics


def test_no_pytorch_banner_without_torch(trained_run, tmp_path):
    _, run = trained_run
    hide_torch = "import sys; sys.modules['torch'] = None; "
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    banner = "PyTorch was not found"
    plain = subprocess.run([sys.executable, "-c", hide_torch + "import transformers"], env=env,
                           capture_output=True, text=True, check=True)
    assert banner in plain.stderr, "without torch, transformers prints its banner (else this test tests nothing)"
    # export imports the tokenizer and processor classes, which run transformers' __init__ a second time
    command = ["export", str(run), str(tmp_path / "export"), "--no-check"]
    script = hide_torch + f"from xlsr_jax.cli import main; sys.exit(main({command!r}))"
    ours = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert ours.returncode == 0, ours.stderr
    assert "self-check: skipped (torch is not installed" in ours.stdout
    assert banner not in ours.stderr


def test_transcribe_a_run_and_its_export_alike_skipping_a_bad_file(trained_run, cv_dir, tmp_path, capsys):
    _, run = trained_run
    clips = [f"{cv_dir}/clips/common_voice_tr_{i}.mp3" for i in (1, 2, 3)]
    (tmp_path / "bad.wav").write_bytes(b"RIFF not really")
    args = [*clips, str(tmp_path / "bad.wav"), "--chunk-length-s", "0.6", "--stride-length-s", "0.1", "--keep-going"]
    assert main(["transcribe", str(run), *args, "--out", str(tmp_path / "run.json")]) == 0
    assert main(["transcribe", str(run / "hf_model"), *args, "--out", str(tmp_path / "export.json")]) == 0
    from xlsr_jax.infer.transcribe import read_json

    from_run, from_export = read_json(tmp_path / "run.json"), read_json(tmp_path / "export.json")
    assert [t.path for t in from_run] == clips and from_run == from_export
    assert any(t.words for t in from_run) and all(t.duration_s > 0.5 for t in from_run)
    assert "wrote 3 transcripts" in capsys.readouterr().out
    assert main(["transcribe", str(run), str(tmp_path / "bad.wav")]) == 2
    assert "no file could be transcribed: " in capsys.readouterr().err


def test_build_lm_command(trained_run, cv_dir, tmp_path, capsys):
    _, run = trained_run
    out = tmp_path / "lm.arpa"
    assert main(["build-lm", "--data", f"cv:{cv_dir}:train", "--run", str(run), "--out", str(out)]) == 0
    assert f"wrote {out}: 3-gram from 4 sentences, 16 words" in capsys.readouterr().out
    assert main(["build-lm", "--data", f"cv:{cv_dir}:test", "--language", "tr", "--out", str(out)]) == 2
    assert "test split" in capsys.readouterr().err


def test_inventory_command_on_a_common_voice_folder(cv_dir, capsys):
    assert main(["inventory", f"cv:{cv_dir}:train+dev", "--language", "tr",
                 "--set", "data.keep_apostrophes=true"]) == 0
    out = capsys.readouterr().out
    assert "before normalisation: " in out and "in 6 utterances" in out
    after = out.split("after normalisation")[1]
    assert "apostrophes kept inside words" in after and "istanbul'da" in after  # the override applied
    assert out.splitlines()[-1].startswith("characters_after: ")


def test_split_command_writes_speaker_disjoint_manifests(cv_dir, tmp_path, capsys):
    out = tmp_path / "split"
    assert main(["split", f"cv:{cv_dir}:train+dev", "--out", str(out), "--dev", "0.15", "--test", "0.15"]) == 0
    text = capsys.readouterr().out
    speakers = {}
    for name in ("train", "dev", "test"):
        rows = (out / f"{name}.tsv").read_text(encoding="utf-8").splitlines()
        assert rows[0] == "path\tsentence\tspeaker\tduration_s\tlocale"
        speakers[name] = {r.split("\t")[2] for r in rows[1:]}
        assert f"-> manifest:{out / name}.tsv" in text
    assert sum(map(len, speakers.values())) == len(set().union(*speakers.values())) == 4  # spk_a .. spk_d
    assert min(map(len, speakers.values())) >= 1 and text.endswith("shared_sentences: 0\n")
    assert main(["split", f"cv:{cv_dir}", "--out", str(out), "--dev", "0.9", "--test", "0.2"]) == 2
    assert "--dev 0.9, --test 0.2" in capsys.readouterr().err


def _truncated_archive(folder: Path) -> str:
    """Half of a real Common Voice .tar.gz, as a download cut short leaves it."""
    import tarfile

    source = make_cv_folder(folder / "tr")
    with tarfile.open(folder / "cv.tar.gz", "w:gz") as tar:
        tar.add(source, arcname="cv-corpus-1/tr")
    data = (folder / "cv.tar.gz").read_bytes()
    (folder / "cut.tar.gz").write_bytes(data[: len(data) // 2])
    return str(folder / "cut.tar.gz")


def _decoded_audio_dataset(folder: Path) -> str:
    """A parquet dataset whose audio column holds decoded arrays (no path, no bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (folder / "data").mkdir(parents=True)
    pq.write_table(pa.table({"audio": [{"array": [0.1, 0.2], "sampling_rate": 16000}], "sentence": ["merhaba"]}),
                   folder / "data" / "train-00000.parquet")
    return str(folder)


@pytest.mark.parametrize("case", ["archive", "deep yaml", "deep set", "alias bomb", "hf audio", "model path",
                                  "transcribe model", "scheme"])
def test_bad_input_exits_2_with_a_message_naming_it(case, tmp_path, capsys, monkeypatch):
    """Each input that once ended in a traceback: one line naming the file, key or source, exit 2."""
    monkeypatch.setenv("HOME", str(tmp_path))  # the archive's extraction cache
    lm = ["--language", "tr", "--out", str(tmp_path / "lm.arpa")]
    bomb = "train:\n  max_steps: [&a [x, x], &b [*a, *a], [*b, *b]]\n"
    (tmp_path / "bomb.yaml").write_text(bomb)
    (tmp_path / "deep.yaml").write_text("train:\n  seed: " + "[" * 5000 + "]" * 5000 + "\n")
    argv, named = {
        "archive": (lambda: ["build-lm", "--data", f"cv:{_truncated_archive(tmp_path)}:train", *lm],
                    "cut.tar.gz: cannot extract: truncated or corrupt (EOFError"),
        "deep yaml": (lambda: ["config", "--config", str(tmp_path / "deep.yaml")],
                      "deep.yaml:2: not valid YAML (nested deeper than 50 levels)"),
        "deep set": (lambda: ["config", "--set", "train.seed=" + "[" * 5000 + "]" * 5000],
                     "--set train.seed=...: nested deeper than 50 levels"),
        "alias bomb": (lambda: ["config", "--config", str(tmp_path / "bomb.yaml")],
                       "bomb.yaml:2: not valid YAML (aliases (*a) are not allowed in a config)"),
        "hf audio": (lambda: ["build-lm", "--data", f"hf:{_decoded_audio_dataset(tmp_path / 'hf')}", *lm],
                     "audio column 'audio' holds struct<array"),
        "model path": (lambda: ["evaluate", str(tmp_path / "no_run"), "--data", "cv:x"],
                       f"{tmp_path / 'no_run'}: no such model folder"),
        "transcribe model": (lambda: ["transcribe", "./no_model", "a.wav"], "./no_model: no such model folder"),
        "scheme": (lambda: ["build-lm", "--data", "cvv:data/demo_tr", *lm], "unknown data source scheme 'cvv'"),
    }[case]
    args = argv()
    assert main(args) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # after progress bars (datasets')
    assert "Traceback" not in err and last.startswith(f"xlsr-jax {args[0]}: error: ") and named in last, err


def test_a_damaged_checkpoint_is_named_by_evaluate_and_export(trained_run, cv_dir, tmp_path, capsys):
    _, run = trained_run
    copy = shutil.copytree(run, tmp_path / "run")
    shutil.rmtree(copy / "checkpoints" / "6" / "default")  # the parameters gone, the metadata left
    assert main(["export", str(copy), str(tmp_path / "out")]) == 2
    assert f"{copy}/checkpoints/6: cannot read this checkpoint, damaged or incomplete" in capsys.readouterr().err
    assert main(["evaluate", str(copy), "--data", f"cv:{cv_dir}:test", "--step", "6"]) == 2
    assert "steps kept: [3, 6], choose another with --step" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", [["evaluate", "runs/x", "--data", "cv:/cv:test"], ["export", "runs/x", "out"],
                                     ["transcribe", "runs/x", "a.wav"], ["pseudo-label", "runs/x", "--data", "audio:/a",
                                                                         "--out", "l.tsv"]])
def test_average_reaches_each_command_that_reads_a_checkpoint(command, monkeypatch, capsys):
    """--average N goes to the loader of evaluate, export, transcribe and pseudo-label; 0 is refused."""
    from xlsr_jax.infer import load

    asked = []

    def fake_load_run(path, *, step=None, best=False, mesh=None, average=1):
        asked.append(average)
        raise load.UserError("stop here")

    monkeypatch.setattr(load, "load_run", fake_load_run)
    monkeypatch.setattr(load.RunDir, "is_run", lambda self: True)
    monkeypatch.setattr("xlsr_jax.hub.export.RunDir.is_run", lambda self: True)
    assert main([*command, "--average", "3"]) in (1, 2) and asked == [3]
    with pytest.raises(SystemExit):
        main([*command, "--average", "0"])
    assert "--average: '0': expected a whole number >= 1" in capsys.readouterr().err
