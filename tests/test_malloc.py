"""xlsr_jax.malloc: glibc keeps the memory XLA:CPU frees, so the next step does not page-fault it in again."""

import importlib.util
import os
import platform
import subprocess
import sys

import pytest

from xlsr_jax import malloc

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

# One thread, no JAX, no timing: a 64 MiB block malloc'ed, written and freed, round after round, as
# XLA:CPU does with a step's temporaries. glibc's defaults serve a block over its 32 MiB mmap ceiling
# with mmap and unmap it on free, so each round faults every page in again; the setting keeps the block
# in the heap for the next round. (What this is worth to a real jitted step: scripts/bench_host.py.)
PROBE = """
import ctypes, resource
from xlsr_jax.malloc import retain_freed_memory
print(retain_freed_memory())
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 64 << 20
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(size)
    ctypes.memset(block, 1, size)
    libc.free(block)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(size // resource.getpagesize(), *faults)
"""


def _probe(opt_out: str) -> tuple[str, int, list[int]]:
    """(whether the setting was applied, pages in the block, page faults of each round)."""
    env = {**os.environ, malloc.OPT_OUT_ENV: opt_out, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    return out[0], int(out[1]), [int(n) for n in out[2:]]


@pytest.mark.slow  # a subprocess
def test_freed_memory_is_reused_without_page_faults():
    applied, pages, faults = _probe("0")
    assert applied == "True"
    # The first round grows the heap: its pages fault in once (bar the few the heap's top already had).
    assert faults[0] >= 0.9 * pages
    assert max(faults[1:]) <= pages // 100  # later rounds reuse it (a stray page of Python's own, at most)


@pytest.mark.slow  # a subprocess
def test_opt_out_keeps_glibc_defaults_and_their_page_faults():
    applied, pages, faults = _probe("1")
    assert applied == "False"
    assert min(faults) >= 0.9 * pages  # glibc maps and unmaps the block each round: what the setting removes


def test_not_applied_once_jax_has_started(monkeypatch):
    import jax

    monkeypatch.setenv(malloc.OPT_OUT_ENV, "0")
    jax.devices()  # this process's threads hold their arenas now: the setting would bring no gain
    assert malloc.retain_freed_memory() is False


def test_cpu_backend_from_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not malloc.cpu_is_jax_backend()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert malloc.cpu_is_jax_backend()


def _without_libtpu(monkeypatch, present: bool = False):
    """The test install brings libtpu (the TPU plans' tests): hide it, or pretend it is there."""
    find_spec = importlib.util.find_spec

    def lookup(name, *args):
        if name == "libtpu":
            return find_spec("json") if present else None  # any module's spec says "installed"
        return find_spec(name, *args)
    monkeypatch.setattr(importlib.util, "find_spec", lookup)


def test_installed_libtpu_means_no_cpu_backend(monkeypatch):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    _without_libtpu(monkeypatch, present=False)
    assert malloc.cpu_is_jax_backend()  # jax and jaxlib only
    _without_libtpu(monkeypatch, present=True)
    assert not malloc.cpu_is_jax_backend()


def test_an_installed_accelerator_plugin_means_no_cpu_backend(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    _without_libtpu(monkeypatch)
    assert malloc.cpu_is_jax_backend()  # jax and jaxlib only
    # What jax[cuda] installs: a PJRT plugin module in the `jax_plugins` namespace package.
    (tmp_path / "jax_plugins" / "xla_cuda13").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_cuda13" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not malloc.cpu_is_jax_backend()
