"""Where the native kernels' compiled library lives, and why ember trusts what it finds there.

ember loads the library it finds in its cache folder (ember/engine/native.py) with ctypes, which
runs the library's code in this process. So the cache must be one that only this user can write:

    root = private_dir(cache_root() / "kernels")   # made 0700; refused if another user could write it
    lib = root / f"ember_kernels-{key}.so"           # key: sources + flags + compiler version + CPU
    check_owned(lib)                                 # before loading an existing one

A folder or file owned by another user, or writable by group or others, is refused with a
KernelCacheError naming it and the fix (`chmod go-w`, or EMBER_CACHE_DIR pointing elsewhere):
the kernels are not silently rebuilt into a temporary folder, which would hide the problem and
cost a compile in every process.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

from ember.errors import EmberError


class KernelCacheError(EmberError):
    """The native kernels' cache folder (or a library in it) could be written by someone else."""


def cache_root() -> Path:
    """$EMBER_CACHE_DIR, else ~/.cache/ember."""
    return Path(os.environ.get("EMBER_CACHE_DIR") or Path.home() / ".cache" / "ember")


def _check(path: Path, what: str) -> None:
    st = path.stat()
    uid = os.getuid()
    if st.st_uid != uid:
        raise KernelCacheError(f"the native kernels' {what} {path} belongs to user id {st.st_uid}, not to you "
                               f"({uid}); set EMBER_CACHE_DIR to a folder of your own")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise KernelCacheError(f"the native kernels' {what} {path} is writable by group or others "
                               f"(mode {stat.S_IMODE(st.st_mode):o}); run `chmod go-w {path}` or set EMBER_CACHE_DIR")


def private_dir(path: Path) -> Path:
    """`path`, created 0700 if missing; raises KernelCacheError if another user owns it or could write it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    _check(path, "cache folder")
    return path


def check_owned(lib: Path) -> None:
    """Raise KernelCacheError unless `lib` is this user's and writable by no one else."""
    _check(lib, "library")


def compiler_version(cc: str) -> str:
    """`cc --version`'s output: a compiler upgrade gives a new cache key, so a library built by
    the old one is never loaded. Raises OSError or SubprocessError where `cc` cannot run."""
    return subprocess.run([cc, "--version"], check=True, capture_output=True, text=True, timeout=30).stdout
