"""The Ray Data side of reading: :class:`RawRecords`, a datasource over the files of one source, yields the
records of :mod:`aigc.data.file_records` as :data:`~aigc.data.file_records.RAW_SCHEMA` blocks of bounded size
(``raw``, ``source``, ``read_error``, ``read_detail``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
from ray.data.datasource import FileBasedDatasource

from aigc.data.file_records import RAW_SCHEMA, Record, iter_records

__all__ = ["RawRecords"]

_BLOCK_ROWS = 4096  # rows per block out of a reader (the tokenizer takes batches of 1024)
_BLOCK_BYTES = 8 << 20  # ... or fewer, once their raw text reaches this size


class RawRecords(FileBasedDatasource):
    """Ray Data datasource over the files of one source: yields :data:`RAW_SCHEMA` blocks of at most
    ``_BLOCK_ROWS`` rows / ``_BLOCK_BYTES`` of text. Read it with ``ray.data.read_datasource``."""

    def __init__(self, paths: list[str], *, filesystem: Any, source: int):
        super().__init__(paths, filesystem=filesystem)
        self._source = source

    def _open_input_source(self, filesystem: Any, path: str, **open_args: Any) -> Any:
        if path.endswith(".parquet"):  # the footer comes first: random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f: Any, path: str) -> Iterator[pa.Table]:
        rows: list[Record] = []
        size = 0
        for rec in iter_records(f, path):
            rows.append(rec)
            size += len(rec[0])
            if len(rows) >= _BLOCK_ROWS or size >= _BLOCK_BYTES:
                yield self._table(rows)
                rows, size = [], 0
        if rows:
            yield self._table(rows)

    def _table(self, rows: list[Record]) -> pa.Table:
        raw, err, detail = zip(*rows, strict=True)
        return pa.Table.from_arrays(
            [pa.array(raw, pa.string()), pa.array([self._source] * len(rows), pa.int32()),
             pa.array(err, pa.string()), pa.array(detail, pa.string())],
            schema=RAW_SCHEMA,
        )  # fmt: skip
