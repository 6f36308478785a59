"""Writes that a crash, a kill or a full disk cannot leave half done.

- :func:`write_file_atomic`: the new content goes to a temporary file in the same directory, is
  flushed to disk (``fsync``) and renamed over the old file (``os.replace``, atomic on POSIX); a
  reader sees the old file or the new one, never a mixture. On any error the temporary file is
  removed and the old file is untouched.
- :func:`replace_directory`: puts a fully written directory in place of another. On Linux the two
  are exchanged in one step (``renameat2(RENAME_EXCHANGE)``); elsewhere (or on file systems without
  it) by two renames, whose one crash window — the old directory moved aside, the new one not yet
  in place — :func:`recover_directory` repairs at the next write. Either way the old directory is
  then deleted, and leftovers of an interrupted write (``.<name>.old``, ``.<name>.tmp-*``) are
  removed by the next write.
- :func:`check_writable`: fails early, before hours of training, on a directory that cannot be
  written (read-only file system, permissions).

Imports no TensorFlow.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

TMP_INFIX = ".tmp-"  # temporary siblings: .<name>.tmp-XXXXXXXX
OLD_SUFFIX = ".old"  # the old directory moved aside by the two-rename fallback: .<name>.old

# mkstemp creates files readable by the owner only; the files written here get the mode a plain
# open() would give them. The umask is read once: os.umask can only be read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync_directory(path: Path) -> None:
    """Makes a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temporary_sibling(path: Path) -> str:
    """Prefix of temporary files and directories written beside ``path``."""
    return f".{path.name}{TMP_INFIX}"


def write_file_atomic(path: str | os.PathLike, write: Callable[[IO[bytes]], object]) -> Path:
    """Calls ``write(f)`` on a temporary file beside ``path``, then renames it to ``path``.

    Raises whatever ``write`` or the file system raises (``OSError`` with ``ENOSPC``, ``EROFS``,
    ``EACCES``, ...), after removing the temporary file; ``path`` then still holds its old
    content.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=temporary_sibling(path), dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)
    return path


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """:func:`write_file_atomic` of ``data``."""
    return write_file_atomic(path, lambda f: f.write(data))


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_file_atomic` of ``text`` (UTF-8)."""
    return write_bytes_atomic(path, text.encode())


def fsync_tree(root: Path) -> None:
    """Flushes every file under ``root`` (and the directories) to disk."""
    for directory, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_directory(Path(directory))


def _libc_renameat2() -> Callable | None:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):  # not glibc >= 2.28 / not Linux
        return None
    function.argtypes = [
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_uint,
    ]
    function.restype = ctypes.c_int
    return function


_RENAMEAT2 = _libc_renameat2()


def exchange(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Swaps the directory entries ``a`` and ``b`` in one atomic step (Linux
    ``renameat2(RENAME_EXCHANGE)``). Returns ``False`` when the platform or file system cannot
    (then nothing changed); raises ``OSError`` on other failures."""
    if _RENAMEAT2 is None:
        return False
    result = _RENAMEAT2(
        _AT_FDCWD, os.fsencode(os.fspath(a)), _AT_FDCWD, os.fsencode(os.fspath(b)), _RENAME_EXCHANGE
    )
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), os.fspath(b))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def recover_directory(path: str | os.PathLike) -> bool:
    """Repairs what an interrupted :func:`replace_directory` left beside ``path``: puts the old
    directory back if the new one never arrived, then removes ``.<name>.old`` and the
    ``.<name>.tmp-*`` leftovers. Returns ``True`` if the old directory was put back."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return False
    old = parent / f".{path.name}{OLD_SUFFIX}"
    restored = False
    if old.is_dir() and not os.path.lexists(path):
        os.rename(old, path)
        _fsync_directory(parent)
        restored = True
    if os.path.lexists(old):
        _remove(old)
    prefix = temporary_sibling(path)
    for leftover in parent.iterdir():
        if leftover.name.startswith(prefix):
            _remove(leftover)
    return restored


def replace_directory(new: str | os.PathLike, path: str | os.PathLike) -> Path:
    """Moves the finished directory ``new`` (a sibling of ``path``) to ``path``, replacing what
    was there; a crash at any moment leaves the old or the new directory at ``path`` (the
    two-rename fallback: repaired by :func:`recover_directory`)."""
    new, path = Path(new), Path(path)
    if not os.path.lexists(path):
        os.rename(new, path)
    elif exchange(new, path):  # ``new`` now holds the old directory
        _fsync_directory(path.parent)
        _remove(new)
        return path
    else:
        old = path.parent / f".{path.name}{OLD_SUFFIX}"
        if os.path.lexists(old):
            _remove(old)
        os.rename(path, old)
        os.rename(new, path)
        _fsync_directory(path.parent)
        _remove(old)
        return path
    _fsync_directory(path.parent)
    return path


def check_writable(directory: str | os.PathLike) -> Path:
    """Creates ``directory`` if needed and writes (then removes) a file in it; raises
    ``OSError`` naming the directory if it cannot."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=directory)
    os.close(fd)
    os.unlink(probe)
    return directory
