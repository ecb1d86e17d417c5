"""Folders that appear whole or not at all: the decoded-audio cache and extracted archives.

Both are built in a temporary sibling folder (``<final>.partial-<host>-<pid>``) that is renamed to
its final name at the end. Any failure removes it, and so does SIGTERM: by default SIGTERM kills a
Python process without running ``finally`` blocks, which would leave a multi-GB half-built folder
behind on every preemption. The trainer's own SIGTERM handler is only installed around the step
loop, so while data is prepared SIGTERM still has its default action; :func:`sigterm_raises`
turns it into an exception for the duration of the build.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import shutil
import signal
import socket
import threading
from typing import Iterator

log = logging.getLogger(__name__)


class Terminated(SystemExit):
    """SIGTERM arrived while a folder was being built. A SystemExit with status 128 + SIGTERM (143, what
    a shell reports for a process SIGTERM killed): uncaught, it ends the process quietly with that
    status after every ``finally`` block ran."""


_RUNTIME_OWNS_SIGTERM = False


def runtime_owns_sigterm() -> None:
    """Say that JAX's multi-process runtime has installed its SIGTERM handler (a C one, for its preemption
    notifier). Python cannot see a handler installed from C (`signal.getsignal` still says SIG_DFL), and
    :func:`sigterm_raises` would replace it and put back SIG_DFL: the next SIGTERM would then kill the process
    instead of reaching every host."""
    global _RUNTIME_OWNS_SIGTERM
    _RUNTIME_OWNS_SIGTERM = True


@contextlib.contextmanager
def sigterm_raises(what: str) -> Iterator[None]:
    """Within: SIGTERM raises :class:`Terminated` instead of killing the process at once.

    Only where SIGTERM has its default action, and only in the main thread (the only one Python lets
    install handlers): a handler someone else installed (the trainer's, a user's, JAX's multi-process
    runtime's: see :func:`runtime_owns_sigterm`) or SIG_IGN is theirs to keep. A second SIGTERM while
    the first unwinds is ignored, so cleanup can finish. The previous handler is back when the block
    ends.
    """
    if (_RUNTIME_OWNS_SIGTERM or threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return
    raised = False

    def handler(signum, _frame):
        nonlocal raised
        if raised:
            return
        raised = True
        log.warning("signal %d while %s: stopping", signum, what)
        raise Terminated(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_partials(final: str) -> None:
    """Remove this host's ``<final>.partial-<host>-<pid>`` folders whose process is gone (a SIGKILL or
    power loss left them; no handler runs then). Other hosts' are left alone: their pids mean nothing
    here, and they may be building right now on a shared file system."""
    prefix = f"{final}.partial-{socket.gethostname()}-"
    for path in glob.glob(glob.escape(prefix) + "*"):
        pid = path[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
            log.info("removing %s, left by a process that no longer runs", path)
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def partial_folder(final: str, what: str) -> Iterator[str]:
    """A fresh, empty temporary sibling of ``final`` to build in; removed when the block ends (after
    the caller renamed it to ``final`` there is nothing left to remove), whether it ends normally, by
    an exception, by SIGINT (KeyboardInterrupt) or by SIGTERM (:class:`Terminated`).

    Host and pid are in the name: hosts of a pod may share the file system and build at once.
    """
    remove_stale_partials(final)
    tmp = f"{final}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with sigterm_raises(what):
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
