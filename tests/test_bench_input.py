"""scripts/bench_input.py runs end to end at tiny sizes, without jax, and ends with the four figure lines
(figures not checked: this is no timing test)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # a subprocess

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "bench_input.py"


def test_bench_input_runs_without_jax(tmp_path):
    # A fresh interpreter where `import jax` fails: the input pipeline must not need it.
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.modules["jax"] = None
        bench = runpy.run_path({str(SCRIPT)!r}, run_name="bench_input")
        bench["main"](["--clips", "12", "--batch-size", "4", "--num-buckets", "2", "--workers", "1",
                       "--seconds", "0.05", "--plan-clips", "200", "--dir", {str(tmp_path)!r}])
    """)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    last = result.stdout.strip().splitlines()[-4:]
    assert [line.split(":")[0] for line in last] == [
        "cache_audio_s_per_s", "mp3_audio_s_per_s", "padded_fraction", "shapes"], result.stdout
    assert all(re.fullmatch(r"[a-z_0-9]+: [0-9.]+", line) for line in last), last
    assert int(last[-1].split()[-1]) <= 2  # one shape per bucket at most
    assert len(list((tmp_path / "clips").glob("*.mp3"))) == 12
