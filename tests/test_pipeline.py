"""`aigc pipeline`: fingerprints, skipping and resuming (fake stages, no Ray), the pipeline's config, and one
real run end to end on the shared Ray cluster (a stage fails, the re-run continues from it, the result is
registered, promoted, served and answers)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from aigc.config import load_config
from aigc.errors import ConfigError, TrainingError
from aigc.pipeline.feedback_round import pipeline_config, trained_config
from aigc.pipeline.fingerprint import content_hash, data_hash, fingerprint
from aigc.pipeline.runner import Stage, run_stages
from aigc.pipeline.stages import build_stages
from aigc.pipeline.state import PipelineState, state_path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "demo.yaml"


# 1. fingerprints
def test_fingerprint_follows_values_not_key_order():
    a = fingerprint({"train": {"lr": 1e-3, "epochs": 2}, "data": "abc"})
    assert a == fingerprint({"data": "abc", "train": {"epochs": 2, "lr": 1e-3}})  # order is not content
    assert len(a) == 16 and int(a, 16) >= 0
    assert a != fingerprint({"train": {"lr": 2e-3, "epochs": 2}, "data": "abc"})
    assert a != fingerprint({"train": {"lr": 1e-3, "epochs": 2}, "data": "abd"})
    assert a != fingerprint({"train": {"lr": 1e-3, "epochs": 2}, "data": "abc"}, upstream="0123")
    assert fingerprint({}, "0123") != fingerprint({}, "0124")


def test_data_hash_is_content_not_names(tmp_path):
    one = [{"path": "/a/x.jsonl", "source": 0, "sha256": "aa"}, {"path": "/a/y.jsonl", "source": 0, "sha256": "bb"}]
    moved = [{"path": "/b/z.jsonl", "source": 0, "sha256": "bb"}, {"path": "/b/x.jsonl", "source": 0, "sha256": "aa"}]
    assert data_hash(one) == data_hash(moved)
    assert data_hash(one) != data_hash([one[0], {**one[1], "sha256": "bc"}])  # an edited file
    assert data_hash(one) != data_hash([one[0], {**one[1], "source": 1}])  # the same file in another source
    f = tmp_path / "space.yaml"
    f.write_text("train.lr: {loguniform: [1.0e-3, 8.0e-3]}\n")
    before = content_hash(str(f))
    f.write_text("train.lr: {loguniform: [1.0e-3, 9.0e-3]}\n")
    assert content_hash(str(f)) != before


def _config(*overrides: str, tmp_path: Path):
    return load_config(DEMO, [f"output_dir={tmp_path / 'out'}", f"registry_dir={tmp_path / 'registry'}", *overrides])


def _fingerprints(cfg, content: str = "data-v1", sweep_values: dict | None = None) -> dict[str, str]:
    """Each real stage's fingerprint for ``cfg``, chained through upstream as the runner does, without running."""
    stages = build_stages(cfg, hash_data=lambda _: content)
    done = {"sweep": {"values": sweep_values or {"train.lr": 0.004}, "sweep_id": "s"}, "deploy": {"base_url": "u"}}
    prints: dict[str, str] = {}
    for s in stages:
        prints[s.name] = fingerprint(s.inputs(done), prints[s.upstream] if s.upstream else None)
    return prints


