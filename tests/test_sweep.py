"""Ray Tune sweeps on the shared local cluster with the tiny base model: early stopping, the best adapter and
its config file, and a sweep continued after its driver died."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import ray.tune
import yaml
from helpers import prepare_demo_data

from aigc.config import load_config
from aigc.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")


@pytest.fixture(scope="module")
def prepared(ray_cluster, tmp_path_factory):
    """200 demo rows, preprocessed once; a config for 2-epoch, 1-worker trials, one at a time."""
    tmp = tmp_path_factory.mktemp("sweep")
    _, overrides = prepare_demo_data(tmp, 200, 7, "train.epochs=2", "tune.epochs=2", "train.batch_size=16",
                                     "train.adapter_name=bot", "tune.max_concurrent_trials=1")  # fmt: skip
    return tmp, overrides


def _space(tmp: Path, name: str, entries: dict) -> str:
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(entries))
    return str(path)


@pytest.fixture(scope="module")
def asha_sweep(prepared):
    """Grid over a useful and a useless learning rate, the useful one first: ASHA stops the other at epoch 1."""
    from aigc.tune.sweep import run_sweep

    tmp, overrides = prepared
    space = _space(tmp, "lr", {"train.lr": {"grid": [4e-3, 1e-6]}})
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*overrides, f"tune.space={space}", "tune.search=grid",
                                                        "tune.num_samples=2", "tune.name=asha"])  # fmt: skip
    return cfg, run_sweep(cfg)


def test_asha_stops_the_useless_trial_and_registers_the_best(asha_sweep):
    from aigc.tune.search import REPORTED_METRICS

    cfg, res = asha_sweep
    t = res.trials
    assert list(t["train.lr"]) == [4e-3, 1e-6] and list(t["best"]) == [True, False]
    assert list(t["status"]) == ["done", "stopped early"] and list(t["epoch"]) == [2, 1]
    assert t.loc[0, "eval_loss"] < 0.9 * t.loc[1, "eval_loss"]
    # the generation metrics (train.eval_generation_samples in the demo config) are columns of the table
    assert t.loc[0, "eval_exact_match"] >= t.loc[1, "eval_exact_match"] and "eval_rouge_l" in t.columns
    assert res.best_overrides == {"train.lr": 4e-3}
    assert res.best_metrics["eval_loss"] == pytest.approx(t.loc[0, "eval_loss"])

    entry = Registry(cfg.registry_dir).resolve(res.registry_id)
    assert entry.config["sweep"]["id"] == res.sweep_id and entry.config["sweep"]["values"] == {"train.lr": 4e-3}
    assert entry.config["train"]["lr"] == 4e-3 and entry.config["train"]["num_workers"] == 1
    assert (Path(res.adapter_dir) / "adapter_model.safetensors").is_file()
    sweep_dir = Path(cfg.output_dir) / "sweep"
    assert len((sweep_dir / "trials.csv").read_text().splitlines()) == 3
    assert all(Path(p).stat().st_size > 5000 for p in res.plots)
    # every metric tune.metric may name is one the loop really reports
    first = json.loads(next((sweep_dir / "asha").glob("*/result.json")).read_text().splitlines()[0])
    assert set(REPORTED_METRICS) <= set(first), set(REPORTED_METRICS) - set(first)


def test_best_config_file_reproduces_the_best_trial(asha_sweep):
    """`aigc train --config sweep/best_config.yaml` trains the best trial again: same eval loss within 3%."""
    from aigc.train.trainer import run_training

    cfg, res = asha_sweep
    best = load_config(res.best_config_path)
    assert best.train.lr == 4e-3 and best.train.num_workers == 1 and best.train.epochs == cfg.tune.epochs
    again = run_training(best, register=False)
    assert again.metrics["eval_loss"] == pytest.approx(res.best_metrics["eval_loss"], rel=0.03)


def test_sweep_is_a_parent_mlflow_run_with_one_child_run_per_trial(asha_sweep):
    """tracking.mlflow (on in the demo config): the local file store under output_dir/mlruns."""
    import os

    from mlflow.tracking import MlflowClient

    cfg, res = asha_sweep
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    client = MlflowClient(tracking_uri="file:" + str(Path(cfg.output_dir) / "mlruns"))
    experiment = client.get_experiment_by_name("bot")  # train.adapter_name
    [parent] = client.search_runs([experiment.experiment_id], "tags.`aigc.run_name` = 'sweep=asha'")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.train.lr"] == "grid [0.004, 1e-06]" and parent.data.params["tune.search"] == "grid"
    assert (
        parent.data.tags["best.train.lr"] == "0.004" and parent.data.tags["best.trial_id"] == res.trials.loc[0, "trial"]
    )
    assert parent.data.metrics["best_eval_loss"] == pytest.approx(res.trials.loc[0, "eval_loss"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert artifacts == {"trials.csv", "curves.png", "params.png", "best_config.yaml"}

    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(c.data.tags["aigc.run_name"] for c in children) == sorted(
        f"trial_id={t}" for t in res.trials["trial"]
    )
    for child in children:  # each child is a trial's training run: its lr and its eval losses
        assert float(child.data.params["train.lr"]) in (4e-3, 1e-6) and "eval_loss" in child.data.metrics


class _DieAfterFirstTrial(ray.tune.Callback):
    """Kills the sweep's driver loop when the second trial starts (once per test session)."""

    fired = False

    def on_trial_start(self, iteration, trials, trial, **info):
        if not _DieAfterFirstTrial.fired and any(t.status == "TERMINATED" for t in trials):
            _DieAfterFirstTrial.fired = True
            raise KeyboardInterrupt


