"""``aigc generate``: the serving engine over a dataset on a Ray Data actor pool; resumable after a kill."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_tiny_adapter

from aigc.batch import run_generate
from aigc.batch.inputs import to_prompt
from aigc.config import load_config
from aigc.data.formats import RowError
from aigc.errors import ConfigError
from aigc.registry import Registry
from aigc.serve.engine import GenerationEngine, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")
DEMO = ROOT / "assets" / "demo-data" / "support.jsonl"


def _rows(n: int) -> list[dict]:
    return [json.loads(line) for line in DEMO.read_text().splitlines()[:n]]


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> str:
    """A registry holding ``bot:v1``, a tiny adapter of the tiny base model whose answers differ from the base's."""
    tmp = tmp_path_factory.mktemp("batch-registry")
    adapter = make_tiny_adapter(TINY, tmp / "adapter", seed=3)
    root = str(tmp / "registry")
    Registry(root).register("bot", adapter, base_model=TINY)
    return root


def _cfg(tmp: Path, registry: str, input_path: Path, *extra: str):
    return load_config(None, [f"output_dir={tmp / 'run'}", f"registry_dir={registry}", f"model.name_or_path={TINY}",
                              f"generate.input={input_path}", "generate.max_tokens=12", "generate.batch_size=4",
                              *extra])  # fmt: skip


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_prompt_rows_of_each_format():
    row = to_prompt(json.dumps({"instruction": "Where is it?", "output": "Here."}), "alpaca", "prompt")
    assert row.prompt == [{"role": "user", "content": "Where is it?"}] and row.reference == "Here."
    row = to_prompt(json.dumps({"messages": [{"role": "user", "content": "Hi"}]}), "messages", "prompt")
    assert row.prompt == [{"role": "user", "content": "Hi"}] and row.reference is None
    row = to_prompt(json.dumps({"q": "Hello?"}), "prompt", "q")
    assert row.prompt == [{"role": "user", "content": "Hello?"}] and row.shown == "Hello?"
    with pytest.raises(RowError) as err:
        to_prompt(json.dumps({"instruction": ""}), "alpaca", "prompt")
    assert err.value.reason == "empty_prompt"


def test_bad_config_fails_before_any_ray_work(tmp_path, registry):
    from aigc.cli import check_stage

    with pytest.raises(ConfigError, match="generate.input"):
        check_stage("generate", _cfg(tmp_path, registry, tmp_path / "missing.jsonl"))
    data = _write(tmp_path / "in.jsonl", _rows(2))
    with pytest.raises(ConfigError, match="generate.model='nope'"):
        check_stage("generate", _cfg(tmp_path, registry, data, "generate.model=nope"))
    with pytest.raises(ConfigError, match="generate.temperature"):
        _cfg(tmp_path, registry, data, "generate.temperature=-1")


def test_generate_equals_the_served_engine_and_quarantines_bad_rows(tmp_path, registry, ray_cluster):
    rows = _rows(6)
    data = _write(tmp_path / "in.jsonl", [*rows[:3], {"instruction": "", "output": "x"}, "not json", *rows[3:]])
    cfg = _cfg(tmp_path, registry, data, "generate.model=bot@v1", "generate.output_format=parquet")
    result = run_generate(cfg)
    assert (result.rows, result.answered, result.quarantined) == (8, 6, 2)
    import pyarrow.parquet as pq

    out = pq.read_table(result.path).to_pylist()
    assert [r["index"] for r in out] == [0, 1, 2, 5, 6, 7]
    assert {r["model_version"] for r in out} == {"bot:v1"} and {r["model"] for r in out} == {"bot@v1"}
    bad = [json.loads(x) for x in Path(result.output, "quarantine.jsonl").read_text().splitlines()]
    assert [(b["index"], b["reason"]) for b in bad] == [(3, "empty_prompt"), (4, "invalid_json")]
    # The same greedy answers as the engine a serving replica runs, with the same adapter.
    engine = GenerationEngine(TINY)
    engine.load_adapter(Registry(registry).local_adapter_dir(Registry(registry).resolve("bot:v1")), "bot")
    try:
        for r, raw in zip(out, [*rows[:3], *rows[3:]], strict=True):
            want = engine.generate([{"role": "user", "content": raw["instruction"]}],
                                   SamplingParams(max_tokens=12, temperature=0), adapter="bot")  # fmt: skip
            assert (r["answer"], r["finish_reason"], r["prompt_tokens"], r["completion_tokens"]) == (
                want.text,
                want.finish_reason,
                want.prompt_tokens,
                want.completion_tokens,
            )
            assert r["reference"] == raw["output"]
        base = engine.generate([{"role": "user", "content": rows[0]["instruction"]}], SamplingParams(12, 0))
        assert base.text != out[0]["answer"]  # the adapter was used
    finally:
        engine.close()
    # A re-run finds every row published: nothing generated again, same output.
    again = run_generate(cfg)
    assert (again.skipped, again.answered, again.completion_tokens) == (8, 6, 0)
    # Other settings into the same output are refused.
    with pytest.raises(ConfigError, match="max_tokens"):
        run_generate(cfg.model_copy(update={"generate": cfg.generate.model_copy(update={"max_tokens": 5})}))
