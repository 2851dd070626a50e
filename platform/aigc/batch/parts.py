"""A batch run's output directory: parts published whole, what a re-run skips, and the merged result.

    <output>/run.json                       what the rows were generated with (a re-run must match it)
    <output>/parts/part-<first>-<last>.jsonl one file per batch of rows, written by the actor that generated them
    <output>/generations.{jsonl,parquet}    every answered row, in input order (written when all rows are done)
    <output>/quarantine.jsonl               every failed row with its reason and detail
    <output>/summary.json                   counts, tokens, throughput

A part is written whole or not at all (:func:`aigc.storage.write_bytes`: a temporary file, then a rename), so a
run killed at any moment leaves only complete parts; a re-run reads which row numbers they hold and generates
the others only: no row twice, none missing. Each row records its own number, so parts need not be contiguous.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable
from typing import Any

from aigc import storage
from aigc.errors import ConfigError

__all__ = ["OUTPUT_COLUMNS", "check_run", "done_rows", "merge_parts", "publish_part", "read_parts"]

OUTPUT_COLUMNS = ("index", "prompt", "messages", "reference", "answer", "model", "model_version", "prompt_tokens",
                  "completion_tokens", "finish_reason")  # fmt: skip
_PART = re.compile(r"part-(\d+)-(\d+)\.jsonl$")


def _parts_dir(output: str) -> str:
    return storage.join(output, "parts")


def check_run(output: str, run: dict[str, Any]) -> None:
    """Record ``run`` (model version, sampling, input) in ``output``, or check that it matches what the parts
    already there were generated with.

    Raises:
        ConfigError: the output holds a run with other settings (resuming it would mix two runs' rows).
    """
    path = storage.join(output, "run.json")
    if storage.is_file(path):
        before = storage.read_json(path)
        changed = sorted(k for k in {*before, *run} if before.get(k) != run.get(k))
        if changed:
            raise ConfigError(
                f"generate.output {output} holds a run with other settings ({', '.join(changed)}: "
                f"{[before.get(k) for k in changed]} then, {[run.get(k) for k in changed]} now); use another "
                "generate.output or delete it to start over"
            )
        return
    storage.write_json(path, run)


def read_parts(output: str) -> Iterable[dict[str, Any]]:
    """Every row of every published part (temporary files of an interrupted write are not parts)."""
    folder = _parts_dir(output)
    if not storage.is_dir(folder):
        return
    for path in storage.list_files(folder, recursive=False):
        if _PART.search(path):
            for line in storage.read_text(path).splitlines():
                if line.strip():
                    yield json.loads(line)


def done_rows(output: str) -> set[int]:
    """The row numbers already in published parts."""
    return {int(r["index"]) for r in read_parts(output)}


def publish_part(output: str, rows: list[dict[str, Any]]) -> str:
    """Write ``rows`` (each with its ``index``) as one part, whole; returns its path."""
    first, last = min(r["index"] for r in rows), max(r["index"] for r in rows)
    path = storage.join(_parts_dir(output), f"part-{first:09d}-{last:09d}.jsonl")
    storage.write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())
    return path


def merge_parts(output: str, output_format: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Write ``generations.<format>`` and ``quarantine.jsonl`` from the parts, in row order.

    Returns:
        (answered rows, quarantined rows).

    Raises:
        ConfigError: two parts hold the same row (a run with another output written into this one).
    """
    rows, seen = sorted(read_parts(output), key=lambda r: r["index"]), set()
    for r in rows:
        if r["index"] in seen:
            raise ConfigError(f"generate.output {output}: row {r['index']} is in two parts; delete the directory")
        seen.add(r["index"])
    ok = [{k: r.get(k) for k in OUTPUT_COLUMNS} for r in rows if r.get("error") is None]
    bad = [{"index": r["index"], "reason": r["error"], "detail": r.get("detail", ""), "raw": r.get("raw", "")}
           for r in rows if r.get("error") is not None]  # fmt: skip
    if output_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.Table.from_pylist(
            [{**r, "messages": None if r["messages"] is None else json.dumps(r["messages"])} for r in ok]
        )
        buf = io.BytesIO()
        pq.write_table(table, buf)
        storage.write_bytes(storage.join(output, "generations.parquet"), buf.getvalue())
    else:
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in ok)
        storage.write_bytes(storage.join(output, "generations.jsonl"), text.encode())
    storage.write_bytes(storage.join(output, "quarantine.jsonl"),
                        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in bad).encode())  # fmt: skip
    return ok, bad
