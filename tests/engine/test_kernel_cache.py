"""The native kernels' cache: the library's name is a hash of what built it, and a cache folder
or library that another user could write is refused with one clear error (no compiling here)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from ember.engine import kernel_cache, native
from ember.engine.kernel_cache import KernelCacheError
from ember.errors import EmberError


def fake_cc(folder: Path, version: str) -> str:
    """A `compiler` that only answers --version, with `version`."""
    path = folder / f"cc-{abs(hash(version))}"
    path.write_text(f"#!/bin/sh\necho '{version}'\n")
    path.chmod(0o755)
    return str(path)


@pytest.fixture
def cache(monkeypatch, tmp_path) -> Path:
    """A fresh EMBER_CACHE_DIR; the compiler's version is fixed so no test needs a compiler."""
    monkeypatch.setattr(native, "compiler_version", lambda cc: "a fixed compiler")
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("EMBER_CACHE_DIR", str(root))
    return root


def test_the_name_changes_with_the_compiler_version_flags_and_sources(monkeypatch, tmp_path) -> None:
    old, new = fake_cc(tmp_path, "cc (GCC) 12.2.0"), fake_cc(tmp_path, "cc (GCC) 13.1.0")
    monkeypatch.setattr(native, "compiler_version", lambda cc: kernel_cache.compiler_version(old))
    key = native.cache_key("cc", [])
    assert key == native.cache_key("cc", [])
    monkeypatch.setattr(native, "compiler_version", lambda cc: kernel_cache.compiler_version(new))
    assert native.cache_key("cc", []) != key
    monkeypatch.setattr(native, "compiler_version", lambda cc: kernel_cache.compiler_version(old))
    monkeypatch.setattr(native, "FLAGS", [*native.FLAGS, "-DEXTRA"])
    assert native.cache_key("cc", []) != key
    monkeypatch.undo()

    source = tmp_path / "extra.c"
    source.write_text("int x;\n")
    monkeypatch.setattr(native, "compiler_version", lambda cc: kernel_cache.compiler_version(old))
    before = native.cache_key("cc", [])
    monkeypatch.setattr(native, "SOURCES", [*native.SOURCES, source])
    assert native.cache_key("cc", []) != before
    source.write_text("int y;\n")
    assert native.cache_key("cc", []) not in (before, key)


def test_a_new_cache_folder_is_private_whatever_the_umask(cache) -> None:
    previous = os.umask(0o002)
    try:
        folder = kernel_cache.private_dir(cache / "kernels")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700


@pytest.mark.parametrize("mode", [0o775, 0o707])
def test_a_folder_others_can_write_is_refused_before_anything_is_built(monkeypatch, cache, mode: int) -> None:
    (cache / "kernels").mkdir()
    (cache / "kernels").chmod(mode)
    monkeypatch.setattr(native, "_compile", lambda *a: pytest.fail("compiled into a folder others can write"))
    with pytest.raises(KernelCacheError, match="writable by group or others.*chmod go-w") as e:
        native._build(os.environ.get("CC", "cc"))
    assert isinstance(e.value, EmberError) and "\n" not in str(e.value)


def test_a_folder_of_another_user_is_refused(monkeypatch, cache) -> None:
    (cache / "kernels").mkdir(mode=0o700)
    me = os.getuid()
    monkeypatch.setattr(kernel_cache.os, "getuid", lambda: me + 1)
    with pytest.raises(KernelCacheError, match="belongs to user id .*EMBER_CACHE_DIR"):
        kernel_cache.private_dir(cache / "kernels")


def test_a_library_others_could_have_replaced_is_not_loaded(monkeypatch, cache) -> None:
    cc = os.environ.get("CC", "cc")
    folder = kernel_cache.private_dir(cache / "kernels")
    lib = folder / f"ember_kernels-{native.cache_key(cc, native._torch_openmp())}.so"
    lib.write_bytes(b"not a library")
    lib.chmod(0o666)
    with pytest.raises(KernelCacheError, match="library .* writable by group or others"):
        native._build(cc)
    lib.chmod(0o600)
    assert native._build(cc) == lib  # this user's own, writable by no one else: found by its name


def test_the_refusal_reaches_the_caller_not_a_silent_fallback(monkeypatch, cache) -> None:
    (cache / "kernels").mkdir()
    (cache / "kernels").chmod(0o777)
    native._library.cache_clear()
    try:
        with pytest.raises(KernelCacheError):
            native.available()
    finally:
        monkeypatch.undo()
        native._library.cache_clear()
