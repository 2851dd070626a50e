"""``aigc eval``: base and an adapter on the same held-out prompts, with pair scores, a judge, a table and a plot."""

from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import make_tiny_adapter

from aigc.batch.evaluate import METRICS, eval_dir, eval_table, run_eval
from aigc.config import load_config
from aigc.errors import ConfigError
from aigc.registry import Registry
from aigc.train.gen_metrics import answer_scores

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")
DEMO = ROOT / "assets" / "demo-data" / "support.jsonl"


class _Judge(BaseHTTPRequestHandler):
    """An OpenAI-compatible judge that always answers "A" (the reference model's answer on even rows)."""

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        self.rfile.read(int(self.headers["Content-Length"]))
        body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "A"}}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return


@pytest.fixture
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Judge)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()
    thread.join(timeout=5)


def _setup(tmp: Path, judge: str | None, swap: bool = False, *extra: str):
    rows = [json.loads(x) for x in DEMO.read_text().splitlines()[:5]]
    held_out = tmp / "held_out.jsonl"
    held_out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = tmp / ("pairs-swapped.jsonl" if swap else "pairs.jsonl")
    lines = []
    for i, r in enumerate(rows[:4]):  # the shape `aigc feedback export --pairs` writes
        good, bad = r["output"], rows[i + 1]["output"] if rows[i + 1]["output"] != r["output"] else "No idea."
        chosen, rejected = (bad, good) if swap else (good, bad)
        lines.append({"messages": [{"role": "user", "content": r["instruction"]}],
                      "chosen": {"role": "assistant", "content": chosen},
                      "rejected": {"role": "assistant", "content": rejected}})  # fmt: skip
    pairs.write_text("".join(json.dumps(x) + "\n" for x in lines))
    registry = tmp / "registry"
    if not registry.exists():
        Registry(str(registry)).register("bot", make_tiny_adapter(TINY, tmp / "adapter", seed=3), base_model=TINY)
    judge_keys = [f"generate.judge.url={judge}", "generate.judge.model=judge"] if judge else []
    return load_config(None, [f"output_dir={tmp / 'run'}", f"registry_dir={registry}", f"model.name_or_path={TINY}",
                              f"generate.input={held_out}", f"generate.eval_pairs={pairs}", "generate.max_tokens=8",
                              *judge_keys, *extra])  # fmt: skip


def test_eval_reports_two_models_with_pairs_judge_table_and_plot(tmp_path, ray_cluster, judge_url):
    cfg = _setup(tmp_path, judge_url)
    report = run_eval(cfg, ["base", "bot:v1"])
    assert (report["prompts"], report["pairs"], report["reference_model"]) == (5, 4, "base")
    base, bot = report["models"]["base"], report["models"]["bot:v1"]
    assert set(base) == {"version", *METRICS} and bot["version"] == "bot:v1" and base["version"] == "tiny-base"
    # exact match and ROUGE-L from the answers the generation runs wrote
    out = Path(eval_dir(cfg), "generations")
    for label, m in (("tiny-base", base), ("bot_v1", bot)):
        rows = [json.loads(x) for x in (out / label / "generations.jsonl").read_text().splitlines()]
        scores = [answer_scores(r["answer"], r["reference"]) for r in rows]
        assert m["rouge_l"] == pytest.approx(sum(s for _, s in scores) / 5)
        assert m["exact_match"] == pytest.approx(sum(e for e, _ in scores) / 5)
    for m in (base, bot):
        assert m["loss"] > 0 and m["perplexity"] == pytest.approx(math.exp(m["loss"]))
        assert 0 <= m["pair_accuracy"] <= 1
    assert base["loss"] != bot["loss"]  # the adapter changes the likelihoods
    # the reference model has no score against itself
    assert (base["win_rate"], base["judge_win_rate"], base["reward_accuracy"], base["reward_margin"]) == (None,) * 4
    assert 0 <= bot["win_rate"] <= 1 and 0 <= bot["reward_accuracy"] <= 1
    assert bot["judge_win_rate"] == pytest.approx(2 / 5)  # the judge says A: the adapter's answer on rows 1 and 3
    assert json.loads(Path(eval_dir(cfg), "report.json").read_text()) == report
    assert Path(eval_dir(cfg), "eval.png").stat().st_size > 1000
    table = eval_table(report)
    assert table.splitlines()[0].split()[:3] == ["model", "version", "exact_match"]
    assert "bot:v1" in table and "5 prompts, 4 pairs" in table
    # The same pairs with chosen and rejected swapped: every pair score turns over.
    swapped = run_eval(_setup(tmp_path, None, True), ["base", "bot:v1"])
    s_base, s_bot = swapped["models"]["base"], swapped["models"]["bot:v1"]
    assert s_base["pair_accuracy"] == pytest.approx(1 - base["pair_accuracy"])
    assert s_bot["reward_accuracy"] == pytest.approx(1 - bot["reward_accuracy"])
    assert s_bot["reward_margin"] == pytest.approx(-bot["reward_margin"], abs=1e-4)
    assert s_bot["rouge_l"] == bot["rouge_l"]  # the answers were not generated again


def test_eval_bad_config_errors(tmp_path):
    from aigc.cli import check_stage

    cfg = _setup(tmp_path, None)
    with pytest.raises(ConfigError, match="generate.eval_models"):
        check_stage("eval", cfg.model_copy(update={"generate": cfg.generate.model_copy(
            update={"eval_models": ["base", "missing:v3"]})}))  # fmt: skip
    with pytest.raises(ConfigError, match="generate.eval_pairs"):
        check_stage("eval", cfg.model_copy(update={"generate": cfg.generate.model_copy(
            update={"eval_pairs": str(tmp_path / "none.jsonl")})}))  # fmt: skip
    with pytest.raises(ConfigError, match="generate.judge.prompt"):
        load_config(None, ["generate.judge.url=http://x", "generate.judge.model=m", "generate.judge.prompt=hi"])
    with pytest.raises(ConfigError, match="generate.eval_models"):
        load_config(None, ["generate.eval_models=[base, base]"])
    with pytest.raises(ConfigError, match="--models"):
        run_eval(cfg, ["base", "nope:v9"])


def test_eval_command_takes_models_and_overrides_in_any_order(tmp_path, capsys):
    from aigc.cli import main

    cfg = _setup(tmp_path, None)
    keys = [f"output_dir={cfg.output_dir}", f"registry_dir={cfg.registry_dir}", f"model.name_or_path={TINY}",
            f"generate.input={cfg.generate.input}"]  # fmt: skip
    assert main(["eval", *keys, "--models", "base", "bot:v7"]) == 2
    assert "generate.eval_models='bot:v7'" in capsys.readouterr().err
    assert main(["eval", "--models", "base", "bot:v7", *keys]) == 2  # overrides after the models are overrides
    assert "generate.eval_models='bot:v7'" in capsys.readouterr().err
    assert main(["generate", *keys, "generate.model=nobody"]) == 2
    assert "generate.model='nobody'" in capsys.readouterr().err