def test_what_changes_which_stage(tmp_path):
    base = _fingerprints(_config(tmp_path=tmp_path))
    assert list(base) == ["preprocess", "sweep", "train", "register", "promote", "deploy", "smoke"]

    def changed(other: dict[str, str]) -> set[str]:
        return {k for k in base if base[k] != other[k]}

    downstream_of_sweep = {"sweep", "train", "register", "promote", "smoke"}
    # A training key: the sweep (its trials train with it) and everything after; never preprocess or deploy.
    assert changed(_fingerprints(_config("train.lr=1e-3", tmp_path=tmp_path))) == downstream_of_sweep
    assert changed(_fingerprints(_config("lora.dropout=0.1", tmp_path=tmp_path))) == downstream_of_sweep
    # The data's content or a data key: everything but deploy (an endpoint serves whatever the registry holds).
    everything_but_deploy = {"preprocess", *downstream_of_sweep}
    assert changed(_fingerprints(_config(tmp_path=tmp_path), content="data-v2")) == everything_but_deploy
    assert changed(_fingerprints(_config("data.max_length=96", tmp_path=tmp_path))) == everything_but_deploy
    # The sweep's choice moves train and after; a serving key moves deploy alone.
    assert changed(_fingerprints(_config(tmp_path=tmp_path), sweep_values={"train.lr": 0.002})) == {
        "train", "register", "promote", "smoke"}  # fmt: skip
    assert changed(_fingerprints(_config("serve.max_batch_size=16", tmp_path=tmp_path))) == {"deploy"}
    # More workers for the final run: trials have their own worker count, so the sweep stands.
    assert changed(_fingerprints(_config("train.num_workers=4", tmp_path=tmp_path))) == {
        "train", "register", "promote", "smoke"}  # fmt: skip
    # Another alias moves that alias: nothing is trained or registered again.
    assert changed(_fingerprints(_config("pipeline.alias=stable", tmp_path=tmp_path))) == {"promote", "smoke"}
    # Keys no stage reads change nothing: tracking, the cluster size, keeping the server up, keeping old shards.
    for key in ("tracking.mlflow=false", "cluster.num_cpus=2", "pipeline.keep_serving=false", "data.keep_shard_sets=1"):
        assert changed(_fingerprints(_config(key, tmp_path=tmp_path))) == set(), key


def test_a_changed_search_space_file_reruns_the_sweep(tmp_path):
    space = tmp_path / "space.yaml"
    shutil.copy(ROOT / "tune_spaces" / "lora_lr_rank.yaml", space)
    cfg = _config(f"tune.space={space}", tmp_path=tmp_path)
    before = _fingerprints(cfg)
    space.write_text(space.read_text() + "\n# a comment changes the bytes: the sweep runs again\n")
    after = _fingerprints(cfg)
    assert {k for k in before if before[k] != after[k]} == {"sweep", "train", "register", "promote", "smoke"}


def test_without_a_sweep_train_follows_preprocess_and_trains_the_config_as_is(tmp_path):
    cfg = _config("pipeline.sweep=false", "pipeline.deploy=false", "pipeline.promote=false", tmp_path=tmp_path)
    stages = build_stages(cfg, hash_data=lambda _: "x")
    assert [(s.name, s.upstream) for s in stages] == [("preprocess", None), ("train", "preprocess"),
                                                      ("register", "train")]  # fmt: skip
    unpromoted = build_stages(_config("pipeline.promote=false", tmp_path=tmp_path), hash_data=lambda _: "x")
    assert [(s.name, s.upstream) for s in unpromoted][-2:] == [("deploy", None), ("smoke", "register")]
    assert trained_config(cfg, None) is cfg
    swept = trained_config(cfg, {"values": {"train.lr": 0.001, "lora.r": 4}})
    # the best values, for the full schedule: the config's own epochs and workers
    assert (swept.train.lr, swept.lora.r, swept.train.epochs, swept.train.num_workers) == (0.001, 4, 3, 2)


# 2. skipping and resuming, with fake stages
class _Fakes:
    """Three stages a -> b -> c that count their runs; ``fail`` names a stage that raises once."""

    def __init__(self, tmp_path: Path):
        self.state = state_path(str(tmp_path / "out"))
        self.runs: list[str] = []
        self.inputs = {"a": 1, "b": 1, "c": 1}
        self.fail: str | None = None
        self.present = {"a": True, "b": True, "c": True}

    def stage(self, name: str, upstream: str | None) -> Stage:
        def run(done):
            if self.fail == name:
                self.fail = None
                raise TrainingError(f"{name} broke")
            self.runs.append(name)
            return {"made": f"{name}-{self.inputs[name]}", "saw": sorted(done)}

        return Stage(name, lambda _: {"value": self.inputs[name]}, run, upstream=upstream,
                     exists=lambda _: self.present[name])  # fmt: skip

    def run(self) -> dict[str, str]:
        lines: list[str] = []
        try:
            outcomes = run_stages([self.stage("a", None), self.stage("b", "a"), self.stage("c", "b")],
                                  PipelineState.load(self.state), echo=lines.append)  # fmt: skip
        finally:
            self.lines = lines
        return {o.name: o.outcome for o in outcomes}


