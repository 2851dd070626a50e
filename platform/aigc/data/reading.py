"""Reading the inputs: every record of every source of ``data.path`` becomes one row for :mod:`aigc.data.tokenizing`.

A row has ``raw`` (the record as a JSON string), ``source`` (index into ``data.sources()``: which format and
columns apply) and ``read_error``/``read_detail`` (empty, or why the record could not be read; such rows are
quarantined downstream, never dropped). Files are listed by :mod:`aigc.data.input_files`, parsed by
:mod:`aigc.data.file_records` and streamed by the Ray Data datasource of :mod:`aigc.data.datasource`.
"""

from __future__ import annotations

import json
from contextlib import closing
from itertools import islice
from typing import Any

from aigc import storage
from aigc.config import DataConfig
from aigc.data.file_records import iter_records
from aigc.data.formats import FORMATS, required_fields
from aigc.data.input_files import SUPPORTED_EXTENSIONS, InputFile, hash_inputs, list_input_files, source_label
from aigc.errors import DataError

__all__ = [
    "IO_CPUS",
    "SUPPORTED_EXTENSIONS",
    "InputFile",
    "check_columns",
    "hash_inputs",
    "list_input_files",
    "read_raw",
    "rename",
]

_SAMPLE = 20  # records per source that check_columns looks at

# Reading, dedup marking and writing are I/O and light parsing; the CPU work is tokenizing. Their tasks reserve a
# quarter of a CPU (Ray Data's default is a whole one), so that four of them fit in the one CPU the tokenizer pool
# leaves free (aigc.data.preprocess sizes it to the cluster's CPUs minus one). Measured on 2 cores (4 logical
# CPUs), 200,000 rows: 100 s with whole-CPU I/O tasks and a pool of up to 4, 79 s like this (bench/RESULTS.md).
IO_CPUS = 0.25


def read_raw(files: list[InputFile]) -> Any:
    """A Ray Dataset of the rows of ``files`` (from :func:`list_input_files`): one streaming read per source.

    Returns:
        ``ray.data.Dataset`` with columns ``raw``, ``source``, ``read_error``, ``read_detail``.
    """
    import ray.data

    from aigc.data.datasource import RawRecords

    parts = []
    for source in sorted({f.source for f in files}):
        paths = [f.path for f in files if f.source == source]
        fs = storage.filesystem(paths[0])[0]  # one entry is one path or glob: one filesystem
        inner = [p.split("://", 1)[1] if storage.is_uri(p) else p for p in paths]  # paths inside that filesystem
        parts.append(ray.data.read_datasource(RawRecords(inner, filesystem=fs, source=source), num_cpus=IO_CPUS))
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def check_columns(files: list[InputFile], data: DataConfig) -> None:
    """Fail with one clear error when a source plainly is not in its configured format.

    Reads the first records of each source here on the driver (no cluster needed), renames them with the
    source's ``columns`` and checks that the format's required fields appear.

    Raises:
        DataError: naming the source, its format, the fields it expects and the fields its first rows have.
    """
    for i, src in enumerate(data.sources()):
        paths = [f.path for f in files if f.source == i]
        seen: set[str] = set()
        parsed = 0
        with closing(_sample(paths)) as records:
            for rec in islice(records, _SAMPLE):
                if isinstance(rec, dict):
                    parsed += 1
                    seen |= set(rename(rec, src.columns or {}))
        required, optional = required_fields(src.format, data.preference)
        if parsed and not all(k in seen for k in required):
            where = f"{source_label(data, i)} {paths[0]}{' (and others)' if len(paths) > 1 else ''}"
            fix = (
                "format/columns on this entry of data.path"
                if isinstance(data.path, list)
                else f"data.format (one of {', '.join(FORMATS)}) or map columns with data.columns"
            )
            raise DataError(
                f"{where}: format {src.format!r} expects fields {', '.join(required)}"
                + (f" (optional: {', '.join(optional)})" if optional else "")
                + f"; the first rows have {', '.join(sorted(seen)) or 'no fields'}. Set {fix}."
            )


def _sample(paths: list[str]) -> Any:
    """The records (parsed) at the start of a source's files; None for one that could not be read or parsed."""
    for path in paths:
        fs, inner = storage.filesystem(path)
        opened = fs.open_input_file(inner) if path.endswith(".parquet") else fs.open_input_stream(inner)
        with opened as f:
            for raw, error, _ in iter_records(f, path):
                try:
                    yield None if error else json.loads(raw)
                except json.JSONDecodeError:
                    yield None


def rename(rec: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    return {columns.get(k, k): v for k, v in rec.items()} if columns else rec
