"""Programs from outside this repository that tests use as oracles (llama.cpp), found in one place.

    from tests.outside_tools import outside_tool
    simple = outside_tool("llama.cpp", "llama-simple")   # a Path, or the test is skipped with the reason

ember itself never depends on them, and a fresh clone has none: every test that wants one asks
here, and is skipped (never failed) with the reason when the program is absent or cannot run on
this machine, e.g. a build for a CPU with features this one lacks ("illegal instruction").

Where they are looked for: $EMBER_OUTSIDE_TOOLS/<family>/<binary> if that variable is set, else
shared/tools/<family>/<binary> in the nearest folder above the repository that has one (the
layout of the machines ember is developed on: the repo beside a `shared/` folder).
"""

from __future__ import annotations

import os
import signal
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _roots() -> list[Path]:
    configured = os.environ.get("EMBER_OUTSIDE_TOOLS")
    if configured:
        return [Path(configured)]
    return [parent / "shared" / "tools" for parent in REPO.parents]


@lru_cache(maxsize=None)
def _find(family: str, binary: str, probe: tuple[str, ...]) -> tuple[Path | None, str]:
    """(path, "") for a program that starts, else (None, why not)."""
    candidates = [root / family / binary for root in _roots()]
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        where = candidates[0].parent if os.environ.get("EMBER_OUTSIDE_TOOLS") else "shared/tools/ above the repo"
        return None, f"{family}'s {binary} is not on this machine (looked in {where}; set EMBER_OUTSIDE_TOOLS)"
    if not os.access(path, os.X_OK):
        return None, f"{path} is not executable"
    try:
        proc = subprocess.run([str(path), *probe], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{path} cannot run here ({type(e).__name__}: {e})"
    if proc.returncode == -signal.SIGILL:
        return None, f"{path} dies with 'illegal instruction' on this CPU (built for another one; rebuild it)"
    if proc.returncode < 0:
        return None, f"{path} dies with signal {signal.Signals(-proc.returncode).name} on `{' '.join(probe)}`"
    if proc.returncode == 127 or "error while loading shared libraries" in proc.stderr:
        return None, f"{path} cannot start: {proc.stderr.strip().splitlines()[-1][:200] if proc.stderr else 'exit 127'}"
    # Any other exit status is fine: some tools print their usage and exit 1 for --help.
    return path, ""


def outside_tool(family: str, binary: str, probe: tuple[str, ...] = ("--help",)) -> Path:
    """The path of `binary` of the outside tool `family` (e.g. "llama.cpp", "llama-simple"), after
    checking that it starts (`binary *probe`); calls pytest.skip with the reason otherwise."""
    path, why = _find(family, binary, probe)
    if path is None:
        pytest.skip(why)
    return path
