"""A benchmark's result on disk: ``<stem>.json`` (its data) beside ``<stem>.md`` (its tables).

Every script under ``benchmarks/`` ends with :func:`write_json_md`; both files are written
atomically (:func:`pnc.surgery.io.atomic_write_text`), so a stop never leaves half a result.
Importing it loads no torch (the memory benchmarks' workers measure from a bare interpreter).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pnc.surgery.io import atomic_write_text

__all__ = ["jsonable", "write_json_md"]


def jsonable(value: Any) -> Any:
    """``json.dumps(default=...)`` for tensors and arrays (anything with ``tolist``), tuples
    and sets (anything else: its str)."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def write_json_md(stem: str | Path, result: Mapping[str, Any], markdown: str) -> Path:
    """Write ``result`` to ``<stem>.json`` (indented; tensors, tuples and sets as lists) and
    ``markdown`` to ``<stem>.md``, making the folder if needed; returns the ``.md`` path.

    >>> write_json_md(tmp / "speed", {"ms": 3.2}, "| ms |\\n|---|\\n| 3.2 |\\n")  # doctest: +SKIP
    PosixPath('.../speed.md')
    """
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(stem.parent / f"{stem.name}.json", json.dumps(result, indent=1, default=jsonable) + "\n")
    md = stem.parent / f"{stem.name}.md"
    atomic_write_text(md, markdown if markdown.endswith("\n") else markdown + "\n")
    return md