def test_a_failed_stage_is_where_the_rerun_starts(tmp_path):
    f = _Fakes(tmp_path)
    f.fail = "b"
    with pytest.raises(TrainingError, match="b broke"):
        f.run()
    assert f.runs == ["a"]
    assert "2/3 b" in f.lines[-1] and " failed " in f.lines[-1] and "TrainingError" in f.lines[-1]
    saved = json.loads(Path(f.state).read_text())["stages"]
    assert saved["a"]["status"] == "done" and saved["b"]["status"] == "failed" and "c" not in saved
    assert saved["b"]["error"] == "b broke"

    assert f.run() == {"a": "skipped", "b": "ran", "c": "ran"}
    assert f.runs == ["a", "b", "c"]
    assert "(same fingerprint" in f.lines[0] and " skipped " in f.lines[0]
    assert f.run() == {"a": "skipped", "b": "skipped", "c": "skipped"}  # nothing changed: nothing runs
    assert f.runs == ["a", "b", "c"]


def test_a_changed_input_reruns_its_stage_and_downstream_only(tmp_path):
    f = _Fakes(tmp_path)
    f.run()
    f.inputs["b"] = 2
    assert f.run() == {"a": "skipped", "b": "ran", "c": "ran"}
    f.inputs["c"] = 2
    assert f.run() == {"a": "skipped", "b": "skipped", "c": "ran"}
    f.inputs["a"] = 2
    assert f.run() == {"a": "ran", "b": "ran", "c": "ran"}
    assert f.runs == ["a", "b", "c", "b", "c", "c", "a", "b", "c"]


def test_a_lost_output_reruns_the_stage_but_not_downstream(tmp_path):
    """Same inputs, so the same fingerprint: b's output is rebuilt and c's (made from equal input) still holds."""
    f = _Fakes(tmp_path)
    f.run()
    f.present["b"] = False
    assert f.run() == {"a": "skipped", "b": "ran", "c": "skipped"}


def test_outputs_reach_downstream_stages_also_when_skipped(tmp_path):
    f = _Fakes(tmp_path)
    first = run_stages([f.stage("a", None), f.stage("b", "a")], PipelineState.load(f.state), echo=lambda _: None)
    again = run_stages([f.stage("a", None), f.stage("b", "a")], PipelineState.load(f.state), echo=lambda _: None)
    assert [o.outputs for o in again] == [o.outputs for o in first] == [{"made": "a-1", "saw": []},
                                                                         {"made": "b-1", "saw": ["a"]}]  # fmt: skip


def test_an_uncached_stage_runs_every_time_and_a_bad_state_file_reruns_all(tmp_path):
    f = _Fakes(tmp_path)
    check = Stage("check", lambda _: {}, lambda _: f.runs.append("check") or {}, upstream="a", cached=False)
    for _ in range(2):
        run_stages([f.stage("a", None), check], PipelineState.load(f.state), echo=lambda _: None)
    assert f.runs == ["a", "check", "check"]
    Path(f.state).write_text("{not json")
    assert f.run() == {"a": "ran", "b": "ran", "c": "ran"}


# 3. the pipeline's config
@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("pipeline.sweep_epochs=1", "pipeline.sweep_epochs: unknown key"),  # the trials' epochs: tune.epochs
        ("pipeline.alias=v3", "pipeline.alias: Value error, 'v3' is reserved"),
        ("pipeline.alias=latest", "pipeline.alias: Value error, 'latest' is reserved"),
        ("pipeline.alias=-x", "pipeline.alias: String should match pattern"),
        ("pipeline.swep=false", "pipeline.swep: unknown key"),
        ("pipeline.feedback_weight=0", "pipeline.feedback_weight: Input should be greater than 0"),
        ("pipeline.smoke_prompt=", "pipeline.smoke_prompt: String should have at least 1 character"),
        ("pipeline.feedback_method=kto", "pipeline.feedback_method: Input should be 'sft' or 'dpo'"),
        (
            "pipeline.promote_if=eval.exact_match>=prev",
            "promote_if 'eval.exact_match>=prev' is not a gate: write 'eval.METRIC OP previous'",
        ),
        ("pipeline.promote_if=eval.bleu > 0.3", "promote_if names eval.bleu; the eval report has: exact_match"),
    ],
)
def test_bad_pipeline_keys_are_named(override, message, tmp_path):
    with pytest.raises(ConfigError) as err:
        _config(override, tmp_path=tmp_path)
    assert message in str(err.value)


