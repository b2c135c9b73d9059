"""The errors a RAG user can cause, and the check for the optional `rag` / `pdf` extras.

Everything the user can get wrong (a path, an index folder, a filter, a missing extra) is a
RagError: the CLI prints it as one line naming the problem and the fix.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from ember.errors import EmberError


class RagError(EmberError):
    """A RAG input the user can fix: a missing index, a dimension mismatch, a bad filter, ..."""


def require(module: str, extra: str = "rag") -> ModuleType:
    """Import an optional dependency, or raise a RagError naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RagError(f"{module} is not installed: pip install 'ember[{extra}]'") from None
