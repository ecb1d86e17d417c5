"""xlsr_jax.host: glibc keeps the memory XLA:CPU frees, so the next step does not page-fault it in again."""

import os
import platform
import subprocess
import sys

import pytest

from xlsr_jax import host

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc's malloc only")

# A jitted step whose 64 MiB result is freed before the next call: the page faults each later call takes.
PROBE = """
import resource, sys
from xlsr_jax.host import retain_freed_memory
print(retain_freed_memory())
import jax, jax.numpy as jnp
step = jax.jit(lambda x: x * 2.0)
x = jnp.ones((4096, 4096), jnp.float32)
faults = []
for _ in range(32):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    y = step(x)
    y.block_until_ready()
    del y
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(sum(faults[16:]) // 16384)  # blocks faulted in over the last 16 calls
"""


def _probe(opt_out: str) -> tuple[str, int]:
    env = {**os.environ, host.OPT_OUT_ENV: opt_out, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_freed_step_memory_is_reused_without_page_faults():
    applied, faults = _probe("0")
    assert applied == "True"
    # Reused: the heap may still grow a block's worth now and then early on (when a result is freed
    # after the next call allocates, which is timing-dependent), not every call.
    assert faults <= 3


def test_opt_out_keeps_glibc_defaults_and_their_page_faults():
    applied, faults = _probe("1")
    assert applied == "False"
    assert faults >= 15  # glibc maps and unmaps the block each call: what the setting removes


def test_not_applied_once_jax_has_started(monkeypatch):
    import jax

    monkeypatch.setenv(host.OPT_OUT_ENV, "0")
    jax.devices()  # this process's threads hold their arenas now: the setting would bring no gain
    assert host.retain_freed_memory() is False


def test_cpu_backend_from_jax_platforms(monkeypatch):
    monkeypatch.setenv("JAX_PLATFORMS", "cuda,cpu")
    assert not host.cpu_is_jax_backend()
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    assert host.cpu_is_jax_backend()


def test_an_installed_accelerator_plugin_means_no_cpu_backend(monkeypatch, tmp_path):
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    assert host.cpu_is_jax_backend()  # this environment: jax and jaxlib only
    # What jax[cuda] installs: a PJRT plugin module in the `jax_plugins` namespace package.
    (tmp_path / "jax_plugins" / "xla_cuda13").mkdir(parents=True)
    (tmp_path / "jax_plugins" / "xla_cuda13" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert not host.cpu_is_jax_backend()
