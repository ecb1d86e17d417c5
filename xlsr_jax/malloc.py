"""Host-process settings for XLA:CPU: glibc's malloc keeps the memory a train step frees for the next one.

XLA:CPU allocates a step's temporaries as one block per execution and frees it when the step ends. glibc
serves a block over 32 MiB with mmap and returns it with munmap, so every step page-faults all of it in
again: on 2 cores, 202 MiB of faults per step for the demo model and 1.7 GiB for a 16 M-parameter one,
with 17-19 % of the process's CPU time spent in the kernel; the 16 M model's step fell from 2.53 to
2.20 s once the block stayed mapped (scripts/bench_train.py; PyTorch's CPU step gains as much, 3.34 ->
2.62 s, as its allocator is the same malloc). The cost is that freed memory is not handed back to the
system while the process runs, which a training process, whose next step needs it again, does not miss,
and XLA's compiler, whose threads now share one arena, compiles slower (demo step 7.8 -> 10.4 s; once per
shape and machine, as compiled steps are cached): so only where JAX will compute on the CPU, where a
demo training run gained 20 % (94 -> 113 audio-s/s over 300 steps).

`XLSR_JAX_SYSTEM_MALLOC=1` keeps glibc's defaults.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import pkgutil
import platform
import sys

# glibc's mallopt parameters (malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8

OPT_OUT_ENV = "XLSR_JAX_SYSTEM_MALLOC"

# Why each: XLA allocates from its own threads, which would each get a separate arena, and an arena
# other than the main one maps any block too large for its 64 MiB heaps whatever M_MMAP_MAX says, so
# one arena; no mmap, so large blocks come from the heap and are reused; -1: never trim the heap.
SETTINGS = ((M_ARENA_MAX, 1), (M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, -1))


def accelerator_installed() -> bool:
    """Whether JAX would find an accelerator backend: a PJRT plugin where JAX looks for one (a module in
    the `jax_plugins` namespace package or a "jax_plugins" entry point; a GPU machine's jax[cuda] installs
    one) or the TPU runtime (`libtpu`). Looked up without importing them, at every `xlsr-jax` start:
    ~15 ms here, where reading every installed distribution's metadata took 50-100 ms."""
    namespace = importlib.util.find_spec("jax_plugins")
    if namespace is not None and any(pkgutil.iter_modules(namespace.submodule_search_locations)):
        return True
    if importlib.metadata.entry_points(group="jax_plugins"):
        return True
    return importlib.util.find_spec("libtpu") is not None


def cpu_is_jax_backend() -> bool:
    """Whether JAX will compute on the CPU, decided without starting it: JAX_PLATFORMS when set, else
    whether no accelerator backend is installed."""
    platforms = os.environ.get("JAX_PLATFORMS", "").strip()
    if platforms:
        return platforms.split(",")[0].strip().lower() == "cpu"
    return not accelerator_installed()


def _jax_started() -> bool:
    if "jax" not in sys.modules:
        return False
    # Private, on purpose: JAX has no public way to ask whether its backends have started without
    # starting them (jax.devices() would, and take the arenas this setting must precede). Guarded by
    # tests/test_malloc.py, which fails if the name moves.
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


def retain_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory mapped for reuse (see the module docstring); whether it did.

    Only before JAX has started (its threads take their arenas when they first allocate: later, the
    setting would change malloc for the process without the gain) and only when JAX will compute on the
    CPU; nothing off Linux/glibc or with `XLSR_JAX_SYSTEM_MALLOC` set to anything but "" or "0"."""
    if os.environ.get(OPT_OUT_ENV, "") not in ("", "0"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if _jax_started() or not cpu_is_jax_backend():
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    return all(libc.mallopt(param, value) == 1 for param, value in SETTINGS)
