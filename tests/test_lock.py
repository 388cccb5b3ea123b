"""helpers.runlock.RunLock: exclusive run folders, stale-lock takeover."""

import os
import socket
import subprocess
import sys

import pytest
from helpers import runlock
def write_lock(folder, pid, host=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".lock").write_text(f"{pid}\n{host or socket.gethostname()}\n")


@pytest.fixture
def sleeper():
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait(timeout=30)
    return proc.pid


def test_lock_file_holds_pid_and_host_and_is_removed_on_exit(tmp_path):
    run = tmp_path / "run"
    with runlock.RunLock(run) as lock:
        assert lock.path == run / ".lock"
        pid, host = (run / ".lock").read_text().split("\n")[:2]
        assert int(pid) == os.getpid() and host == socket.gethostname()
    assert not (run / ".lock").exists()


def test_second_lock_in_same_process_fails(tmp_path):
    with runlock.RunLock(tmp_path):
        with pytest.raises(runlock.RunLockedError) as info:
            runlock.RunLock(tmp_path).acquire()
        assert str(tmp_path) in str(info.value) and str(os.getpid()) in str(info.value)
    runlock.RunLock(tmp_path).acquire().release()  # free again after release


def test_lock_of_live_process_is_refused(tmp_path, sleeper):
    write_lock(tmp_path, sleeper.pid)
    with pytest.raises(runlock.RunLockedError) as info:
        with runlock.RunLock(tmp_path):
            pass
    assert str(tmp_path) in str(info.value) and f"pid {sleeper.pid}" in str(info.value)
    assert (tmp_path / ".lock").read_text().startswith(f"{sleeper.pid}\n")  # not stolen


def test_stale_lock_of_dead_process_is_taken_over(tmp_path):
    pid = dead_pid()
    write_lock(tmp_path, pid)
    with pytest.warns(RuntimeWarning, match=f"stale lock.*{pid}"):
        lock = runlock.RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text().startswith(f"{os.getpid()}\n")
    lock.release()
    assert not (tmp_path / ".lock").exists()


def test_lock_becomes_stale_when_holder_is_killed(tmp_path, sleeper):
    write_lock(tmp_path, sleeper.pid)
    with pytest.raises(runlock.RunLockedError):
        runlock.RunLock(tmp_path).acquire()
    sleeper.kill()
    sleeper.wait(timeout=10)
    with pytest.warns(RuntimeWarning, match="stale"):
        with runlock.RunLock(tmp_path):
            assert (tmp_path / ".lock").exists()


def test_lock_from_another_host_is_refused(tmp_path):
    write_lock(tmp_path, 12345, host="some-other-host.invalid")
    with pytest.raises(runlock.RunLockedError, match="some-other-host.invalid"):
        runlock.RunLock(tmp_path).acquire()


def test_unreadable_lock_file_is_refused_with_advice(tmp_path):
    (tmp_path / ".lock").write_text("garbage")
    with pytest.raises(runlock.RunLockedError, match="delete the lock file"):
        runlock.RunLock(tmp_path).acquire()


def test_release_on_exception_and_release_is_idempotent(tmp_path):
    lock = runlock.RunLock(tmp_path)
    with pytest.raises(KeyError):
        with lock:
            raise KeyError("x")
    assert not (tmp_path / ".lock").exists()
    lock.release()


def test_release_does_not_remove_someone_elses_lock(tmp_path, sleeper):
    lock = runlock.RunLock(tmp_path).acquire()
    write_lock(tmp_path, sleeper.pid)  # replaced behind our back
    lock.release()
    assert (tmp_path / ".lock").exists()


def test_lock_creates_the_folder(tmp_path):
    with runlock.RunLock(tmp_path / "a" / "b"):
        assert (tmp_path / "a" / "b" / ".lock").exists()
