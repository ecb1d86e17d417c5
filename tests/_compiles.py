"""Watching JAX compile: shared by the compile and loop tests."""

from __future__ import annotations

import contextlib
import dataclasses
import traceback

import jax

_JAX_FRAMES = ("/jax/", "/jaxlib/", "/contextlib.py", "/functools.py", "/_compiles.py")


@dataclasses.dataclass(frozen=True)
class CompileEvent:
    name: str  # e.g. /jax/core/compile/backend_compile_duration
    fun_name: str | None  # what was traced or compiled, where JAX says
    files: tuple[str, ...]  # the Python files on the stack that asked for it, outermost first

    def via(self, package: str) -> bool:
        """Whether `package` (e.g. "orbax") is on the stack: a compilation that library does for itself."""
        return any(f"/{package}/" in f for f in self.files)

    def __repr__(self) -> str:
        return f"CompileEvent({self.name}, {self.fun_name}, from {self.files[-1] if self.files else '?'})"


@contextlib.contextmanager
def compile_events():
    """The JAX compilation events (tracing, lowering, XLA compile, cache lookups) recorded while the
    block runs, from any thread, as `CompileEvent`s."""
    events: list[CompileEvent] = []

    def on_event(name, *_, fun_name=None, **__):
        if "/compil" in name:
            files = tuple(f.filename for f in traceback.extract_stack()
                          if not any(part in f.filename for part in _JAX_FRAMES))
            events.append(CompileEvent(name, fun_name, files))

    jax.monitoring.register_event_listener(on_event)
    jax.monitoring.register_event_duration_secs_listener(on_event)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_listener(on_event)
        jax.monitoring.unregister_event_duration_listener(on_event)
