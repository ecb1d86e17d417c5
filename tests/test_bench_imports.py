"""The training benchmark runs on machines without the data/eval extras (a lent GPU has jax, flax, optax,
orbax, transformers and torch, but no librosa, soundfile, jiwer or datasets)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a subprocess

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_train.py"

# Not needed to train: audio decoding, WER, dataset hubs, plots, LM decoding. tqdm is not here on purpose:
# transformers imports it unconditionally, so it is present wherever transformers is.
ABSENT = ("librosa", "soundfile", "jiwer", "datasets", "matplotlib", "kenlm", "pyctcdecode")


def test_benchmark_imports_without_data_extras():
    # A fresh interpreter: this test process has long imported the real modules. `sys.modules[name] = None`
    # makes `import name` raise ImportError, as if the package were not installed.
    code = textwrap.dedent(f"""
        import importlib.util, runpy, sys
        for name in {ABSENT!r}:
            sys.modules[name] = None
        bench = runpy.run_path({str(SCRIPT)!r}, run_name="bench_train")  # module-level imports only
        try:
            bench["main"](["--help"])
        except SystemExit as exit:
            assert exit.code == 0, exit.code
        if importlib.util.find_spec("torch") is not None:
            bench["import_torch"]()  # the PyTorch side's imports (lazy: --skip-torch needs no torch)
        print("imports ok")
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imports ok" in result.stdout
