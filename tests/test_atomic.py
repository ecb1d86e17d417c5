import os
import signal
import socket
import subprocess
import sys

import pytest

from xlsr_jax.atomic import partial_folder, remove_stale_partials, sigterm_raises


def test_partial_folder_is_removed_on_error_and_renamed_on_success(tmp_path):
    final = str(tmp_path / "built")
    with pytest.raises(RuntimeError):
        with partial_folder(final, "testing") as tmp:
            open(os.path.join(tmp, "half"), "w").close()
            raise RuntimeError("decoder crashed")
    assert os.listdir(tmp_path) == []
    with partial_folder(final, "testing") as tmp:
        open(os.path.join(tmp, "whole"), "w").close()
        os.rename(tmp, final)
    assert os.listdir(tmp_path) == ["built"] and os.listdir(final) == ["whole"]


def test_sigterm_handler_restored_and_a_custom_one_left_alone():
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with sigterm_raises("testing"):
        assert callable(signal.getsignal(signal.SIGTERM))  # converted while inside
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: seen.append(signum))
    try:
        with sigterm_raises("testing"):
            os.kill(os.getpid(), signal.SIGTERM)  # the trainer's (here: our) handler gets it, no exception
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_stale_partials_of_dead_processes_on_this_host_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    host, final = socket.gethostname(), str(tmp_path / "cache")
    names = [f"cache.partial-{host}-{dead.stdout.strip()}",  # killed -9 mid-build: removed
             f"cache.partial-{host}-{os.getppid()}",  # alive (pytest's parent): left alone
             "cache.partial-some-other-host-1"]  # another host of a pod: left alone
    for name in names:
        (tmp_path / name).mkdir()
    remove_stale_partials(final)
    assert sorted(os.listdir(tmp_path)) == sorted(names[1:])
