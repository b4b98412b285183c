"""One writer per run folder: an advisory lock file that names its holder (host, pid).

The trainer (global rank 0, for the run's life) and the checkpoint monitor each take their own lock file in
the run folder, so two trainers cannot fork one run and two monitors cannot score every checkpoint twice,
while a trainer and its monitor run side by side.

The lock is a POSIX record lock (`fcntl.lockf`) on the whole file:

- the kernel drops it when the holder ends, however it ends (SIGKILL included), so a lock file left by a
  dead process is simply free and is taken over with no clean-up step;
- unlike `flock`, a forked child (a data-loader worker) does not inherit it, so a killed trainer's workers,
  which linger a few seconds, do not keep its successor out;
- it works across hosts on NFS (through the NFS lock manager), where two nodes may share the run folder.

One rule comes with POSIX locks: a process loses its lock when it closes *any* descriptor of the file, so
the holder never opens its own lock file a second time (nothing here does).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Dict, Optional

from foundation.errors import UserError


class LockHeld(UserError):
    """Another live process holds the lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def read_holder(path: str | Path) -> Dict[str, object]:
    """What a lock file says about its (last) holder: {"host", "pid", "since"}, or {} when empty/unreadable.
    Never call this in the holding process: closing the descriptor would release its own lock."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8") or "{}")
    except (OSError, ValueError):
        return {}


class RunLock:
    """`RunLock(path, what).acquire()` or LockHeld naming the holder; held until `release()` or the end of the
    process. `what` names the holder's role in messages ("trainer", "monitor")."""

    # a holder writes its name right after it locks; a reader that finds the lock taken but the name missing
    # or naming a dead process on this host retries for this long before reporting it
    SETTLE_SECONDS = 5.0

    def __init__(self, path: str | Path, what: str):
        self.path = Path(path)
        self.what = what
        self._fd: Optional[int] = None
        self.previous: Dict[str, object] = {}  # the last holder named in the file, when this lock took it over

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + self.SETTLE_SECONDS
        while True:
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:  # EACCES or EAGAIN: held
                holder = read_holder(self.path)
                if self._holder_may_be_settling(holder) and time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                os.close(fd)
                raise LockHeld(self._held_message(holder)) from None
        # the file still names the last holder, if any: free, so that process has ended
        self.previous = _read_fd(fd)
        record = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing drops the lock; the file stays, naming its last holder

    @property
    def held(self) -> bool:
        return self._fd is not None

    def _holder_may_be_settling(self, holder: Dict[str, object]) -> bool:
        if not holder.get("pid"):
            return True  # locked but not yet named
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder["pid"]))

    def _held_message(self, holder: Dict[str, object]) -> str:
        if holder.get("pid"):
            who = f"pid {holder['pid']} on {holder.get('host', '?')}"
            if holder.get("since"):
                who += f" (since {holder['since']})"
        else:
            who = "another process, which has not written its host and pid"
        return (f"another {self.what} holds {self.path}: {who}; stop it first, or wait for it to end "
                f"(the lock frees itself when its holder exits)")


def _read_fd(fd: int) -> Dict[str, object]:
    try:
        size = os.fstat(fd).st_size
        return json.loads(os.pread(fd, size, 0).decode("utf-8") or "{}") if size else {}
    except (OSError, ValueError):
        return {}