def test_inconsistent_pipeline_keys_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="alias 'stable' is set but promote is false"):
        _config("pipeline.promote=false", "pipeline.alias=stable", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="promote_if 'eval.rouge_l > 0.2' is set but promote is false"):
        _config("pipeline.promote=false", "pipeline.promote_if=eval.rouge_l > 0.2", tmp_path=tmp_path)
    with pytest.raises(ConfigError, match="feedback_method=dpo trains on preference pairs: set pipeline.feedback"):
        _config("pipeline.feedback_method=dpo", tmp_path=tmp_path)


def test_a_dpo_feedback_round_trains_on_the_pairs_from_the_served_version_pinned_once(tmp_path):
    from aigc.pipeline.checks import check_pipeline
    from aigc.pipeline.feedback_round import round_config
    from aigc.registry import Registry

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("{}\n")
    cfg = _config(f"pipeline.feedback={pairs}", "pipeline.feedback_method=dpo", "pipeline.alias=prod",
                  "pipeline.sweep=false", "train.adapter_name=bot", tmp_path=tmp_path)  # fmt: skip
    run = pipeline_config(cfg)
    [only] = run.data.sources()  # the pairs alone: supervised rows and pairs do not mix in one run
    assert (only.path, only.format, run.data.preference, run.train.preference.method) == (
        str(pairs), "messages", True, "dpo")  # fmt: skip
    stages = build_stages(run, hash_data=lambda _: "x")
    assert [(s.name, s.upstream) for s in stages][:4] == [
        ("preprocess", None), ("start", "preprocess"), ("train", "start"), ("register", "train")]  # fmt: skip
    start = stages[1]
    done = {"preprocess": {"data_hash": "d1"}}
    with pytest.raises(ConfigError, match="continues the version bot:prod serves, but there is none"):
        start.run(done)
    state = PipelineState.load(state_path(str(tmp_path / "out")))

    def start_pinned(data: str) -> str:
        """The pipeline's first two stages run for feedback data ``data``: the version the round starts from."""
        pre = Stage("preprocess", lambda _: {"data": data}, lambda _: {"data_hash": data})
        return run_stages([pre, start], state, echo=lambda _: None)[1].outputs["init_adapter"]

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    (adapter / "adapter_model.safetensors").write_bytes(b"v1")
    reg = Registry(str(tmp_path / "registry"))
    reg.promote(reg.register("bot", str(adapter), "base").model_id, "prod")
    assert start_pinned("d1") == "bot:v1"
    assert round_config(run, {"start": {"init_adapter": "bot:v1"}}).train.init_adapter == "bot:v1"
    # the round's own promote moves prod to v2, but the pin is the start stage's recorded output, kept while the
    # data is the same: a re-run continues this round instead of starting another one on top of its result
    (adapter / "adapter_model.safetensors").write_bytes(b"v2")
    reg.promote(reg.register("bot", str(adapter), "base").model_id, "prod")
    assert start_pinned("d1") == "bot:v1"
    assert start_pinned("d2") == "bot:v2"  # new feedback: a new round, from what is served now
    with pytest.raises(ConfigError, match="searches lora.r: set pipeline.sweep=false or a space without lora"):
        check_pipeline(_config(f"pipeline.feedback={pairs}", "pipeline.feedback_method=dpo", tmp_path=tmp_path))


