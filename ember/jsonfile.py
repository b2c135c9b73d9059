"""Reading the small JSON files a user can damage (configs, manifests, index settings).

A missing, unreadable or non-object file becomes one error line of the caller's kind, naming
the file and the fix, never a JSONDecodeError traceback.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ember.errors import EmberError


def read_json_object(path: Path, error: type[EmberError], fix: str, missing_ok: bool = False) -> dict[str, Any]:
    """The JSON object in `path`; {} for a missing file when missing_ok, else `error` naming `fix`."""
    if missing_ok and not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path} not found: {fix}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path} is not valid JSON ({e}): {fix}") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, got {type(data).__name__}: {fix}")
    return data
