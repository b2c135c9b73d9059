"""Reading the benchmark files users bring, and finding the sample sets ember ships.

Each task reads its benchmark's public format (MMLU csv, GSM8K jsonl, TruthfulQA MC json/jsonl,
MT-Bench question.jsonl); this module holds the pieces they share: one-line errors naming the
file and line, jsonl reading, and `sample_data(task)`, the small sets written for ember in
those formats (ember/eval/data/, used by the tests and the quickstart).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ember.data.sources import DataSourceError, jsonl_records

SAMPLE_DIR = Path(__file__).parent / "data"


class EvalDataError(DataSourceError):
    """A benchmark file that is missing or not in the expected format."""


def sample_data(task: str) -> Path:
    """The bundled sample set of a task (a folder or file under ember/eval/data)."""
    return SAMPLE_DIR / task


def existing(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise EvalDataError(f"{what} {p} does not exist")
    return p


def read_records(path: Path) -> list[dict[str, Any]]:
    """Objects from a .jsonl file (one per line) or a .json file holding a list of objects."""
    try:
        if path.suffix != ".json":
            return [record for _, record in jsonl_records(path)]
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise EvalDataError(f"{path} is not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise EvalDataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise EvalDataError(f"{path}: expected a JSON list of objects")
    return data


def require(record: dict[str, Any], key: str, kind: type, where: str) -> Any:
    """record[key] if it has type `kind`, else an error naming the place and the field."""
    value = record.get(key)
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        raise EvalDataError(f"{where}: expected a {'non-empty ' if kind is str else ''}"
                            f"{kind.__name__} field {key!r}")
    return value


def fewshot_split(data: Path, names: tuple[str, ...], k: int, what: str) -> Path | None:
    """The few-shot file beside `data` (same folder, or a sibling split folder), if k > 0."""
    if k <= 0:
        return None
    folders = [data.parent, data.parent.parent / "dev", data.parent.parent / "train"]
    for folder in folders:
        for name in names:
            if (folder / name).is_file():
                return folder / name
    raise EvalDataError(f"--num-fewshot {k} needs {what} ({' or '.join(names)}) next to {data} "
                        "or in ../dev or ../train; use --num-fewshot 0 without one")
