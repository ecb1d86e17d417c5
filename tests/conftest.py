"""Shared test fixtures."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile


def _jaxlib_knows(flag: str) -> bool:
    """Whether the installed jaxlib parses XLA flag `flag`: XLA aborts the process on a flag it does not know,
    and a later jaxlib may drop an experimental one. Each flag's name stands in jaxlib's library."""
    import glob
    import importlib.util
    import mmap

    folder = os.path.dirname(importlib.util.find_spec("jaxlib").origin)
    for path in glob.glob(os.path.join(folder, "*.so")):
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as library:
            if library.find(flag.encode()) >= 0:
                return True
    return False


# Four fake CPU devices for the mesh tests; must be set before jax is first imported. The tests spend most
# of their time compiling tiny programs, not running them: without LLVM's optimisation passes XLA:CPU
# compiles them in about half the time (a 6-step tiny run: 355 -> 185 s on 2 busy cores), and matmuls and
# convolutions still run in the same precompiled library kernels. XLA:CPU's older elemental fusion emitters
# compile in about two thirds of the time of its default MLIR ones (the tiny model's gradient: 3.1-4.6 ->
# 2.2-2.4 s; tests/test_model_encoder.py alone 143 -> 101 s; 2026-12-07, jax 0.10.2) and run its steps as fast.
TEST_XLA_FLAGS = " ".join(["--xla_backend_optimization_level=0"] + [
    f"--{flag}=false" for flag in ["xla_cpu_use_fusion_emitters"] if _jaxlib_knows(flag)])
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4 " + TEST_XLA_FLAGS)
os.environ.setdefault("XLSR_JAX_TEST_XLA_FLAGS", TEST_XLA_FLAGS)
# The tests run on the CPU, also where libtpu is installed (it compiles the TPU plans' steps, with no TPU):
# without this JAX would first look for a TPU. Each pytest-xdist worker may load libtpu for a TPU plan;
# libtpu otherwise allows one process per machine (a lock file in /tmp).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # tests/_multiprocess_worker.py's, with 2 devices
# glibc's malloc defaults for the test process, whichever test first calls `xlsr_jax.cli.main`: the
# training-step setting (xlsr_jax/malloc.py) slowed the model test files 358 -> 420 s; tests/test_malloc.py
# sets this variable itself where it tests the setting.
os.environ.setdefault("XLSR_JAX_SYSTEM_MALLOC", "1")

# ---------------------------------------------------------------- a home folder of the test run's own
# Nothing a test does lands in the user's home: what xlsr-jax and its libraries write under ~ (JAX's
# compilation cache at train.compilation_cache's default ~/.cache/xlsr_jax/jax, the decoded-audio and
# archive caches under ~/.cache/xlsr_jax, Hugging Face datasets' cache, matplotlib's font list) goes to a
# temporary HOME made for this run, which subprocesses inherit and which is deleted when the run ends.
# One compilation cache per run: the suite's time no longer depends on what an earlier run left behind.
# pytest-xdist's workers inherit the variable from the process that made the folder (and that deletes it), so
# all of a run's workers share one HOME and one compilation cache.
RUN_HOME = os.environ.get("XLSR_JAX_TEST_HOME", "")
if not RUN_HOME:
    RUN_HOME = os.environ["XLSR_JAX_TEST_HOME"] = tempfile.mkdtemp(prefix="xlsr-jax-tests-")
    atexit.register(shutil.rmtree, RUN_HOME, ignore_errors=True)
os.environ["HOME"] = RUN_HOME
for _name in ("XDG_CACHE_HOME", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "HF_HOME", "HF_DATASETS_CACHE",
              "HF_HUB_CACHE", "MPLCONFIGDIR", "TORCH_HOME"):  # each would lead out of RUN_HOME
    os.environ.pop(_name, None)
# JAX's persistent cache from this process's first compilation on (and in every subprocess): the folder a
# run's default train.compilation_cache names, so the in-process and subprocess trainings share it.
COMPILATION_CACHE = os.path.join(RUN_HOME, ".cache", "xlsr_jax", "jax")
os.environ["JAX_COMPILATION_CACHE_DIR"] = COMPILATION_CACHE
# The tests compare against float32 PyTorch. On GPUs JAX's default float32 matmul is TF32: an H100 gave
# max |dlogits| 4.2e-4 by default and 2.3e-7 with "highest". A no-op on CPU. Set in the environment, so
# that the trainings tests start as subprocesses compile the programs this process compiles (and load
# them from the compilation cache).
os.environ["JAX_DEFAULT_MATMUL_PRECISION"] = "highest"

import numpy as np  # noqa: E402
import pytest  # noqa: E402


# ---------------------------------------------------------------- data: tiny audio fixtures

# Common Voice 23 column order; the loader reads columns by name, not position.
CV_COLUMNS = ("client_id", "path", "sentence_id", "sentence", "sentence_domain", "up_votes",
              "down_votes", "age", "gender", "accents", "variant", "locale", "segment")

# (split, clip stem, speaker, seconds, sentence). Sentences carry '"' and Turkish capitals on
# purpose: quote-aware TSV readers and locale-free lowercasing both get them wrong.
CV_ROWS = (
    ("train", "common_voice_tr_1", "spk_a", 0.6, 'Bu "çok" güzel bir gün.'),
    ("train", "common_voice_tr_2", "spk_a", 1.1, "İstanbul'da IŞIK var"),
    ("train", "common_voice_tr_3", "spk_b", 0.8, "Ağaç, dal ve yaprak!"),
    ("train", "common_voice_tr_4", "spk_c", 1.4, 'O dedi ki: "gel"'),
    ("dev", "common_voice_tr_5", "spk_d", 0.7, "Merhaba dünya"),
    ("dev", "common_voice_tr_6", "spk_d", 0.9, "Nasılsın?"),
    ("test", "common_voice_tr_7", "spk_e", 1.0, "Görüşürüz"),
)


def write_audio(path, seconds: float, sampling_rate: int, *, channels: int = 1,
                freq: float = 220.0, seed: int = 0) -> np.ndarray:
    """Write a tone plus a little noise; the format follows the suffix (.wav/.flac/.mp3/.ogg).

    Returns the written float32 signal ``[samples, channels]``.
    """
    import soundfile as sf

    n = int(round(seconds * sampling_rate))
    t = np.arange(n) / sampling_rate
    rng = np.random.default_rng(seed)
    chans = [0.3 * np.sin(2 * np.pi * freq * (c + 1) * t) + 0.01 * rng.standard_normal(n)
             for c in range(channels)]
    data = np.stack(chans, axis=1).astype(np.float32)
    fmt = {".mp3": "MP3", ".ogg": "OGG"}.get(os.path.splitext(str(path))[1].lower())
    sf.write(str(path), data, sampling_rate, format=fmt)
    return data


def make_cv_folder(root, rows=CV_ROWS, *, sampling_rate: int = 48000, durations: bool = True):
    """A Common Voice language folder (clips/*.mp3, <split>.tsv, clip_durations.tsv) in ``root``."""
    root = str(root)
    os.makedirs(os.path.join(root, "clips"), exist_ok=True)
    by_split: dict[str, list] = {}
    for k, (split, stem, speaker, seconds, sentence) in enumerate(rows):
        write_audio(os.path.join(root, "clips", stem + ".mp3"), seconds, sampling_rate,
                    freq=150.0 + 40 * k, seed=k)
        by_split.setdefault(split, []).append((stem, speaker, seconds, sentence))
    for split in ("train", "dev", "test", "validated", "other"):
        with open(os.path.join(root, f"{split}.tsv"), "w", encoding="utf-8") as f:
            f.write("\t".join(CV_COLUMNS) + "\n")
            for k, (stem, speaker, _, sentence) in enumerate(by_split.get(split, [])):
                values = dict(client_id=speaker, path=stem + ".mp3", sentence_id=f"s{k}",
                              sentence=sentence, up_votes="2", down_votes="0", locale="tr")
                f.write("\t".join(values.get(c, "") for c in CV_COLUMNS) + "\n")
    if durations:
        with open(os.path.join(root, "clip_durations.tsv"), "w", encoding="utf-8") as f:
            f.write("clip\tduration[ms]\n")
            for _, stem, _, seconds, _ in rows:
                f.write(f"{stem}.mp3\t{int(round(seconds * 1000))}\n")
    return root


def built_once(name: str, build) -> str:
    """RUN_HOME/shared/`name`, made by `build(path)` in the first of the test run's processes that asks and
    reused by the others: pytest-xdist's workers wait for it under a file lock instead of each building
    their own. A build that fails leaves no completion mark, so the next process that asks builds it again."""
    import fcntl

    path = os.path.join(RUN_HOME, "shared", name)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not os.path.exists(path + ".done"):
            shutil.rmtree(path, ignore_errors=True)
            build(path)
            open(path + ".done", "w").close()
    return path


@pytest.fixture(scope="session")
def cv_dir():
    """A read-only tiny Common Voice Turkish folder shared by the data tests (and by the workers)."""
    return os.path.join(built_once("cv", lambda path: make_cv_folder(os.path.join(path, "tr"))), "tr")


@pytest.fixture
def audio_writer():
    """The :func:`write_audio` helper, as a fixture."""
    return write_audio


@pytest.fixture
def cv_maker():
    """The :func:`make_cv_folder` helper, as a fixture."""
    return make_cv_folder


# ---------------------------------------------------------------- measured numbers, printed at the end

_MEASURED: list[tuple[str, str]] = []


_MEASURED_KEY = "measured: "


@pytest.fixture
def report(request):
    """`report(name, value)`: a measured figure (parity error, loss...) printed in pytest's summary. It travels
    as a user property of the test's report, so the figures of xdist's workers reach the summary too."""
    def add(name: str, value) -> None:
        request.node.user_properties.append(
            (_MEASURED_KEY + name, f"{value:.3e}" if isinstance(value, float) else str(value)))
    return add


def pytest_runtest_logreport(report):
    if report.when == "call":
        _MEASURED.extend((key[len(_MEASURED_KEY):], value) for key, value in report.user_properties
                         if key.startswith(_MEASURED_KEY))


def pytest_terminal_summary(terminalreporter):
    if _MEASURED:
        terminalreporter.section("measured")
        width = max(len(name) for name, _ in _MEASURED)
        for name, value in _MEASURED:
            terminalreporter.write_line(f"{name:<{width}}  {value}")


# ---------------------------------------------------------------- one trained tiny run for many tests


@pytest.fixture(scope="session")
def trained_run(cv_dir):
    """(config, run directory) of a finished 6-step tiny run: evaluated on dev+test at steps 3 and 6,
    checkpoints kept by newest and best eval/wer. Trained once per test run, whichever worker asks first.
    Read-only: copy it before changing it."""
    from pathlib import Path

    from _runs import tiny_run_config
    from xlsr_jax.recipe import train

    def config(out: str):
        return tiny_run_config(cv_dir, Path(out), max_steps=6, eval_steps=3, save_steps=3)

    out = built_once("trained", lambda path: train(config(path)))
    return config(out), Path(out) / "run"


# Session fixtures that train. A test that uses one (directly or through another fixture, as forced_run
# uses trained_run) may be the one that pays for the training, so it is `slow` like a test that trains.
TRAINING_FIXTURES = frozenset({"trained_run"})


@pytest.hookimpl(tryfirst=True)  # before `-m "not slow"` deselects by marker
def pytest_collection_modifyitems(items):
    """Marks the tests of a training fixture `slow`, and puts the longest files first: pytest-xdist hands whole
    files to its workers in this order, and a long file that starts last is the run's tail. Longest: a test
    with its own longer deadline (`pytest.mark.timeout`), then any slow test."""
    for item in items:
        if TRAINING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    weight: dict[str, tuple] = {}
    for item in items:
        deadline = item.get_closest_marker("timeout")
        mine = (deadline.args[0] if deadline else 0, item.get_closest_marker("slow") is not None)
        file = item.nodeid.split("::")[0]
        weight[file] = max(weight.get(file, mine), mine)
    items.sort(key=lambda item: weight[item.nodeid.split("::")[0]], reverse=True)  # stable: files keep their order


# ---------------------------------------------------------------- a run with known transcripts (tests/_forced.py)


@pytest.fixture(scope="session")
def forced_run(trained_run, tmp_path_factory):
    """(config, run directory): `trained_run` with its checkpoints replaced by forced heads whose
    transcripts and WERs are known (`_forced.SPELLINGS`): step 3 is the best, step 6 the newest.
    Read-only: copy it before changing it."""
    from _forced import make_forced_run

    config, run = trained_run
    return config, make_forced_run(run, tmp_path_factory.mktemp("forced") / "run")
