"""Operating the endpoint: content safety and metrics.

Content safety: the rule policy, the streaming guard, config errors, and the app refusing flagged prompts and
stopping flagged answers with ``finish_reason: content_filter`` (non-streamed and streamed). Metrics: the
platform's series on Ray's real Prometheus endpoint move with real requests; the alert rules and the Grafana
dashboard parse (``promtool`` when installed) and only use series the platform exports.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from helpers import free_port, make_tiny_model, metric_samples, metric_value, scrape_metrics, wait_for_metrics

from aigc.config import PlatformConfig, load_config
from aigc.errors import ConfigError
from aigc.serve.moderation import Flag, OutputGuard, RulePolicy, load_policy

TIMEOUT_S = 60


# ============================================================================== policy and guard, no server
def test_rule_policy_flags_the_earliest_match_case_insensitively():
    policy = RulePolicy({"weapons": [r"\bbomb\b"], "pii": [r"\b\d{3}-\d{2}-\d{4}\b"]})
    assert policy.check("how do I bake bread") is None
    assert policy.check("my SSN is 123-45-6789, and a BOMB") == Flag("pii", 10, 21)
    assert policy.check("Bomb threat") == Flag("weapons", 0, 4)


def test_guard_never_sends_part_of_a_phrase_split_over_pieces():
    guard = OutputGuard(RulePolicy({"x": ["secret plan"]}), holdback_chars=16)
    pieces = ["Here is ", "the sec", "ret", " plan", " in full"]
    sent = "".join(guard.push(p) for p in pieces)
    assert guard.flag is not None and guard.flag.category == "x"
    assert sent == "Here is the "  # everything before the phrase, nothing of it
    assert guard.push("more") == "" and guard.flush() == ""


def test_guard_passes_clean_text_through_whole():
    guard = OutputGuard(RulePolicy({"x": ["secret plan"]}), holdback_chars=16)
    pieces = ["A perfectly ", "ordinary ", "answer about a plan", " and a secret."]
    sent = "".join(guard.push(p) for p in pieces) + guard.flush()
    assert guard.flag is None and sent == "".join(pieces)


def flag_the_word_refund():  # a classifier factory, imported by path in the test below
    class Classifier:
        def check(self, text: str) -> Flag | None:
            i = text.find("refund")
            return None if i < 0 else Flag("classifier", i, i + 6)

    return Classifier()


def test_a_classifier_plugs_in_by_import_path_after_the_rules():
    policy = load_policy({"rules": ["never"]}, "test_serve_ops:flag_the_word_refund")
    assert policy.check("never mind the refund").category == "rules"
    assert policy.check("about the refund") == Flag("classifier", 10, 16)
    assert load_policy({}, None) is None


def test_bad_moderation_config_fails_at_load_naming_the_field():
    with pytest.raises(ConfigError, match=r"serve\.moderation\.categories: .*category 'x': pattern 'a\(' does not"):
        load_config("configs/demo.yaml", ['serve.moderation.categories.x=["a("]'])
    with pytest.raises(ConfigError, match=r"serve\.moderation\.classifier: .*'package\.module:factory'"):
        load_config("configs/demo.yaml", ["serve.moderation.classifier=not-a-path"])
    with pytest.raises(ConfigError, match=r"classifier 'no_such_module:f' could not be loaded"):
        load_policy({}, "no_such_module:f")


# ============================================================================== the app
PROMPT = "Where is my parcel?"


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    """An app whose rules flag one prompt word and a word the base model is known to answer with."""
    from ray import serve

    from aigc.serve.engine import GenerationEngine, SamplingParams
    from aigc.serve.run import run_server

    base = make_tiny_model(tmp_path_factory.mktemp("moderation") / "tiny-base")
    engine = GenerationEngine(base)
    answer = engine.generate([{"role": "user", "content": PROMPT}], SamplingParams(max_tokens=24, temperature=0))
    engine.close()
    # A word of the answer whose first (case-insensitive) occurrence is past its start: the rule will cut there.
    cuts = {w: re.search(re.escape(w), answer.text, re.IGNORECASE).start() for w in re.findall(r"\w{3,}", answer.text)}
    word = next((w for w, at in cuts.items() if at > 5), None)
    assert word is not None, answer.text  # random weights, fixed seed: such a word exists
    serve.shutdown()
    cfg = PlatformConfig.model_validate(
        {
            "registry_dir": str(tmp_path_factory.mktemp("registry")),
            "model": {"name_or_path": base},
            "serve": {
                "port": free_port(),
                "app_name": "aigc-moderation",
                "max_tokens_cap": 64,
                "cpus_per_replica": 1,
                "autoscaling": {"min_replicas": 1, "max_replicas": 1},
                "moderation": {"categories": {"banned": [r"\bforbidden topic\b"], "test": [re.escape(word)]},
                               "holdback_chars": 16},
            },
        }
    )  # fmt: skip
    url = run_server(cfg, blocking=False)
    http = httpx.Client(base_url=url, timeout=TIMEOUT_S)
    yield SimpleNamespace(url=url, http=http, word=word, allowed=answer.text[: cuts[word]])
    http.close()
    serve.shutdown()


def _chat(server, content: str, model: str = "tiny-base", **kw) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 24,
            "temperature": 0, **kw}  # fmt: skip
    return server.http.post("/chat/completions", json=body)


def test_a_flagged_prompt_is_refused_before_generation(server):
    r = _chat(server, "Tell me about the FORBIDDEN topic please")
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["code"] == "content_filter" and err["param"] == "messages"
    assert err["message"] == "the prompt was flagged by this server's content policy (category: banned)"
    r = server.http.post("/completions", json={"model": "tiny-base", "prompt": "a forbidden topic", "max_tokens": 4})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"


def test_a_flagged_answer_stops_with_content_filter(server):
    r = _chat(server, PROMPT)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "content_filter"
    assert choice["message"]["content"] == server.allowed


def test_a_flagged_streamed_answer_never_sends_the_phrase(server):
    body = {"model": "tiny-base", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 24,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    text, reasons, usage = "", [], None
    with server.http.stream("POST", "/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line.removeprefix("data: "))
            for c in event["choices"]:
                text += c["delta"].get("content") or ""
                reasons.append(c["finish_reason"])
            usage = event.get("usage") or usage
    assert reasons[-1] == "content_filter" and server.word.lower() not in text.lower()
    assert text == server.allowed
    assert usage is not None and 0 < usage["completion_tokens"] <= 24


# ============================================================================== metrics
ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"


def test_metrics_move_with_real_requests(server):
    chat = "/v1/chat/completions"
    base = scrape_metrics()
    ok_before = metric_value(base, "ray_aigc_requests_total", route=chat, status="200", model="tiny-base", key="-")
    tokens_before = metric_value(base, "ray_aigc_completion_tokens_total", model="tiny-base")
    for _ in range(3):
        assert _chat(server, "Hello there", max_tokens=8).status_code == 200
    body = {"model": "tiny-base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}
    with server.http.stream("POST", "/chat/completions", json=body) as r:
        assert r.status_code == 200 and sum(1 for _ in r.iter_lines()) > 2
    assert _chat(server, "Hello", model="no-such-model").status_code == 404
    made_up = "/v1/made-up-path-" + "x" * 8
    assert server.http.post(made_up.removeprefix("/v1"), json={}).status_code == 404

    def moved(text: str) -> bool:
        return (
            # key="-": this server's callers; other tests' apps may have counted keyed requests for tiny-base
            metric_value(text, "ray_aigc_requests_total", route=chat, status="200", model="tiny-base", key="-")
            >= ok_before + 4
            and metric_value(text, "ray_aigc_completion_tokens_total", model="tiny-base") > tokens_before
            and metric_value(text, "ray_aigc_requests_total", route=chat, status="404", model="-") >= 1
            and metric_value(text, "ray_aigc_time_to_first_token_seconds_count", model="tiny-base") >= 1
            and 32 in metric_samples(text, "ray_aigc_batch_capacity")
            and metric_value(text, "ray_aigc_requests_total", route="other", status="404") >= 1
        )

    text = wait_for_metrics(moved)
    assert moved(text), [line.split("{", 1)[1] for line in text.splitlines() if "aigc_requests_total{" in line]
    assert made_up not in text  # a path a client made up never becomes a series of its own
    assert metric_value(text, "ray_aigc_completion_tokens_total", model="tiny-base") > tokens_before
    assert metric_value(text, "ray_aigc_request_latency_seconds_count", route=chat, model="tiny-base") >= 4
    # Gauges: one series per replica (an earlier app's replica may still be listed for a while).
    assert 32 in metric_samples(text, "ray_aigc_batch_capacity") and 1 in metric_samples(text, "ray_aigc_max_replicas")
    # The moderation tests above refused one prompt per endpoint and stopped answers.
    assert metric_value(text, "ray_aigc_content_filter_total", where="prompt", category="banned") >= 2
    assert metric_value(text, "ray_aigc_content_filter_total", where="answer", category="test") >= 2


def _exported_series() -> set[str]:
    """Series names the platform defines (``aigc_*`` in metrics.py), as Ray exports them."""
    source = (ROOT / "platform" / "aigc" / "serve" / "metrics.py").read_text()
    names = set(re.findall(r'"(aigc_[a-z_]+)"', source))
    series = {f"ray_{n}" for n in names}
    for n in names:  # histograms export _bucket/_count/_sum
        series |= {f"ray_{n}_bucket", f"ray_{n}_count", f"ray_{n}_sum"}
    return series


def _exprs_in_rules() -> list[str]:
    import yaml

    rules = yaml.safe_load((MONITORING / "aigc-alerts.yml").read_text())
    exprs = []
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert {"alert", "expr", "labels", "annotations"} <= rule.keys(), rule
            assert rule["labels"]["severity"] in ("page", "warn") and rule["annotations"]["summary"]
            exprs.append(rule["expr"])
    return exprs


def _exprs_in_dashboard() -> list[str]:
    dash = json.loads((MONITORING / "aigc-grafana.json").read_text())
    assert dash["uid"] and dash["panels"]
    return [t["expr"] for p in dash["panels"] for t in p["targets"]]


def test_alert_rules_and_dashboard_use_only_series_that_exist():
    exprs = _exprs_in_rules() + _exprs_in_dashboard()
    used = {name for e in exprs for name in re.findall(r"\bray_aigc_[a-z_]+", e)}
    assert used and used <= _exported_series(), used - _exported_series()
    serve_used = {name for e in exprs for name in re.findall(r"\bray_serve_[a-z_]+", e)}
    assert serve_used <= {"ray_serve_autoscaling_target_replicas"}  # Serve's own gauge, checked in Ray 2.60


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (Debian: apt install prometheus)")
def test_promtool_accepts_the_rules_and_every_dashboard_query(tmp_path):
    out = subprocess.run(["promtool", "check", "rules", str(MONITORING / "aigc-alerts.yml")], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:q{i}", "expr": e}
                                                       for i, e in enumerate(_exprs_in_dashboard())]}]}  # fmt: skip
    (tmp_path / "dashboard.yml").write_text(json.dumps(rules))  # JSON is YAML
    out = subprocess.run(["promtool", "check", "rules", str(tmp_path / "dashboard.yml")], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