def test_the_cli_refuses_a_bad_pipeline_before_any_ray_work(tmp_path, capsys):
    import ray

    from aigc.cli import main

    ray_was_up = ray.is_initialized()  # the session's cluster may already run: what matters is no new Ray work
    out = tmp_path / "out"
    assert main(["pipeline", "--config", str(DEMO), f"output_dir={out}", "tune.epochs=0"]) == 2
    assert "tune.epochs: Input should be greater than or equal to 1" in capsys.readouterr().err
    missing = tmp_path / "nowhere.jsonl"
    assert main(["pipeline", "--config", str(DEMO), f"output_dir={out}", f"pipeline.feedback={missing}"]) == 1
    assert f"pipeline.feedback: no such file {missing}; write it with `aigc feedback export" in capsys.readouterr().err
    full = ["pipeline", "--config", str(DEMO), f"output_dir={out}", "train.method=full", "train.lr=1e-4"]
    assert main(full) == 2
    assert "pipeline.deploy: the app serves LoRA adapters" in capsys.readouterr().err
    assert ray.is_initialized() == ray_was_up and not out.exists()


def test_feedback_is_mixed_in_as_a_messages_source(tmp_path):
    feedback = tmp_path / "feedback.jsonl"
    cfg = pipeline_config(_config("data.columns.question=instruction", f"pipeline.feedback={feedback}",
                                  "pipeline.feedback_weight=2", tmp_path=tmp_path))  # fmt: skip
    original, mixed = cfg.data.sources()
    assert original.path == str(ROOT / "assets/demo-data/support.jsonl") and original.format == "alpaca"
    assert original.columns == {"question": "instruction"}  # the original keeps data.columns...
    assert (mixed.path, mixed.format, mixed.columns, mixed.weight) == (str(feedback), "messages", {}, 2.0)  # ...not it
    plain = _config(tmp_path=tmp_path)
    assert pipeline_config(plain) is plain


def test_pipeline_is_a_job_and_a_submittable_stage(tmp_path):
    from aigc.cluster.submit import STAGE_SCRIPTS, entrypoint

    assert (ROOT / STAGE_SCRIPTS["pipeline"]).is_file()
    assert entrypoint("pipeline", str(DEMO), ["pipeline.sweep=false"], str(ROOT)) == (
        "python jobs/pipeline.py --config configs/demo.yaml pipeline.sweep=false"
    )


