"""One writer per output folder: a second ``eqssl-reproduce`` or ``eqssl-make-corpus`` on a folder
that another one is still writing stops at once, naming the process that holds it.

The lock is an advisory ``fcntl.flock`` on ``FOLDER/.eqssl.lock``: the kernel releases it when its
process ends, however it ends, so a run that was killed leaves no lock behind, only the file with
its owner's description, which the next run takes over with a warning. (flock is local to one
machine; on a network file system shared by several machines it may not exclude a run elsewhere.)
"""

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from typing import Iterator

LOCK_NAME = ".eqssl.lock"


class FolderLockedError(RuntimeError):
    """The folder is being written by another running process; the message names it."""


class StaleLockWarning(UserWarning):
    """A lock left by a run that ended without releasing it (killed) was taken over."""


def _describe(owner: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.get("started", 0)))
    return (f"{owner.get('program', '?')} (pid {owner.get('pid', '?')} on {owner.get('host', '?')}, started "
            f"{started}: {owner.get('command', '?')})")


@contextlib.contextmanager
def folder_lock(folder: str, program: str) -> Iterator[None]:
    """Hold ``folder``'s lock while the block runs (the folder is created if need be).

    Raises FolderLockedError at once if another process holds it; warns (StaleLockWarning) when
    it takes over the lock of a process that ended without releasing it."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, LOCK_NAME)
    handle = open(path, "a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = _read_owner(handle.read())
            raise FolderLockedError(
                f"{folder} is being written by {_describe(owner) if owner else 'another process'}; wait for it to "
                f"finish or stop it, then rerun (finished stages are kept)") from None
        handle.seek(0)
        left = _read_owner(handle.read())
        if left:
            warnings.warn(f"{folder}: taking over the lock of {_describe(left)}, which ended without releasing it "
                          "(killed?); its finished work is kept", StaleLockWarning, stacklevel=3)
        handle.seek(0)
        handle.truncate()
        json.dump({"program": program, "pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                   "command": " ".join(sys.argv)}, handle)
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()  # an empty file: released cleanly, nothing to take over
            handle.flush()
    finally:
        handle.close()  # closing releases the flock


def _read_owner(text: str) -> dict:
    try:
        owner = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError:
        return {"program": "an unknown program"}
    return owner if isinstance(owner, dict) else {}
