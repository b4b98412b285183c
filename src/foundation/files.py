"""Files read from untrusted places and files written where the disk may fill.

Reading: `open_regular` opens a path only if it is a regular file. A FIFO named `x.jpg` would block `open()`
until some process writes to it (for ever, in a training run), and a link to `/dev/zero` never ends; so the
path is opened with O_NONBLOCK (which makes opening a FIFO or a device return at once) and fstat'd, and
anything but a regular file is refused before a byte is read. The check is on the descriptor, not a stat of
the name before, so no swap between check and open gets past it.

Writing: `preallocate` reserves a file's final size with posix_fallocate, so a full disk is an ENOSPC error
before any work is done rather than a SIGBUS in the middle of writing through a memory map (the kernel has
no other way to report a failed page write of a mapping). `write_failure` gives the OS's reason for any
failed write, for one-line messages.
"""
from __future__ import annotations

import json
import os
import stat
from typing import Any, BinaryIO, Union

from foundation.errors import UserError

PathLike = Union[str, "os.PathLike[str]"]


class NotRegularFile(UserError, OSError):
    """A path that names a FIFO, socket, device or directory where a regular file is read."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def open_regular(path: PathLike) -> BinaryIO:
    """`path` opened for binary reading if it is a regular file (symbolic links followed to one); never blocks
    on a FIFO or a device. Raises NotRegularFile for anything else, FileNotFoundError/OSError as `open` does,
    ValueError for a path holding a NUL byte."""
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)
    fd = os.open(path, flags)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotRegularFile(f"{os.fspath(path)} is {_kind(mode)}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_json(path: PathLike, max_bytes: int, what: str = "JSON") -> Any:
    """The JSON value of a small file from elsewhere: a regular file of at most `max_bytes`, strict UTF-8, no
    NaN or Infinity. Any refusal is a UserError naming the file (`what` says what it should have been)."""
    where = os.fspath(path)
    try:
        with open_regular(path) as f:
            data = f.read(max_bytes + 1)
    except (OSError, ValueError) as e:
        raise UserError(f"{where} cannot be read ({e})") from None
    if len(data) > max_bytes:
        raise UserError(f"{where}: over {max_bytes:,} bytes, no {what}")
    try:
        return json.loads(data.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise UserError(f"{where} is not valid JSON ({detail})") from None


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a number JSON allows")


def preallocate(file: BinaryIO, size: int) -> None:
    """Reserve `size` bytes of disk for the open `file` (posix_fallocate): a disk too full for them fails here
    with ENOSPC. glibc falls back to writing zeros where the file system has no fallocate."""
    if size > 0:
        os.posix_fallocate(file.fileno(), 0, size)


def write_failure(error: BaseException) -> str:
    """The OS's reason for a failed write (e.g. "No space left on device"), found anywhere in the chain."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror:
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    return f"{type(error).__name__}: {str(error).splitlines()[0][:200] if str(error) else ''}"