# 4. the real pipeline, end to end
@pytest.mark.slow
def test_pipeline_fails_at_train_then_continues_registers_promotes_and_serves(ray_cluster, tmp_path, monkeypatch):
    """Three to five minutes on a busy 2-core machine: a 2-trial sweep, a training run that fails (a worker dies,
    no restarts allowed), the re-run that skips preprocess and the sweep, trains, registers, promotes, deploys
    and asks the endpoint; a third run that only checks the endpoint; then one feedback round: a rated answer,
    exported, mixed into the data, a new version trained and promoted on the running app without a redeploy."""
    from helpers import free_port
    from ray import serve

    from aigc.config import with_values
    from aigc.demo.dataset import generate_support_examples
    from aigc.feedback.export import export_feedback
    from aigc.pipeline import run_pipeline
    from aigc.registry import Registry
    from aigc.serve.client import ask, openai_client
    from aigc.train.context import FAULT_ENV

    data = tmp_path / "support.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in generate_support_examples(120, seed=3)))
    cfg = _config(f"data.path={data}", "data.tokenizer_actors=1", "train.num_workers=1", "train.epochs=1",
                  "train.batch_size=16", "train.eval_generation_samples=0", "train.max_failures=0",
                  "tracking.mlflow=false", "tracking.tensorboard=false", "tune.num_samples=2", "tune.seed=0",
                  f"serve.port={free_port()}", "serve.autoscaling.max_replicas=1", "serve.capture=true",
                  "pipeline.alias=stable",
                  "pipeline.keep_serving=false", tmp_path=tmp_path)  # fmt: skip
    serve.shutdown()  # Serve's port is fixed when it starts: begin from a clean slate
    try:
        # 1. The training run fails after its first step (injected into the real worker loop).
        monkeypatch.setenv(FAULT_ENV, "1")
        with pytest.raises(TrainingError, match="failed after 0 restarts"):
            run_pipeline(cfg)
        monkeypatch.undo()
        recorded = PipelineState.load(state_path(cfg.output_dir)).stages
        assert {k: r.status for k, r in recorded.items()} == {"preprocess": "done", "sweep": "done", "train": "failed"}
        assert "failed after 0 restarts" in recorded["train"].error
        assert Registry(cfg.registry_dir).list() == []  # the sweep only chooses: nothing registered yet

        # 2. The re-run continues at train: preprocess and the sweep are skipped.
        res = run_pipeline(cfg)
        assert [(s.name, s.outcome) for s in res.stages] == [
            ("preprocess", "skipped"), ("sweep", "skipped"), ("train", "ran"), ("register", "ran"),
            ("promote", "ran"), ("deploy", "ran"), ("smoke", "ran")]  # fmt: skip
        reg = Registry(cfg.registry_dir)
        entry = reg.resolve("support-bot:stable")
        assert (res.registry_id, res.served_as, entry.model_id) == ("support-bot:v1", "support-bot:stable",
                                                                    "support-bot:v1")  # fmt: skip
        swept = res.stages[1].outputs["values"]
        assert entry.config["sweep"]["values"] == swept and entry.config["train"]["lr"] == swept["train.lr"]
        assert entry.metrics["eval_loss"] == res.stages[2].outputs["metrics"]["eval_loss"]
        smoke = res.stages[-1].outputs
        assert smoke["answered_by"] == "support-bot:v1" and smoke["answer"].strip()
        assert reg.aliases("support-bot")[0].model_id == "support-bot:stable"

        # 3. Nothing changed: every stage is skipped but the endpoint check; no new version.
        again = run_pipeline(cfg)
        assert [s.outcome for s in again.stages] == ["skipped"] * 6 + ["ran"]
        assert reg.versions("support-bot") == [1] and again.base_url == res.base_url

        # 4. One feedback round: a user rates an answer (with a correction), it is exported and mixed in; the new
        #    data reruns preprocess and what follows (no sweep this time); the app keeps running (same serving
        #    config) and the alias move reaches it.
        client = openai_client(res.base_url)
        answer = ask(client, "support-bot:stable", "My parcel arrived damaged. What now?", max_tokens=8)
        fix = "I am sorry! We will send a replacement at once."
        client.post("/feedback", cast_to=object, body={"id": answer.id, "rating": -1, "correction": fix})
        exported = export_feedback(cfg, 1, str(tmp_path / "feedback.jsonl"), policy=None)
        assert exported.rows == exported.corrected == 1
        nxt = with_values(cfg, {"pipeline.feedback": exported.path, "pipeline.feedback_weight": 2.0,
                                "pipeline.sweep": False})  # fmt: skip
        round2 = run_pipeline(nxt)
        assert [(s.name, s.outcome) for s in round2.stages] == [
            ("preprocess", "ran"),
            ("train", "ran"),
            ("register", "ran"),
            ("promote", "ran"),
            ("deploy", "skipped"),
            ("smoke", "ran"),
        ]
        assert round2.registry_id == "support-bot:v2" and reg.resolve("support-bot:stable").model_id == "support-bot:v2"
        assert round2.stages[-1].outputs["answered_by"] == "support-bot:v2"
        sources = json.loads((tmp_path / "out" / "data" / "stats.json").read_text())["sources"]
        assert [(x["path"], x["rows_in"], x["rows_train_written"] in (0, 2)) for x in sources[1:]] == [
            (exported.path, 1, True)
        ]  # the feedback row: in train twice (weight 2), or held out for validation
    finally:
        serve.shutdown()


