"""Starting in an existing output directory: resume, start over, start from another run, and refuse a
resume whose checkpoints do not belong to the config; and a run killed with SIGKILL anywhere (mid-save
included), its newest checkpoint then damaged, that still ends with the uninterrupted run's weights."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import shutil
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

from _runs import TINY_ARCH, tiny_run_config
from test_checkpoint import _damage
from xlsr_jax.checkpoint import Checkpointer, kept_steps
from xlsr_jax.config import from_dict, save_config, to_dict
from xlsr_jax.errors import UserError
from xlsr_jax.rundir import RunDir
from xlsr_jax.text import Vocab
from xlsr_jax.recipe import train
from xlsr_jax.train.resume import clear_output_dir, plan_start, write_signature
from xlsr_jax.model.hf_config import model_config
from xlsr_jax.train.setup import build_data, resolve_vocab
from xlsr_jax.train.signature import RESUME_KEYS, differences, run_signature


def _with(config, **sections):
    """`config` with keys replaced: `_with(c, train={"seed": 1})`."""
    tree = to_dict(config)
    for section, values in sections.items():
        tree[section].update(values)
    return from_dict(tree)


@pytest.fixture(scope="module")
def started_run(cv_dir, tmp_path_factory):
    """A run folder as train() leaves it before its first step (vocab, run_signature.json), plus one
    checkpoint: enough to be resumed, no training needed. Batch: 1 per device x 4 devices."""
    out = tmp_path_factory.mktemp("started")
    config = tiny_run_config(cv_dir, out, max_steps=4)
    run = RunDir(config.train.output_dir)
    data = build_data(config, run.path, 4, 4, data_parallel=4)
    run.path.mkdir(parents=True)
    data.vocab.save(run.vocab)
    write_signature(run, run_signature(config, data, model_config(config.model, data.vocab)))
    checkpoints = Checkpointer(run.checkpoints)
    checkpoints.save(1, {"x": jnp.zeros(2)})
    checkpoints.close()
    return config, run


def test_the_signature_is_deterministic_and_ignores_what_a_resume_may_change(started_run):
    config, run = started_run
    stored = json.loads(run.signature.read_text())
    assert list(stored) == sorted(stored) and stored["train.utterances"] == 6 and stored["vocab.size"] == 29
    longer = _with(config, train={"max_steps": 100, "eval_steps": 7, "logging_steps": 3},
                   optim={"learning_rate": 5e-4})
    data = build_data(longer, run.path, 4, 4, data_parallel=4)
    again = run_signature(longer, data, model_config(longer.model, data.vocab))
    assert differences(stored, again) == [f"config.sha256: {stored['config.sha256'][:12]} -> "
                                          f"{again['config.sha256'][:12]}"]
    assert differences(stored, again, RESUME_KEYS) == []


@pytest.mark.slow  # calls train (which builds the data and the model)
@pytest.mark.parametrize("change, expected", [
    ({"model": {"architecture": {**TINY_ARCH, "hidden_size": 48}}},
     ["model.hidden_size: 32 -> 48", "model.output_hidden_size: 32 -> 48"]),
    ({"train": {"per_device_batch_size": 2}}, ["train.global_batch_sizes: [4] -> [8]", "train.plan_sha256: "]),
    ({"data": {"max_train_examples": 4}}, ["train.utterances: 6 -> 4", "train.plan_sha256: "]),
    ("vocab", ["vocab.size: 29 -> 30", "vocab.sha256: ", "model.vocab_size: 29 -> 30"]),
], ids=["model-shape", "global-batch", "dataset-size", "vocab"])
def test_a_resume_with_another_setup_stops_naming_what_changed(started_run, tmp_path, change, expected):
    config, run = started_run
    if change == "vocab":  # the run's vocab.json replaced by another alphabet's (resuming reads that file)
        original = run.vocab.read_text()
        tokens = Vocab.load(run.vocab).tokens
        Vocab(("q", *tokens)).save(run.vocab)
        change = {}
    try:
        with pytest.raises(UserError) as error:
            train(_with(config, **change))
    finally:
        if "original" in locals():
            run.vocab.write_text(original)
    message = str(error.value)
    assert message.startswith(f"{run.path} cannot resume: its checkpoints were trained with another setup")
    changed = message.split("\n  ")[1:]
    changed[-1] = changed[-1].split("\n")[0]
    assert len(changed) == len(expected) and all(line.startswith(e) for line, e in zip(changed, expected)), message
    assert "train.overwrite_output_dir=true" in message and f"train.init_from={run.path}" in message
    assert json.loads(run.signature.read_text())["train.utterances"] == 6, "the stored signature is left as it was"


def test_the_output_directory_rule(started_run, tmp_path):
    config, run = started_run
    assert plan_start(config).kind == "resume" and plan_start(config).step is None
    assert plan_start(_with(config, checkpoint={"resume_step": 1})).step == 1
    with pytest.raises(UserError, match=r"checkpoint.resume_step=3: .* no checkpoint for that step; steps kept: \[1\]"):
        plan_start(_with(config, checkpoint={"resume_step": 3}))
    with pytest.raises(UserError, match=r"holds checkpoints \(steps \[1\]\) and checkpoint.resume is false: set "
                                        r"train.overwrite_output_dir=true"):
        plan_start(_with(config, checkpoint={"resume": False}))
    with pytest.raises(UserError, match="train.init_from starts a new run, but .* holds checkpoints"):
        plan_start(_with(config, train={"init_from": str(run.path)}))
    start = plan_start(_with(config, train={"overwrite_output_dir": True}))
    assert (start.kind, start.clear) == ("fresh", True)

    # A folder a run left before its first checkpoint: its vocab.json (another language's) is not reused.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    Vocab(("x", "y", "|", "[UNK]", "[PAD]")).save(fresh / "vocab.json")
    (fresh / "run_signature.json").write_text("{}")  # written with it: the folder is a run's
    fresh_config = _with(config, train={"output_dir": str(fresh)})
    assert plan_start(fresh_config).kind == "fresh"
    assert resolve_vocab(fresh_config, ["ab c"], fresh).tokens == ("a", "b", "c", "|", "[UNK]", "[PAD]")
    assert resolve_vocab(config, ["ab c"], run.path) == Vocab.load(run.vocab), "resuming reuses the run's own"
    with pytest.raises(UserError, match=f"data.vocab={fresh / 'vocab.json'} differs from {run.vocab}"):
        resolve_vocab(_with(config, data={"vocab": str(fresh / "vocab.json")}), [], run.path)


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_that_is_no_run_is_never_overwritten_or_cleared(overwrite, cv_dir, tmp_path):
    """A user's folder holding names a run writes (their own config.yaml, eval_results.json, files under
    checkpoints/): train stops before any work, with or without train.overwrite_output_dir, and every
    byte stays."""
    from test_rundir import _tree

    config = tiny_run_config(cv_dir, tmp_path, max_steps=2, overwrite_output_dir=overwrite)
    folder = Path(config.train.output_dir)
    (folder / "checkpoints").mkdir(parents=True)
    (folder / "config.yaml").write_text("# my experiment notes\nlr: 3e-4\n")
    (folder / "eval_results.json").write_text('{"results": [{"wer": 0.2}]}')
    (folder / "checkpoints" / "mine.txt").write_text("do not lose me")
    before = _tree(folder)
    with pytest.raises(UserError, match=f"train.output_dir={folder} holds config.yaml, checkpoints, eval_results.json, "
                                        "but is not an xlsr-jax run .* would " + ("delete" if overwrite else "overwrite")):
        train(config)
    assert _tree(folder) == before


def test_overwrite_clears_a_run_but_keeps_the_users_files(started_run, tmp_path):
    from test_rundir import _tree

    config, run = started_run
    copy = RunDir(tmp_path / "copy")
    shutil.copytree(run.path, copy.path)
    (copy.path / "notes.txt").write_text("mine")
    (copy.checkpoints / "README.txt").write_text("mine too")
    start = plan_start(_with(config, train={"output_dir": str(copy.path), "overwrite_output_dir": True}))
    assert start.clear
    clear_output_dir(copy, is_main=True)
    assert _tree(copy.path) == {"notes.txt": b"mine", "checkpoints/README.txt": b"mine too"}


@pytest.mark.parametrize("output_dir", ["", "/", "~", "~/"])
def test_the_current_root_and_home_folders_are_refused(output_dir, cv_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # should the check ever fail, the run lands here, not in the repository
    monkeypatch.setenv("HOME", str(tmp_path))
    config = _with(tiny_run_config(cv_dir, tmp_path, max_steps=2), train={"output_dir": output_dir})
    with pytest.raises(UserError, match="train.output_dir=.*: name a folder of the run's own"):
        train(config)


def test_a_tilde_output_dir_is_the_home_folder(cv_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    config = _with(tiny_run_config(cv_dir, tmp_path, max_steps=2), train={"output_dir": "~/runs/tr"})
    assert config.train.output_dir == str(tmp_path / "runs" / "tr")


def test_init_from_another_run_starts_at_step_0_with_its_parameters(trained_run, tmp_path):
    from xlsr_jax import parallel
    from xlsr_jax.config import MeshConfig
    from xlsr_jax.infer.load import load_run
    from xlsr_jax.train.resume import check_start, init_model, start_state
    from xlsr_jax.train.setup import build_state

    source_config, source = trained_run
    config = _with(source_config, train={"output_dir": str(tmp_path / "new"), "init_from": f"{source}:3"})
    start = plan_start(config)
    assert (start.kind, start.step, str(start.source.path)) == ("init", 3, str(source))
    data = build_data(config, tmp_path / "new", 4, 4, data_parallel=4)
    assert data.vocab == Vocab.load(source / "vocab.json")
    model, host_params = init_model(start.source, config, data.vocab)  # from its model_config.json
    mesh = parallel.make_mesh(MeshConfig())
    state, shardings, _, _ = build_state(config, model, host_params, mesh, 10)
    check_start(start, RunDir(tmp_path / "new"), run_signature(config, data, model.config))
    fresh_optimizer = [np.asarray(x) for x in _leaves(state.opt_state)]
    state = start_state(start, RunDir(tmp_path / "new"), Checkpointer(tmp_path / "new" / "ck"), state, shardings, True)
    assert int(state.step) == 0
    for got, want in zip(_leaves(state.opt_state), fresh_optimizer, strict=True):
        np.testing.assert_array_equal(np.asarray(got), want, err_msg="a fresh optimizer state")
    expected = load_run(source, step=3).params
    for got, want in zip(_leaves(state.params), _leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    wider = _with(config, model={"architecture": {**TINY_ARCH, "hidden_size": 48}})
    with pytest.raises(UserError, match=r"its parameters do not fit this model:\n  model.hidden_size: 32 -> 48"):
        check_start(start, RunDir(tmp_path / "new"), run_signature(wider, data, model_config(wider.model, data.vocab)))


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# Loaded at start-up by a training process with its folder on PYTHONPATH. $XLSR_TEST_HOLD_SAVE="STEP:MARKER":
# the first checkpoint of STEP or later that orbax has written into its temporary folder is held there,
# before the rename that completes it; MARKER names it, and the process waits to be killed. It patches
# orbax 0.12's private AtomicRenameTemporaryPath.finalize: should orbax move it, nothing is held and the
# test fails ("never saw a checkpoint being written"), it does not pass by luck.
_HOLD_SAVE = """
import os, time

