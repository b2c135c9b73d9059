"""tests/outside_tools.py: an outside program is found, or the test that wants it is skipped with
the reason (absent, or dying on this CPU), never failed."""

from __future__ import annotations

import pytest

from tests import outside_tools
from tests.outside_tools import outside_tool


@pytest.fixture
def tools(monkeypatch, tmp_path):
    monkeypatch.setenv("EMBER_OUTSIDE_TOOLS", str(tmp_path))
    outside_tools._find.cache_clear()
    yield tmp_path
    outside_tools._find.cache_clear()


def script(folder, name: str, body: str):
    path = folder / "fake" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def test_a_tool_that_starts_is_returned(tools) -> None:
    path = script(tools, "usage-then-1", "echo usage; exit 1")  # --help that exits 1 still counts
    assert outside_tool("fake", "usage-then-1") == path


def test_an_absent_tool_skips_naming_where_it_looked(tools) -> None:
    with pytest.raises(pytest.skip.Exception, match="not on this machine.*EMBER_OUTSIDE_TOOLS"):
        outside_tool("fake", "missing")


def test_a_tool_built_for_another_cpu_skips_with_illegal_instruction(tools) -> None:
    script(tools, "sigill", "kill -ILL $$")
    with pytest.raises(pytest.skip.Exception, match="illegal instruction"):
        outside_tool("fake", "sigill")


def test_a_tool_missing_its_libraries_skips(tools) -> None:
    script(tools, "noload", "echo 'error while loading shared libraries: libggml.so.0' >&2; exit 127")
    with pytest.raises(pytest.skip.Exception, match="cannot start: .*libggml"):
        outside_tool("fake", "noload")