def test_register_stage_records_what_publish_records(tmp_path, monkeypatch):
    """One registration rule: the register stage goes through ``register_model``, as ``publish`` does."""
    import aigc.train.publish as publish

    seen = []
    real = publish.register_model
    monkeypatch.setattr(publish, "register_model", lambda *a: seen.append(a) or real(*a))
    cfg = load_config(DEMO, [f"registry_dir={tmp_path / 'reg'}", "model.commit=" + "c" * 40, "pipeline.deploy=false"])
    register = next(s for s in build_stages(cfg, lambda _: "h") if s.name == "register")
    shutil.copytree(ROOT / "assets" / "tiny-base", tmp_path / "model")
    done = {"train": {"model_dir": str(tmp_path / "model"), "metrics": {"eval_loss": 1.5}},
            "preprocess": {"data_hash": "d" * 16}}  # fmt: skip
    assert register.run(done) == {"registry_id": f"{cfg.train.adapter_name}:v1"}
    assert len(seen) == 1
    from aigc.registry import Registry

    entry = Registry(cfg.registry_dir).resolve(f"{cfg.train.adapter_name}:v1")
    assert (entry.base_model, entry.base_model_commit) == (cfg.model.name_or_path, "c" * 40)
    assert (entry.metrics, entry.data_hash, entry.config["sweep"]) == ({"eval_loss": 1.5}, "d" * 16, None)


def test_the_gate_holds_back_a_worse_version_and_promotes_a_better_one(tmp_path, monkeypatch):
    """``pipeline.promote_if``: the gate stage compares the served version with the new one on the eval report;
    a failing version stays registered and unpromoted (the smoke test then asks the served one)."""
    import aigc.batch.evaluate as evaluate
    from aigc.pipeline.checks import check_pipeline
    from aigc.registry import Registry

    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text('{"instruction": "q", "input": "", "output": "a"}\n')
    with pytest.raises(ConfigError, match="evaluates the new version on held-out prompts: set generate.input"):
        check_pipeline(_config("pipeline.promote_if=eval.rouge_l >= previous", tmp_path=tmp_path))
    with pytest.raises(ConfigError, match="needs a judge: set generate.judge.url"):
        check_pipeline(_config("pipeline.promote_if=eval.judge_win_rate > 0.5", f"generate.input={heldout}",
                               tmp_path=tmp_path))  # fmt: skip
    cfg = _config("pipeline.promote_if=eval.rouge_l >= previous", f"generate.input={heldout}", "pipeline.alias=prod",
                  "pipeline.sweep=false", "train.adapter_name=bot", tmp_path=tmp_path)  # fmt: skip
    check_pipeline(cfg)
    stages = {s.name: s for s in build_stages(cfg, hash_data=lambda _: "x")}
    assert (stages["gate"].upstream, stages["promote"].upstream, stages["smoke"].upstream) == (
        "register", "gate", "promote")  # fmt: skip
    scores = {"bot:v1": 0.5, "bot:v2": 0.4, "bot:v3": 0.6}
    evaluated = []

    def fake_eval(c, models):
        evaluated.append(list(models))
        return {"prompts": 1, "reference_model": models[0],
                "models": {m: {"version": m, "rouge_l": scores[m]} for m in models}}  # fmt: skip

    monkeypatch.setattr(evaluate, "run_eval", fake_eval)
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    reg = Registry(cfg.registry_dir)

    def round_(n: int) -> dict:
        (adapter / "adapter_model.safetensors").write_bytes(b"v%d" % n)
        done = {"register": {"registry_id": reg.register("bot", str(adapter), "base").model_id}}
        done["gate"] = stages["gate"].run(done)
        done["promote"] = stages["promote"].run(done)
        return done

    first = round_(1)  # nothing served yet: "previous" passes
    assert (first["gate"]["passed"], first["gate"]["previous_version"], evaluated[-1]) == (True, None, ["bot:v1"])
    assert reg.resolve("bot:prod").model_id == "bot:v1"
    worse = round_(2)
    assert evaluated[-1] == ["bot:v1", "bot:v2"]
    assert (worse["gate"]["passed"], worse["gate"]["new"], worse["gate"]["previous"]) == (False, 0.4, 0.5)
    assert worse["promote"] == {"served_as": "bot:prod", "previous": None, "serving": "bot:v1", "held": True}
    assert reg.resolve("bot:prod").model_id == "bot:v1" and reg.resolve("bot:v2").model_id == "bot:v2"
    better = round_(3)
    assert evaluated[-1] == ["bot:v1", "bot:v3"] and better["gate"]["passed"]
    assert better["promote"]["serving"] == "bot:v3" and reg.resolve("bot:prod").model_id == "bot:v3"
