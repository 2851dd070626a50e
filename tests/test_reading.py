"""Reading the inputs: sources resolved to files, streaming readers, read errors as rows, content fingerprints."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from aigc import storage
from aigc.config import DataConfig, ModelConfig
from aigc.data.file_records import iter_records
from aigc.data.preprocess import _fingerprint
from aigc.data.reading import check_columns, hash_inputs, list_input_files, read_raw
from aigc.errors import DataError

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = {"raw", "source", "read_error", "read_detail"}


def _qa(i: int) -> dict:
    return {"instruction": f"question {i}", "output": f"answer {i}"}


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rel(files, root: Path) -> list[tuple[str, int]]:
    return [(str(Path(f.path).relative_to(root)), f.source) for f in files]


@pytest.fixture
def tree(tmp_path):
    """d/a.jsonl d/b.json d/sub/c.jsonl d/sub/deep/d.jsonl, plus names every listing must skip."""
    d = tmp_path / "d"
    for name in ("a.jsonl", "sub/c.jsonl", "sub/deep/d.jsonl", ".hidden.jsonl", "_SUCCESS.jsonl", "_tmp/x.jsonl"):
        _jsonl(d / name, [_qa(0)])
    (d / "b.json").write_text(json.dumps([_qa(1)]))
    return d


# --- sources: entries of data.path resolved to files ------------------------------------------------------------


def test_directory_glob_list_and_mixture_resolve_to_files_with_their_source(tree):
    whole = list_input_files(DataConfig(path=str(tree)))
    assert _rel(whole, tree) == [(p, 0) for p in ["a.jsonl", "b.json", "sub/c.jsonl", "sub/deep/d.jsonl"]]

    globs = {
        "*.jsonl": ["a.jsonl"],
        "**/*.jsonl": ["a.jsonl", "sub/c.jsonl", "sub/deep/d.jsonl"],
        "sub/**": ["sub/c.jsonl", "sub/deep/d.jsonl"],
        "[ab].json*": ["a.jsonl", "b.json"],
        "sub/?.jsonl": ["sub/c.jsonl"],
        "_*.jsonl": ["_SUCCESS.jsonl"],  # a pattern that starts with '_' may match such names
    }
    for pattern, want in globs.items():
        got = list_input_files(DataConfig(path=str(tree / pattern)))
        assert _rel(got, tree) == [(p, 0) for p in want], pattern

    listed = list_input_files(DataConfig(path=[str(tree / "sub" / "deep"), str(tree / "*.json")]))
    assert _rel(listed, tree) == [("sub/deep/d.jsonl", 0), ("b.json", 1)]

    mixture = DataConfig(
        path=[{"path": str(tree / "a.jsonl"), "weight": 2}, {"path": str(tree / "sub"), "format": "messages"}]
    )
    assert _rel(list_input_files(mixture), tree) == [("a.jsonl", 0), ("sub/c.jsonl", 1), ("sub/deep/d.jsonl", 1)]


def test_bad_entries_are_named_with_what_was_expected(tree):
    with pytest.raises(DataError) as err:
        list_input_files(DataConfig(path=[str(tree / "a.jsonl"), str(tree / "*.parquet")]))
    assert str(err.value).startswith(f"data.path[1] ({tree / '*.parquet'}): no file matches the glob")
    assert "expected at least one .jsonl, .json, .parquet, .csv file" in str(err.value)

    with pytest.raises(DataError, match=r"^data\.path \(.*\): no such file or directory: .*missing\.jsonl$"):
        list_input_files(DataConfig(path=str(tree / "missing.jsonl")))

    (tree / "sub" / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"^data\.path\[0\] .*unsupported file type '.*notes\.txt'; expected one of"):
        list_input_files(DataConfig(path=[{"path": str(tree / "sub")}]))


def test_precheck_fails_on_a_bad_mixture_entry_before_any_cluster(tree, tmp_path):
    from aigc.cli import check_stage
    from aigc.config import load_config

    tiny = ROOT / "assets" / "tiny-base"
    cfg = load_config(None, [f"output_dir={tmp_path / 'out'}", f"model.name_or_path={tiny}", "serve.max_tokens_cap=64"])
    cfg.data = DataConfig(path=[str(tree / "a.jsonl"), str(tree / "nothing-*.jsonl")], max_length=128)
    with pytest.raises(DataError, match=r"data\.path\[1\] .*no file matches the glob"):
        check_stage("preprocess", cfg)


def test_check_columns_uses_each_sources_format_and_names_the_source(tree):
    other = _jsonl(tree.parent / "qa.jsonl", [{"question": "q", "answer": "a"}] * 3)
    renamed = {"path": str(other), "columns": {"question": "instruction", "answer": "output"}}
    ok = DataConfig(path=[str(tree / "a.jsonl"), renamed])
    check_columns(list_input_files(ok), ok)

    wrong = DataConfig(path=[str(tree / "a.jsonl"), {"path": str(other), "format": "messages"}])
    with pytest.raises(DataError) as err:
        check_columns(list_input_files(wrong), wrong)
    msg = str(err.value)
    assert msg.startswith(f"data.path[1] {other}: format 'messages' expects fields messages")
    assert "the first rows have answer, question" in msg and "format/columns on this entry of data.path" in msg


# --- records: one file at a time, no cluster ---------------------------------------------------------------------


def test_csv_cells_stay_text_and_a_ragged_row_is_its_own_error():
    rows = list(iter_records(io.BytesIO(b"instruction,output\nq1,42\nq2\nq3,a3\n"), "x.csv"))
    assert [json.loads(r) for r, e, _ in rows if not e] == [
        {"instruction": "q1", "output": "42"},
        {"instruction": "q3", "output": "a3"},
    ]
    assert [(r, e) for r, e, _ in rows if e] == [("q2", "invalid_csv")]


def test_a_json_file_of_json_lines_or_one_object():
    lines = list(iter_records(io.BytesIO(b'{"a": 1}\n{"a": 2\n{"a": 3}\n'), "x.json"))
    assert [r for r, _, _ in lines] == ['{"a": 1}', '{"a": 2', '{"a": 3}']  # a bad line costs that line only
    pretty = list(iter_records(io.BytesIO(b'{\n  "a": [1, 2]\n}\n'), "x.json"))
    assert [(json.loads(r), e) for r, e, _ in pretty] == [({"a": [1, 2]}, "")]


# --- the Ray Data readers ----------------------------------------------------------------------------------------


def test_a_line_that_is_not_utf8_is_one_bad_encoding_row(ray_cluster, tmp_path):
    src = tmp_path / "mixed.jsonl"
    good = [json.dumps(_qa(i), ensure_ascii=False).encode() for i in range(5)]
    latin1 = json.dumps({"instruction": "café", "output": "x"}, ensure_ascii=False).encode("latin-1")
    src.write_bytes(b"\n".join([good[0], good[1], latin1, b"", good[2], good[3], good[4]]) + b"\n")
    rows = read_raw(list_input_files(DataConfig(path=str(src)))).take_all()
    assert all(set(r) == COLUMNS for r in rows) and {r["source"] for r in rows} == {0}
    ok = [r for r in rows if not r["read_error"]]
    assert [json.loads(r["raw"]) for r in ok] == [_qa(i) for i in range(5)] and all(r["read_detail"] == "" for r in ok)
    (bad,) = [r for r in rows if r["read_error"]]
    assert bad["read_error"] == "bad_encoding" and "caf\\xe9" in bad["raw"]
    assert bad["read_detail"].startswith(f"{src} line 3: not UTF-8")


def test_a_large_json_array_is_streamed_in_blocks(ray_cluster, tmp_path):
    src = tmp_path / "big.json"
    src.write_text(json.dumps([{"instruction": f"q{i}", "output": "é" * 20, "n": i} for i in range(20_000)]))
    ds = read_raw(list_input_files(DataConfig(path=str(src)))).materialize()
    assert ds.num_blocks() > 1
    rows = ds.take_all()
    assert sorted(json.loads(r["raw"])["n"] for r in rows) == list(range(20_000))
    assert {r["read_error"] for r in rows} == {""} and json.loads(rows[0]["raw"])["output"] == "é" * 20


def test_a_json_syntax_error_keeps_the_records_before_it(ray_cluster, tmp_path):
    src = tmp_path / "broken.json"
    src.write_text(json.dumps([_qa(i) for i in range(3)])[:-1] + ', {"instruction": oops}]')
    rows = read_raw(list_input_files(DataConfig(path=str(src)))).take_all()
    assert [json.loads(r["raw"]) for r in rows[:3]] == [_qa(i) for i in range(3)]
    assert [r["read_error"] for r in rows] == ["", "", "", "invalid_json"]
    assert rows[3]["read_detail"].startswith(f"{src}: JSON broken after record 3")


def test_parquet_nested_messages_and_a_mixture_carry_their_source(ray_cluster, tmp_path):
    messages = [[{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": f"ok {i}"}] for i in range(3)]
    days = pd.to_datetime([f"2024-01-0{i + 1}" for i in range(3)])
    pd.DataFrame({"messages": messages, "day": days}).to_parquet(tmp_path / "chat.parquet")
    _jsonl(tmp_path / "qa.jsonl", [_qa(i) for i in range(2)])
    data = DataConfig(path=[str(tmp_path / "qa.jsonl"), {"path": str(tmp_path / "chat.parquet"), "format": "messages"}])
    rows = read_raw(list_input_files(data)).take_all()
    by_source = {s: [json.loads(r["raw"]) for r in rows if r["source"] == s] for s in (0, 1)}
    assert by_source[0] == [_qa(0), _qa(1)]
    assert [r["messages"] for r in by_source[1]] == messages
    assert by_source[1][0]["day"].startswith("2024-01-01")


def test_jsonl_on_s3_is_listed_read_and_hashed(ray_cluster, s3_server):
    import ray

    base = s3_server("inputs")
    for k in range(2):
        lines = "".join(json.dumps(_qa(k * 10 + i)) + "\n" for i in range(3))
        storage.write_text(storage.join(base, f"part-{k}.jsonl"), lines)
    storage.write_text(storage.join(base, "_SUCCESS"), "")
    files = list_input_files(DataConfig(path=storage.join(base, "part-*.jsonl")))
    assert [f.path for f in files] == [storage.join(base, f"part-{k}.jsonl") for k in range(2)]
    rows = read_raw(files).take_all()
    read = sorted(json.loads(r["raw"])["instruction"] for r in rows)
    assert read == sorted(f"question {k * 10 + i}" for k in range(2) for i in range(3))
    hashes = ray.get(hash_inputs(files))
    want = [(f.path, 0, f.size, hashlib.sha256(storage.read_bytes(f.path)).hexdigest()) for f in files]
    assert [(h["path"], h["source"], h["bytes"], h["sha256"]) for h in hashes] == want


def test_fingerprint_follows_content_not_name_or_size(ray_cluster, tmp_path):
    import ray

    src = _jsonl(tmp_path / "data.jsonl", [_qa(1), _qa(2)])
    data, model = DataConfig(path=str(src)), ModelConfig(name_or_path="tiny")

    def fingerprint() -> str:
        return _fingerprint(ray.get(hash_inputs(list_input_files(data))), data, model)

    first = fingerprint()
    assert fingerprint() == first
    size = src.stat().st_size
    _jsonl(src, [_qa(2), _qa(1)])  # same name, same size, other content
    assert src.stat().st_size == size and fingerprint() != first
