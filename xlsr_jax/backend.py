"""The backend a program is traced for.

The model picks kernels by backend while it is traced (CPU lane sums and heads-first attention, the
positional conv's and attention's `auto` choices). That is the default backend, except while compiling
ahead of time for devices this process does not drive (`xlsr-jax plan --topology v5e:2x4` on a CPU host
compiles for a TPU): `compiling_for("tpu")` then makes the model trace what it would trace on a TPU.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import jax

# A process-wide setting, not a context variable: plan traces each bucket's step in its own thread.
_lock = threading.Lock()
_target: str | None = None


def target_backend() -> str:
    """"cpu", "gpu" or "tpu": the platform being compiled for (the default backend's unless overridden)."""
    return _target or jax.default_backend()


@contextlib.contextmanager
def compiling_for(platform: str) -> Iterator[None]:
    """Trace for `platform` ("cpu", "gpu", "tpu") inside the block; blocks do not nest."""
    global _target
    if platform not in ("cpu", "gpu", "tpu"):
        raise ValueError(f"compiling_for({platform!r}): use cpu, gpu or tpu")
    with _lock:
        if _target is not None:
            raise RuntimeError(f"already compiling for {_target}")
        _target = platform
    try:
        yield
    finally:
        with _lock:
            _target = None
