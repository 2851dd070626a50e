"""``aigc generate``: the serving engine over a dataset on a Ray Data actor pool; resumable after a kill."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
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


def test_a_run_killed_midway_resumes_without_duplicates_or_gaps(tmp_path, registry, ray_cluster):
    import re
    import tempfile

    from cluster import stop_processes

    data = _write(tmp_path / "in.jsonl", _rows(160))
    overrides = [f"output_dir={tmp_path / 'run'}", f"registry_dir={registry}", f"model.name_or_path={TINY}",
                 f"generate.input={data}", "generate.max_tokens=16", "generate.batch_size=4", "generate.model=bot",
                 "generate.seed=7", "generate.temperature=0.8", "cluster.num_cpus=2"]  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="rayg-", dir="/tmp")  # short: Ray's socket paths stay under 108 characters
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT / "tests")])}  # fmt: skip
    parts = tmp_path / "run" / "generate" / "parts"
    driver = subprocess.Popen([sys.executable, "-m", "aigc.cli", "generate", *overrides], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while not list(parts.glob("part-*.jsonl")) and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert driver.poll() is None and list(parts.glob("part-*.jsonl")), "no part was published before the end"
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its embedded cluster and the actors, at once
        driver.wait(timeout=30)
    finally:
        stop_processes(re.compile(re.escape(ray_tmp)))
    published = len(list(parts.glob("part-*.jsonl")))
    assert 1 <= published < 40, published
    result = run_generate(load_config(None, [o for o in overrides if not o.startswith("cluster.")]))
    assert 0 < result.skipped < 160 and (result.rows, result.answered, result.quarantined) == (160, 160, 0)
    rows = [json.loads(x) for x in Path(result.path).read_text().splitlines()]
    assert [r["index"] for r in rows] == list(range(160))  # every row once, none missing
    # Sampled rows are reproducible (row i samples with seed + i): whichever run (the killed one or its re-run)
    # wrote a row, a fresh run writes the same answer.
    fresh = run_generate(load_config(None, [*overrides[:-1], "generate.limit=4"]), output=str(tmp_path / "fresh"))
    again = [json.loads(x) for x in Path(fresh.path).read_text().splitlines()]
    assert [r["answer"] for r in again] == [r["answer"] for r in rows[:4]]


class _FakeEngine:
    """An engine whose answer depends on the prompt: a refused prompt, a failed row, or an engine that stopped."""

    async def agenerate(self, prompt, params, adapter=None):
        from aigc.errors import GenerationError, InvalidRequestError, ServiceUnavailableError
        from aigc.serve.engine import Completion

        text = prompt[-1]["content"]
        if text == "too long":
            raise InvalidRequestError("the prompt is too long", param="messages", code="context_length_exceeded")
        if text == "nan":
            raise GenerationError("non-finite scores", code="generation_failed")
        if text == "down":
            raise ServiceUnavailableError("the engine was closed; retry the request", code="shutting_down")
        return Completion(text.upper(), "stop", 3, 2)


def test_row_faults_are_quarantined_and_an_engine_outage_publishes_nothing(tmp_path):
    from aigc.batch.worker import EngineSettings, generate_rows
    from aigc.errors import ServiceUnavailableError

    s = EngineSettings(TINY, "auto", False, None, "base", "tiny-base", "prompt", "prompt", None, 8, 0.0, 1.0, None,
                       4, str(tmp_path))  # fmt: skip
    raws = [json.dumps({"prompt": p}) for p in ("hi", "too long", "nan")] + ["{}"]
    rows = generate_rows(_FakeEngine(), None, s, [0, 1, 2, 3], raws)
    assert rows[0]["answer"] == "HI" and rows[0]["error"] is None and rows[0]["completion_tokens"] == 2
    assert [(r["error"], r["raw"]) for r in rows[1:]] == [
        ("context_length_exceeded", raws[1]),
        ("generation_failed", raws[2]),
        ("missing_field", "{}"),
    ]
    with pytest.raises(ServiceUnavailableError):
        generate_rows(_FakeEngine(), None, s, [0, 1], [raws[0], json.dumps({"prompt": "down"})])


def test_a_parquet_file_with_a_prompt_column_is_read_and_detected(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from aigc.batch.inputs import detect_format, read_rows

    path = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"question": ["Where is my parcel?", "Can I pay later?"], "n": [1, 2]}), path)
    raws = read_rows(str(path))
    assert detect_format(raws, "auto", "question") == "prompt"
    rows = [to_prompt(r, "prompt", "question", system_prompt="Be brief.") for r in raws]
    assert rows[1].prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Can I pay later?"},
    ]
    assert read_rows(str(path), limit=1) == raws[:1]
    with pytest.raises(ConfigError, match="generate.format"):
        detect_format(raws, "auto", "prompt")


def test_judge_verdicts():
    from aigc.batch.judge import verdict

    assert [verdict(x) for x in ("A", "**B**", "Answer: A.", "b", "Neither", "")] == ["A", "B", "A", "B", None, None]
