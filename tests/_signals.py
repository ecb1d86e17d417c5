"""SIGTERM a subprocess in the middle of what it is building: shared by the cache and archive tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time


def sigterm_midway(script: str, args: list[str], marker: str, *, after: int, timeout: float = 60.0,
                   env: dict | None = None) -> tuple[int, str]:
    """Run ``python -c script *args``; once it has appended ``after`` bytes to the file ``marker`` (the
    script's slowed work writes one per item), SIGTERM it (it alone, as `docker stop` or a scheduler does).
    Returns (exit status, stderr). A script that finishes before that fails the test: the signal would
    have come too late to show anything. Whatever it started (decoding workers) is killed at the end."""
    with tempfile.TemporaryFile("w+") as stderr:
        # Its own session: the workers it leaves behind, if any, can be killed as a group. stderr to a
        # file, not a pipe, which orphaned workers would keep open.
        proc = subprocess.Popen([sys.executable, "-c", script, *args], stdout=subprocess.DEVNULL, stderr=stderr,
                                text=True, env=env, start_new_session=True)
        try:
            deadline = time.monotonic() + timeout
            while not (os.path.exists(marker) and os.path.getsize(marker) >= after):
                if proc.poll() is not None:
                    stderr.seek(0)
                    raise AssertionError(f"ended (status {proc.returncode}) before it was signalled:\n{stderr.read()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"no progress within {timeout} s")
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            status = proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        stderr.seek(0)
        return status, stderr.read()