def test_rerun_continues_an_interrupted_sweep_without_rerunning_finished_trials(prepared, monkeypatch):
    import gc

    from aigc.data.preprocess import read_stats
    from aigc.tune.search import check_sweep, trial_base
    from aigc.tune.sweep import choose_sweep, run_sweep

    tmp, overrides = prepared
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "0")  # save the experiment state at every step
    space = _space(tmp, "r", {"lora.r": {"grid": [4, 8]}})
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*overrides, f"tune.space={space}", "tune.search=grid",
                                                        "tune.scheduler=none", "tune.epochs=1", "tune.name=resume",
                                                        "tune.num_samples=2"])  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        run_sweep(cfg, register=False, callbacks=[_DieAfterFirstTrial()])
    gc.collect()  # the interrupted controller's trial actors go with it
    exp = Path(cfg.output_dir) / "sweep" / "resume"
    finished = [d for d in exp.iterdir() if (d / "result.json").is_file() and (d / "result.json").stat().st_size > 0]
    assert len(finished) >= 1
    before = {d.name: (d / "result.json").read_text() for d in finished}

    res = run_sweep(cfg, register=False)
    assert sorted(res.trials["lora.r"]) == [4, 8] and set(res.trials["status"]) == {"done"}
    for name, text in before.items():  # a finished trial was not trained again
        assert (exp / name / "result.json").read_text() == text
    again = choose_sweep(trial_base(cfg), check_sweep(cfg), read_stats(cfg.output_dir))
    assert (again.name, again.resumed) == ("resume-2", False)  # the finished sweep is kept; the next one is new


def test_pbt_trial_continues_a_better_trials_checkpoint_with_its_own_perturbed_lr(prepared):
    """Two trials side by side, perturbed every epoch: the worse one takes the better one's checkpoint, and the
    lr it then trains with (constant schedule: the reported lr) is its own perturbed one, not the donor's."""
    from aigc.tune.sweep import run_sweep

    tmp, overrides = prepared
    space = _space(tmp, "pbt", {"train.lr": {"loguniform": [1e-6, 1e-2]}})
    cfg = load_config(ROOT / "configs" / "demo.yaml", [*overrides, f"tune.space={space}", "tune.scheduler=pbt",
                                                        "tune.num_samples=2", "tune.seed=4", "tune.name=pbt",
                                                        "tune.max_concurrent_trials=2", "tune.epochs=3",
                                                        "tune.eval_every_steps=null", "train.lr_scheduler=constant",
                                                        "train.warmup_steps=0",
                                                        "train.eval_generation_samples=0"])  # fmt: skip
    res = run_sweep(cfg)

    # Tune's PBT log: one line per exploit, [trial, donor, iterations, donor config, new config]
    policy = [json.loads(line) for line in (Path(cfg.output_dir) / "sweep" / "pbt" / "pbt_global.txt").open()]
    assert policy, "no trial exploited another"
    *_, donor_config, new_config = policy[-1]
    donor_lr, new_lr = donor_config["train.lr"], new_config["train.lr"]
    assert new_lr != pytest.approx(donor_lr)  # perturbed (x0.8, x1.2 or resampled)

    exp = Path(cfg.output_dir) / "sweep" / "pbt"
    params = {d: json.loads((d / "params.json").read_text()) for d in exp.iterdir() if (d / "params.json").is_file()}
    [recipient] = [d for d, values in params.items() if values["train.lr"] == pytest.approx(new_lr)]  # its last config
    # every report of the trial: progress.csv (its result.json kept only the reports after the restart)
    reported = list(pd.read_csv(recipient / "progress.csv")["lr"])
    assert reported[-1] == pytest.approx(new_lr) and reported[0] != pytest.approx(new_lr), reported  # lr changed
    # its last checkpoint's history begins with the donor's reports (the donor's lr), then its own new lr
    last = max(recipient.glob("checkpoint_*"))
    history = json.loads((last / "history.json").read_text())
    lrs = [h["lr"] for h in history]
    first_new = next(i for i, v in enumerate(lrs) if v == pytest.approx(new_lr))
    assert first_new >= 1 and lrs[first_new - 1] == pytest.approx(donor_lr), lrs
    assert all(v == pytest.approx(new_lr) for v in lrs[first_new:]), lrs
    assert [h["epoch"] for h in history] == [1, 2, 3]

    assert len(res.trials) == 2 and res.registry_id is not None
    entry = Registry(cfg.registry_dir).resolve(res.registry_id)
    assert entry.config["sweep"]["id"] == res.sweep_id