step, marker = os.environ["XLSR_TEST_HOLD_SAVE"].split(":", 1)
from orbax.checkpoint._src.path import atomicity

finalize = atomicity.AtomicRenameTemporaryPath.finalize

async def held(self, *args, **kwargs):
    name = os.path.basename(str(self._final_path))
    if name.isdigit() and int(name) >= int(step):
        with open(marker + ".tmp", "w") as f:
            f.write(name)
        os.replace(marker + ".tmp", marker)
        time.sleep(3600)
    return await finalize(self, *args, **kwargs)

atomicity.AtomicRenameTemporaryPath.finalize = held
"""


def _train_process(config_file: Path, log: Path, hold: str | None = None) -> subprocess.Popen:
    """`xlsr-jax train` in a process of its own; `hold`: "STEP:MARKER" (see `_HOLD_SAVE`)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}  # XLA_FLAGS, HOME and its compilation cache: conftest's
    if hold:
        site = config_file.parent / "site"
        site.mkdir(exist_ok=True)
        (site / "sitecustomize.py").write_text(_HOLD_SAVE)
        env.update(PYTHONPATH=str(site), XLSR_TEST_HOLD_SAVE=hold)
    return subprocess.Popen([sys.executable, "-m", "xlsr_jax.cli", "train", "--config", str(config_file)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env)


def _kill_when(process: subprocess.Popen, ready, timeout: float = 300.0) -> bool:
    """SIGKILL `process` once `ready()` holds (polled every 20 ms); False if it ended or `timeout` passed
    first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.02)
    process.kill()
    process.wait()
    return False


@pytest.mark.slow
@pytest.mark.timeout(1200)  # three trainings in subprocesses, one here
def test_sigkill_anywhere_and_a_damaged_checkpoint_still_give_the_uninterrupted_weights(cv_dir, tmp_path):
    """8 steps, a checkpoint every step. Killed once a random moment after step 2's checkpoint (at the
    latest while step 6's is held unfinished), once while a checkpoint is being written (held in orbax's
    temporary folder), then the newest checkpoint is truncated: the reruns of the same command restore
    the one before it and end with the uninterrupted run's parameters, bit for bit."""
    rng = np.random.default_rng(0)

    def run_config(name: str):  # the runs load their compiled steps from the test run's cache (conftest)
        config = tiny_run_config(cv_dir, tmp_path / name, max_steps=8, save_steps=1,
                                 eval_steps=100)
        return dataclasses.replace(config, data=dataclasses.replace(config.data, eval=()),
                                   checkpoint=dataclasses.replace(config.checkpoint, best_metric=None))

    reference = tmp_path / "reference" / "run"
    train(run_config("reference"))  # uninterrupted, here: the program of the processes, from the same cache
    killed_config = tmp_path / "killed.yaml"
    save_config(run_config("killed"), killed_config)
    run, log = tmp_path / "killed" / "run", tmp_path / "killed.log"
    checkpoints = run / "checkpoints"

    def temporary() -> set[str]:  # orbax's temporary folders: a checkpoint being written (or left by a kill)
        return {p.name for p in os.scandir(checkpoints) if ".orbax-checkpoint-tmp" in p.name} \
            if checkpoints.is_dir() else set()

    # A random moment once checkpoint 2 is complete (so two complete ones stay: save_total_limit is 2):
    # mid-step, mid-save or between; the run holds step 6's save, so the kill always comes before the end.
    delay, held = rng.uniform(0.0, 1.0), tmp_path / "held"
    since: list[float] = []

    def random_moment() -> bool:
        if not since and max(kept_steps(checkpoints), default=0) >= 2:
            since.append(time.monotonic())
        return held.exists() or bool(since) and time.monotonic() - since[0] >= delay

    assert _kill_when(_train_process(killed_config, log, hold=f"6:{held}"), random_moment)
    held.unlink(missing_ok=True)  # what the first kill left mid-save, if anything, the rerun deletes
    assert _kill_when(_train_process(killed_config, log, hold=f"0:{held}"), held.exists), \
        "never saw a checkpoint being written"
    assert temporary() == {f"{held.read_text()}.orbax-checkpoint-tmp"}, "killed while it was written"
    steps = sorted(int(p.name) for p in os.scandir(checkpoints) if p.name.isdigit())
    assert len(steps) == 2 and steps[-1] < 8, f"checkpoints {steps}"
    newest = checkpoints / str(steps[-1])
    _damage(newest)  # a truncated array file
    log.write_text("")
    assert _train_process(killed_config, log).wait(timeout=300) == 0, log.read_text()[-3000:]

    text = log.read_text()
    assert f"{newest}: damaged, moved aside to {newest}.damaged" in text, text[-3000:]
    assert f"restoring checkpoint {checkpoints}/{steps[-2]}" in text, "resumed from the checkpoint before it"
    assert (checkpoints / f"{steps[-1]}.damaged").is_dir() and not temporary()
    records = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records == list(range(1, 9)), "every step once: the records after each resume point were dropped"
    want = load_file(str(reference / "hf_model" / "model.safetensors"))
    got = load_file(str(run / "hf_model" / "model.safetensors"))
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
