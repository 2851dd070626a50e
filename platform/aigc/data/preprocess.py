"""The preprocessing job: raw records -> validated, templated, tokenized Parquet shards (Ray Data).

Stages, each a Ray Data operator so the job scales from a laptop to a cluster unchanged:

1. read: JSON/JSONL as text lines (one bad line cannot poison a file's schema), Parquet/CSV natively;
   every record becomes one JSON string so all formats share one validator;
2. validate + template + tokenize in ``map_batches`` on an actor pool (tokenizer loaded once per actor);
   prompt tokens get label -100 so the loss covers only the answer;
3. split train/val by a hash of the prompt (stable across runs, no leakage of duplicated prompts);
4. write ``<output_dir>/data/{train,val}/*.parquet``, quarantined rows to ``data/quarantine/*.json``
   (one JSON object per line, with the reason), ``data/stats.json`` and ``data/token_lengths.png``.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs

from aigc import storage
from aigc.config import DataConfig, ModelConfig
from aigc.data.formats import FORMATS, RowError, required_fields, to_example
from aigc.errors import DataError

__all__ = [
    "DataError",
    "PreprocessResult",
    "list_input_files",
    "preprocess",
    "read_stats",
    "SUPPORTED_EXTENSIONS",
]

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".parquet", ".csv")
_OUT_SCHEMA = pa.schema(
    [
        ("ok", pa.bool_()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("raw", pa.string()),
        ("split", pa.string()),
        ("input_ids", pa.list_(pa.int32())),
        ("labels", pa.list_(pa.int32())),
        ("n_tokens", pa.int32()),
        ("n_target_tokens", pa.int32()),
    ]
)


@dataclass
class PreprocessResult:
    data_dir: str
    stats: dict[str, Any]


# 1. reading ---------------------------------------------------------------------------------------------


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


def _read_raw(files: list[str]) -> Any:
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


def _check_columns(ds: Any, files: list[str], cfg: DataConfig) -> None:
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
            seen |= set(_rename(rec, cfg.columns))
    if parsed and not all(k in seen for k in required):
        raise DataError(
            f"data.path {files[0]}{' (and others)' if len(files) > 1 else ''}: format {cfg.format!r} expects "
            f"fields {', '.join(required)}"
            + (f" (optional: {', '.join(optional)})" if optional else "")
            + f"; the first rows have {', '.join(sorted(seen)) or 'no fields'}. "
            f"Set data.format (one of {', '.join(FORMATS)}) or map columns with data.columns."
        )


def _rename(rec: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    return {columns.get(k, k): v for k, v in rec.items()} if columns else rec


# 2. validate, template, tokenize -----------------------------------------------------------------------


def _split_of(prompt_key: str, seed: int, val_fraction: float) -> str:
    h = int.from_bytes(hashlib.blake2b(f"{seed}\x00{prompt_key}".encode(), digest_size=8).digest(), "big")
    return "val" if h / 2**64 < val_fraction else "train"


class _Tokenize:
    """Ray Data actor: validates, renders the chat template and tokenizes a batch of raw records."""

    def __init__(self, model: dict[str, Any], data: dict[str, Any]):
        from aigc.data.templates import end_of_turn, render_prompt
        from aigc.models.loading import load_tokenizer

        self.model_cfg, self.cfg = ModelConfig(**model), DataConfig(**data)
        self.tok = load_tokenizer(self.model_cfg.name_or_path, self.model_cfg.trust_remote_code)
        self._render, self._eot = render_prompt, end_of_turn(self.tok)

    def _one(self, raw: str) -> dict[str, Any]:
        try:
            rec = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise RowError("invalid_json", f"not valid JSON: {exc.msg}") from None
        if not isinstance(rec, dict):
            raise RowError("wrong_type", f"a record must be an object, got {type(rec).__name__}")
        ex = to_example(_rename(rec, self.cfg.columns), self.cfg.format, self.cfg.system_prompt)
        if ex.raw_text:
            prompt, target = "", ex.response + self._eot
        else:
            prompt, target = self._render(self.tok, ex.messages), ex.response + self._eot
        p_ids = self.tok(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        t_ids = self.tok(target, add_special_tokens=False)["input_ids"]
        if len(p_ids) + len(t_ids) > self.cfg.max_length:
            raise RowError("too_long", f"{len(p_ids) + len(t_ids)} tokens > data.max_length={self.cfg.max_length}")
        split = _split_of(prompt or target, self.cfg.seed, self.cfg.val_fraction)
        return {
            "ok": True, "reason": "", "detail": "", "raw": raw, "split": split,
            "input_ids": p_ids + t_ids, "labels": [-100] * len(p_ids) + t_ids,
            "n_tokens": len(p_ids) + len(t_ids), "n_target_tokens": len(t_ids),
        }  # fmt: skip

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        rows = []
        for raw in batch["raw"]:
            try:
                rows.append(self._one(str(raw)))
            except RowError as err:
                rows.append(
                    {"ok": False, "reason": err.reason, "detail": err.detail, "raw": str(raw), "split": "quarantine",
                     "input_ids": [], "labels": [], "n_tokens": 0, "n_target_tokens": 0}
                )  # fmt: skip
        return pa.Table.from_pylist(rows, schema=_OUT_SCHEMA)


# 3. the job ---------------------------------------------------------------------------------------------


def _fingerprint(files: list[tuple[str, int]], data: DataConfig, model: ModelConfig) -> str:
    h = hashlib.sha256()
    for path, size in files:
        h.update(f"{os.path.basename(path)}:{size}\n".encode())
    h.update(data.model_dump_json().encode() + model.name_or_path.encode())
    return h.hexdigest()[:16]


def _plot_lengths(lengths: np.ndarray, max_length: int, path: str) -> None:
    from aigc.plots import figure

    with figure(path, "Token lengths of kept examples", "tokens per example (prompt + answer)", "examples") as ax:
        ax.hist(lengths, bins=min(50, max(5, len(set(lengths.tolist())))), color="#4477aa")
        ax.axvline(max_length, color="#cc3311", linestyle="--", label=f"data.max_length={max_length}")


def preprocess(data: DataConfig, model: ModelConfig, output_dir: str) -> PreprocessResult:
    """Run the preprocessing job on the current Ray cluster and return where it wrote and its stats.

    Raises:
        DataError: the input is missing, of an unsupported type, or not in the configured format.
    """
    import ray.data
    from ray.data.expressions import col

    files = list_input_files(data.path)
    paths = [p for p, _ in files]
    data_dir = storage.join(output_dir, "data")
    storage.makedirs(data_dir)
    out_fs = storage.filesystem(data_dir)[0]

    raw = _read_raw(paths)
    _check_columns(raw, paths, data)
    ds = raw.map_batches(
        _Tokenize,
        fn_constructor_kwargs={
            "model": model.model_dump(),
            "data": data.model_dump(),
        },
        batch_size=256,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=data.tokenizer_actors),
    ).materialize()

    # Three writes from one materialized result; overwrite so a re-run never mixes old shards in.
    kept_cols = ["input_ids", "labels", "n_tokens", "n_target_tokens"]
    for split in ("train", "val"):
        part = ds.filter(expr=col("split") == split).select_columns(kept_cols)
        part.write_parquet(storage.filesystem(storage.join(data_dir, split))[1], filesystem=out_fs, mode="overwrite")
    bad = ds.filter(expr=~col("ok")).select_columns(["reason", "detail", "raw"])
    n_bad = bad.count()
    qdir = storage.join(data_dir, "quarantine")
    storage.remove_tree(qdir)  # a re-run's quarantine never mixes in an earlier run's rows
    if n_bad:
        bad.write_json(storage.filesystem(qdir)[1], filesystem=out_fs)

    summary = ds.select_columns(["ok", "reason", "split", "n_tokens", "n_target_tokens"]).to_pandas()
    kept = summary[summary["ok"]]
    lengths = kept["n_tokens"].to_numpy()
    stats = {
        "rows_in": int(len(summary)),
        "rows_kept": int(len(kept)),
        "rows_rejected": {str(k): int(v) for k, v in summary[~summary["ok"]]["reason"].value_counts().items()},
        "rows_train": int((kept["split"] == "train").sum()),
        "rows_val": int((kept["split"] == "val").sum()),
        "tokens_total": int(lengths.sum()),
        "target_tokens_total": int(kept["n_target_tokens"].sum()),
        "tokens_per_example": {
            "mean": round(float(lengths.mean()), 2) if len(lengths) else 0.0,
            "p50": int(np.percentile(lengths, 50)) if len(lengths) else 0,
            "p95": int(np.percentile(lengths, 95)) if len(lengths) else 0,
            "max": int(lengths.max()) if len(lengths) else 0,
        },
        "format": data.format,
        "max_length": data.max_length,
        "inputs": paths,
        "tokenizer": model.name_or_path,
        "fingerprint": _fingerprint(files, data, model),
    }
    if stats["rows_kept"] == 0:
        raise DataError(
            f"data.path {data.path}: all {stats['rows_in']} rows were rejected {stats['rows_rejected']}; "
            f"see {qdir} for each row and its reason"
        )
    storage.write_json(storage.join(data_dir, "stats.json"), stats)
    if len(lengths):
        with storage.local_staging(data_dir) as local:
            _plot_lengths(lengths, data.max_length, os.path.join(local, "token_lengths.png"))
    return PreprocessResult(data_dir=data_dir, stats=stats)


def read_stats(output_dir: str) -> dict[str, Any]:
    """stats.json of a preprocessed run; a clear error if preprocessing has not run."""
    path = storage.join(output_dir, "data", "stats.json")
    if not storage.is_file(path):
        raise DataError(f"no preprocessed data at {storage.join(output_dir, 'data')}: run `aigc preprocess` first")
    return storage.read_json(path)