@pytest.mark.slow
def test_a_sigkilled_sweep_driver_is_continued_by_the_same_command(prepared):
    """`aigc sweep` SIGKILLed (its whole process group: the driver and the embedded cluster it started, as when
    its machine goes) once the first trial finished, its experiment state torn as a kill mid-write leaves it; the
    same command again finishes the sweep without training that trial again, and the best is the better of the
    two."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import tempfile
    import time

    from cluster import stop_processes

    tmp, overrides = prepared
    space = _space(tmp, "killed", {"lora.r": {"grid": [4, 8]}})
    cmd = [sys.executable, "-m", "aigc.cli", "sweep", "--config", str(ROOT / "configs" / "demo.yaml"), *overrides,
           f"tune.space={space}", "tune.search=grid", "tune.scheduler=none", "tune.epochs=1", "tune.name=killed",
           "tune.num_samples=2"]  # fmt: skip
    ray_tmp = tempfile.mkdtemp(prefix="rayk-", dir="/tmp")  # short: Ray's socket paths stay under 108 characters
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_TMPDIR": ray_tmp, "TUNE_GLOBAL_CHECKPOINT_S": "0",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "platform"), str(ROOT / "tests")])}  # fmt: skip
    exp = Path(load_config(ROOT / "configs" / "demo.yaml", overrides).output_dir) / "sweep" / "killed"

    def trials() -> list[Path]:
        return sorted(d for d in exp.iterdir() if d.is_dir() and d.name.startswith("run_trial")) if exp.is_dir() else []

    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 600
        while len(trials()) < 2 and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)  # one trial at a time: the second starts once the first finished
        assert driver.poll() is None and len(trials()) == 2, "the sweep never reached its second trial"
        time.sleep(2)
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        stop_processes(re.compile(re.escape(ray_tmp)))  # what the killed driver's embedded cluster left running
    first = trials()[0]
    before = (first / "result.json").read_text()
    assert before.strip(), "the first trial had not reported before the kill"
    # The worst moment for the kill: Ray Tune rewrites its experiment state in place, so a kill mid-write leaves
    # it torn (seen in CI). Tear it for real: the re-run must continue from the last good copy.
    states = sorted(exp.glob("experiment_state-*.json"))
    assert states and all(Path(f"{s}.good").is_file() for s in states), sorted(p.name for p in exp.iterdir())
    for state in states:
        state.write_text(state.read_text()[:40])

    again = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    stop_processes(re.compile(re.escape(ray_tmp)))
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "[sweep] resuming run 'killed' from its last checkpoint" in again.stdout, again.stdout
    assert "was torn by the kill: continuing from its last good copy" in again.stdout, again.stdout
    assert (first / "result.json").read_text() == before  # the finished trial was not trained again
    table = pd.read_csv(exp.parent / "trials.csv")
    assert sorted(table["lora.r"]) == [4, 8] and set(table["status"]) == {"done"}
    best = yaml.safe_load((exp.parent / "best_config.yaml").read_text())
    assert best["lora"]["r"] == int(table.sort_values("eval_loss").iloc[0]["lora.r"])


def test_a_torn_tune_state_file_is_put_back_from_its_last_good_copy(tmp_path):
    from aigc.tune.state_guard import StateGuard, repair_state

    exp = tmp_path / "sweep" / "run"
    exp.mkdir(parents=True)
    state, searcher = exp / "experiment_state-2026-12-06.json", exp / "basic-variant-state-2026-12-06.json"
    state.write_text('{"trial_data": [1, 2]}')
    searcher.write_text('{"n": 1}')
    guard = StateGuard(str(exp))
    guard.copy_good()
    state.write_text('{"trial_data": [1, 2, 3]}')
    guard.copy_good()  # the newer state is the good copy now
    state.write_text('{"trial_da')  # torn by a kill mid-write: not copied over the good one
    guard.copy_good()
    assert Path(f"{state}.good").read_text() == '{"trial_data": [1, 2, 3]}'
    assert repair_state(str(exp)) == [state.name]
    assert state.read_text() == '{"trial_data": [1, 2, 3]}' and searcher.read_text() == '{"n": 1}'
    assert repair_state(str(exp)) == []  # nothing torn: nothing touched
    orphan = exp / "experiment_state-other.json"
    orphan.write_text("")  # torn, never copied: left for Tune to report
    assert repair_state(str(exp)) == [] and orphan.read_text() == ""
