"""Record readers: every record of one open file as ``(raw, read_error, read_detail)``, streamed, so memory
stays flat whatever the size of the file. ``raw`` is the record as a JSON string.

* ``.jsonl``: line by line, strict UTF-8. An undecodable line is one row with ``read_error="bad_encoding"``
  (``raw`` holds it with ``\\x..`` escapes so the quarantine shows it); blank lines are skipped.
* ``.json``: an array is streamed item by item (ijson); a file of JSON lines or a single object works too. A
  syntax error keeps the records before it and adds one ``invalid_json`` row saying where it broke.
* ``.parquet`` (row group by row group) and ``.csv`` (block by block, every cell text) via pyarrow; nested
  list/struct columns become JSON lists/objects, other values (dates, decimals) their ``str``.

Records that were read have ``""`` in ``read_error`` and ``read_detail``; :mod:`aigc.data.tokenizing` parses ``raw``
and quarantines the others with their ``read_error`` as the reason. No Ray here: the iterators take any binary
stream, so they serve the Ray Data datasource (:mod:`aigc.data.datasource`) and the driver's column check alike.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

__all__ = ["RAW_SCHEMA", "Record", "iter_records"]

RAW_SCHEMA = pa.schema(
    [("raw", pa.string()), ("source", pa.int32()), ("read_error", pa.string()), ("read_detail", pa.string())]
)
Record = tuple[str, str, str]  # (raw, read_error, read_detail)

_PARQUET_BATCH = 4096  # rows decoded at a time from a Parquet row group
_BUFFER = 1 << 20  # read-ahead per open file; also how far the .json/.csv sniffing looks
_BOM = b"\xef\xbb\xbf"


def _dumps(rec: Any) -> str:
    raw = json.dumps(rec, ensure_ascii=False, default=_text)
    try:
        raw.encode()
    except UnicodeEncodeError:  # a lone surrogate from a "\ud800" escape: keep it escaped, valid UTF-8
        raw = json.dumps(rec, default=_text)
    return raw


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return str(value)


def _jsonl(f: io.BufferedReader, path: str) -> Iterator[Record]:
    for lineno, line in enumerate(f, 1):
        if lineno == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if not line.strip():
            continue
        line = line.rstrip(b"\r\n")
        try:
            yield line.decode("utf-8"), "", ""
        except UnicodeDecodeError as exc:
            detail = f"{path} line {lineno}: not UTF-8 ({exc.reason} at byte {exc.start}); re-encode the file as UTF-8"
            yield line.decode("utf-8", "backslashreplace"), "bad_encoding", detail


def _json(f: io.BufferedReader, path: str) -> Iterator[Record]:
    import ijson

    head = f.peek(_BUFFER)
    if head.startswith(_BOM):
        f.read(len(_BOM))
        head = head[len(_BOM) :]
    start = head.lstrip()[:1]
    if not start:
        return  # an empty file: no records
    if start == b"{" and _first_line_is_object(head):
        yield from _jsonl(f, path)  # JSON lines: a bad line costs only that line
        return
    # An array streamed item by item; otherwise one document or several concatenated ones.
    items = ijson.items(f, "item", use_float=True) if start == b"[" else ijson.items(f, "", multiple_values=True)
    n = 0
    try:
        for item in items:
            n += 1
            yield _dumps(item), "", ""
    except ijson.JSONError as exc:
        msg = exc.args[0] if exc.args else exc
        msg = (msg.decode("utf-8", "backslashreplace") if isinstance(msg, bytes) else str(msg)).strip()
        code = "bad_encoding" if "UTF8" in msg or "UTF-8" in msg else "invalid_json"
        where = f"after record {n}" if n else "before the first record"
        yield "", code, f"{path}: JSON broken {where}, the rest of the file is not read: {msg}"


def _first_line_is_object(head: bytes) -> bool:
    """Whether a ``.json`` file holds JSON lines: its first line is a whole object on its own."""
    line, newline, _ = head.lstrip().partition(b"\n")
    if not newline:
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _parquet(f: Any, path: str) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=_PARQUET_BATCH):
            for rec in batch.to_pylist():
                yield _dumps(rec), "", ""
    except (pa.ArrowInvalid, OSError) as exc:
        if "parquet" not in str(exc).lower():
            raise  # an I/O error: Ray Data retries the file
        yield "", "invalid_parquet", f"{path}: not a readable Parquet file, rows from here on are lost: {exc}"


def _csv(f: io.BufferedReader, path: str) -> Iterator[Record]:
    """Every cell is read as bytes and decoded here, so a column that looks numeric stays text and one bad
    cell costs its row only (``bad_encoding``); a row with the wrong number of cells is one ``invalid_csv``."""
    import pyarrow.csv as pacsv

    head = f.peek(_BUFFER).removeprefix(_BOM)
    names = next(csv.reader(io.StringIO(head.decode("utf-8", "replace"))), [])
    convert = pacsv.ConvertOptions(column_types={n: pa.binary() for n in names}, strings_can_be_null=False)
    bad: list[Any] = []

    def skip(row: Any) -> str:  # pyarrow's invalid_row_handler: keep the row for the quarantine, read on
        bad.append(row)
        return "skip"

    parse = pacsv.ParseOptions(invalid_row_handler=skip)
    row = 1  # the header
    try:
        reader = pacsv.open_csv(
            f, read_options=pacsv.ReadOptions(block_size=_BUFFER), parse_options=parse, convert_options=convert
        )
        for batch in reader:
            for rec in batch.to_pylist():
                row += 1
                yield _csv_record(rec, path, row)
            for b in bad:
                detail = f"{path}: a row of {b.actual_columns} cells, the header has {b.expected_columns}"
                yield b.text, "invalid_csv", detail
            bad.clear()
    except pa.ArrowInvalid as exc:
        yield "", "invalid_csv", f"{path}: CSV broken after record {row - 1}, the rest is not read: {exc}"


def _csv_record(rec: dict[str, bytes | None], path: str, row: int) -> Record:
    try:
        return _dumps({k: None if v is None else v.decode("utf-8") for k, v in rec.items()}), "", ""
    except UnicodeDecodeError as exc:
        loose = {k: _text(v) if v is not None else None for k, v in rec.items()}
        return _dumps(loose), "bad_encoding", f"{path} record {row - 1}: not UTF-8 ({exc.reason}); re-encode as UTF-8"


_READERS = {".jsonl": _jsonl, ".json": _json, ".parquet": _parquet, ".csv": _csv}


def iter_records(f: Any, path: str) -> Iterator[Record]:
    """``(raw, read_error, read_detail)`` of every record of one open file (a pyarrow or Python binary file;
    Parquet needs random access), by the extension of ``path``."""
    ext = "." + path.rsplit(".", 1)[-1]
    if ext == ".parquet":
        return _parquet(f, path)
    return _READERS[ext](io.BufferedReader(_Raw(f), _BUFFER), path)


class _Raw(io.RawIOBase):
    """A pyarrow input stream as a Python raw stream (so ``io.BufferedReader`` can line-split and peek)."""

    def __init__(self, f: Any):
        self._f = f

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        data = self._f.read(len(b))
        b[: len(data)] = data
        return len(data)
