"""Output paths: the package writes regular files only.

:func:`regular_target` is the check every writer (the CLI's ``-o``, state files, history files)
makes before anything changes: the path, or through symbolic links the file they finally name,
must be a regular file or a file still to be created in an existing folder.  A directory, FIFO,
character or block device or socket is refused, never replaced.  A symbolic link is followed:
its target is written and the link stays a link.  :func:`replace_regular` writes through a
temporary file in the target's folder and renames it over the target, checking again just
before the rename.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Optional

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISLNK, "a symbolic link that cannot be resolved (a loop)"))


def kind_of(mode: int) -> Optional[str]:
    """What a file of ``os.stat`` mode ``mode`` is, or None for a regular file."""
    return next((name for test, name in _KINDS if test(mode)), None if stat.S_ISREG(mode) else "not a regular file")


def regular_target(path: "str | os.PathLike", what: str, error: type[Exception]) -> Path:
    """The regular file that writing ``what`` to ``path`` replaces or creates.

    That is ``path`` itself, or through symbolic links the file they finally name.  Raises
    ``error`` with one line naming ``path`` (and the link's target) when it is not a regular file
    or a file to be created in an existing folder.
    """
    given = Path(path)
    target = Path(os.path.realpath(given))
    via = f" (a symbolic link to {target})" if target != Path(os.path.abspath(given)) else ""
    try:
        mode: Optional[int] = os.lstat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise error(f"{what} {path}{via} cannot be checked: {exc.strerror or exc}") from None
    if mode is not None:
        kind = kind_of(mode)
        if kind is not None:
            raise error(f"{what} {path}{via} is {kind}; only regular files are written (give a file path)")
        return target
    if not target.parent.is_dir():
        dangling = " is a dangling symbolic link:" if via else ":"
        raise error(f"{what} {path}{dangling} folder {target.parent} does not exist")
    return target


def replace_regular(path: "str | os.PathLike", text: str, what: str, error: type[Exception], *,
                    fsync: bool = False) -> Path:
    """Write ``text`` to the regular file :func:`regular_target` finds for ``path``, atomically.

    A reader sees the old or the new file, never a part.  The file keeps the mode of the file it
    replaces (a new file: 0666 minus the umask).  ``fsync``: flush the file and its folder to disk.
    Raises ``error`` naming ``path`` when it is not a regular file or cannot be written; the
    target is then unchanged.  Returns the file written.
    """
    target = regular_target(path, what, error)
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask
    except OSError as exc:
        raise error(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=target.name + ".", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise error(f"cannot write {what} {path}: cannot create a file in {target.parent}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(text)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
        if regular_target(path, what, error) != target:
            raise error(f"{what} {path} changed while it was written; nothing was replaced")
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise error(f"cannot write {what} {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if fsync:
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    return target
