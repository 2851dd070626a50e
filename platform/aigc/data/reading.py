"""Reading the inputs: every record of every supported file becomes one JSON string in a ``raw`` column.

JSON/JSONL are read as text lines (one bad line cannot poison a file's schema), Parquet/CSV natively; all
formats then share one validator (:mod:`aigc.data.rows`).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import pyarrow.fs as pafs

from aigc import storage
from aigc.config import DataConfig
from aigc.data.formats import FORMATS, required_fields
from aigc.errors import DataError

__all__ = ["SUPPORTED_EXTENSIONS", "check_columns", "list_input_files", "read_raw", "rename"]

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")


def list_input_files(path: str) -> list[tuple[str, int]]:
    """(path, size) of every input file under ``path`` (file, directory or glob); raises DataError."""
    fs, root = storage.filesystem(path)
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.File:
        files = [info]
    elif info.type == pafs.FileType.Directory:
        files = [i for i in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if i.type == pafs.FileType.File]
        files = [i for i in files if not i.base_name.startswith((".", "_"))]
    else:
        raise DataError(f"data.path: no such file or directory: {path}")
    if not files:
        raise DataError(f"data.path: {path} is an empty directory")
    bad = [i.path for i in files if not i.path.endswith(SUPPORTED_EXTENSIONS)]
    if bad:
        raise DataError(
            f"data.path: unsupported file type {bad[0]!r}; expected one of {', '.join(SUPPORTED_EXTENSIONS)}"
        )
    prefix = path.split("://", 1)[0] + "://" if "://" in path else ""
    return sorted((prefix + i.path if prefix else i.path, i.size) for i in files)


def _lines_to_raw(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"raw": batch["text"]}


def _json_file_to_raw(row: dict[str, Any]) -> list[dict[str, str]]:
    """A .json file holds either one array of records or JSON lines."""
    text = row["bytes"].decode("utf-8", errors="replace")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError:
        return [{"raw": line} for line in text.splitlines() if line.strip()]
    records = doc if isinstance(doc, list) else [doc]
    return [{"raw": json.dumps(r, ensure_ascii=False)} for r in records]


def _table_to_raw(batch: Any) -> dict[str, list[str]]:
    return {"raw": [json.dumps(r, ensure_ascii=False, default=str) for r in batch.to_dict(orient="records")]}


def read_raw(files: list[str]) -> Any:
    import ray.data

    fs = storage.filesystem(files[0])[0]  # every input sits under one data.path: one filesystem
    by_ext: dict[str, list[str]] = {}
    for f in files:
        by_ext.setdefault(os.path.splitext(f)[1], []).append(storage.filesystem(f)[1])
    parts = []
    if ".jsonl" in by_ext:
        lines = ray.data.read_text(by_ext[".jsonl"], filesystem=fs)
        parts.append(lines.map_batches(_lines_to_raw, batch_format="numpy"))
    if ".json" in by_ext:
        parts.append(ray.data.read_binary_files(by_ext[".json"], filesystem=fs).flat_map(_json_file_to_raw))
    if ".parquet" in by_ext:
        table = ray.data.read_parquet(by_ext[".parquet"], filesystem=fs)
        parts.append(table.map_batches(_table_to_raw, batch_format="pandas"))
    if ".csv" in by_ext:
        table = ray.data.read_csv(by_ext[".csv"], filesystem=fs)
        parts.append(table.map_batches(_table_to_raw, batch_format="pandas"))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def check_columns(ds: Any, files: list[str], cfg: DataConfig) -> None:
    """Fail with one clear error when the data plainly is not in the configured format."""
    required, optional = required_fields(cfg.format)
    sample = ds.take(20)
    seen: set[str] = set()
    parsed = 0
    for row in sample:
        try:
            rec = json.loads(row["raw"])
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            parsed += 1
            seen |= set(rename(rec, cfg.columns))
    if parsed and not all(k in seen for k in required):
        raise DataError(
            f"data.path {files[0]}{' (and others)' if len(files) > 1 else ''}: format {cfg.format!r} expects "
            f"fields {', '.join(required)}"
            + (f" (optional: {', '.join(optional)})" if optional else "")
            + f"; the first rows have {', '.join(sorted(seen)) or 'no fields'}. "
            f"Set data.format (one of {', '.join(FORMATS)}) or map columns with data.columns."
        )


def rename(rec: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    return {columns.get(k, k): v for k, v in rec.items()} if columns else rec
