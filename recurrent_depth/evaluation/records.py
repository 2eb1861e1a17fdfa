"""Saving sweep records: one JSON file (records plus the run's metadata) and one CSV file (one row per record,
nested dicts flattened to `key.sub` columns), written atomically.

    paths = write_records(records, "out/", "depth_sweep", meta={"model": "ckpt/", "data": "test.jsonl"})
    records, meta = read_records(paths["json"])
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def flatten(record: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists are kept as JSON strings."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        elif isinstance(value, list | tuple):
            out[name] = json.dumps(value)
        else:
            out[name] = value
    return out


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def to_csv(records: Sequence[dict[str, Any]]) -> str:
    """CSV text with the union of the flattened keys as columns, in first-seen order."""
    rows = [flatten(r) for r in records]
    columns = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def write_records(records: Sequence[dict[str, Any]], out_dir: str | Path, stem: str,
                  meta: dict[str, Any] | None = None) -> dict[str, Path]:
    """Write `<stem>.json` ({"meta", "records"}) and `<stem>.csv` into out_dir; returns their paths."""
    if not records:
        raise ValueError(f"no records to write for {stem!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / f"{stem}.json", "csv": out / f"{stem}.csv"}
    _atomic_write(paths["json"], json.dumps({"meta": meta or {}, "records": list(records)}, indent=2,
                                            default=str) + "\n")
    _atomic_write(paths["csv"], to_csv(records))
    return paths


def read_records(path: str | Path) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(records, meta) from a JSON file written by `write_records`."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(data, dict) or "records" not in data:
        raise ValueError(f"{path}: not a records file (expected an object with `records`)")
    return data["records"], data.get("meta", {})
