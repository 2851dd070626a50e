"""The training loop's step-level behaviour on the shared local cluster: mid-epoch resume, the last accumulation
group of an epoch, early stopping and a diverging loss."""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import prepare_demo_data

from aigc.config import load_config
from aigc.data.preprocess import dataset_rows, read_stats
from aigc.errors import TrainingError
from aigc.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "assets" / "tiny-base")


@pytest.fixture(scope="module")
def data(ray_cluster, tmp_path_factory):
    """120 demo rows preprocessed once; returns (overrides, train rows)."""
    cfg, overrides = prepare_demo_data(tmp_path_factory.mktemp("loop"), 120, 3, "train.lr=3e-3",
                                       "tracking.mlflow=false", "tracking.tensorboard=false")  # fmt: skip
    return overrides, dataset_rows(read_stats(cfg.output_dir), "train")


def _cfg(data, name: str, *extra: str):
    return load_config(ROOT / "configs" / "demo.yaml", [*data[0], f"train.adapter_name={name}", *extra])


_FAULT_RUN = ("train.epochs=2", "train.num_workers=2", "train.grad_accum=2", "train.checkpoint_every_steps=2",
              "train.keep_checkpoints=1", "train.max_failures=1")  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(data):
    """The run both fault tests compare with: 2 epochs, checkpoints every 2 steps, nothing killed; a batch size
    that leaves an odd number of micro-batches per worker and epoch. Returns (its overrides, that batch size,
    its result)."""
    from aigc.train.trainer import run_training

    rows = data[1]
    bs = next(b for b in (4, 5, 6, 7, 3) if math.ceil(rows // 2 / b) % 2 == 1)
    common = (*_FAULT_RUN, f"train.batch_size={bs}")
    return common, bs, run_training(_cfg(data, "straight", *common))


def test_a_run_killed_mid_epoch_resumes_with_the_next_batch_and_the_same_losses(data, uninterrupted, monkeypatch):
    """Fault after step 5 of 2 epochs; checkpoints every 2 steps; the restart continues from step 4's checkpoint.

    With the last accumulation group of each epoch as a step of its own (an odd number of micro-batches with
    grad_accum 2), the step count is exact; on CPU with a seed the resumed run's losses equal the uninterrupted
    run's, step for step, and so does its final eval loss. The uninterrupted run reads its data cached in the
    object store (``train.cache_data`` auto), the resumed one streams it from the shards: same batches either way.
    """
    from aigc.train.context import FAULT_ENV
    from aigc.train.trainer import run_training

    rows = data[1]
    common, bs, straight = uninterrupted
    monkeypatch.setenv(FAULT_ENV, "5")  # the driver's RayTrainContext carries it to the workers
    resumed = run_training(_cfg(data, "resumed", *common, "train.cache_data=false"))

    steps_per_epoch = math.ceil(math.ceil(rows // 2 / bs) / 2)
    assert straight.metrics["step"] == resumed.metrics["step"] == 2 * steps_per_epoch
    assert len(resumed.step_losses) == 2 * steps_per_epoch
    assert resumed.step_losses == straight.step_losses  # bit-for-bit: same batches, same RNG, same order
    assert resumed.metrics["eval_loss"] == straight.metrics["eval_loss"]
    # reports: every 2 steps and at each epoch end, the last one at the final step
    assert [h["step"] for h in resumed.history] == [h["step"] for h in straight.history]
    assert resumed.history[-1]["epoch"] == 2 and resumed.history[0]["step"] == 2


def test_early_stopping_ends_the_run_on_a_plateau_and_publishes_it(data):
    from aigc.train.trainer import run_training

    cfg = _cfg(data, "early", "train.epochs=3", "train.num_workers=1", "train.batch_size=8", "train.eval_every_steps=1",
               "train.early_stopping_patience=2", "train.early_stopping_min_delta=100")  # fmt: skip
    res = run_training(cfg)
    assert [h["step"] for h in res.history] == [1, 2, 3]  # eval 1 sets the best; 2 and 3 do not beat it by 100
    assert [h["stopped_early"] for h in res.history] == [False, False, True]
    assert res.metrics["step"] == 3 and res.registry_id


def test_a_nan_loss_stops_the_run_naming_the_step_and_registers_nothing(data):
    from aigc.train.trainer import run_training

    cfg = _cfg(data, "diverge", "train.epochs=2", "train.num_workers=1", "train.batch_size=8", "train.lr=1e6",
               "train.lr_scheduler=constant", "train.warmup_steps=0", "train.max_grad_norm=1e9",
               "train.checkpoint_every_steps=1")  # fmt: skip
    with pytest.raises(TrainingError, match=r"loss became NaN or infinite at step (\d+).*Nothing was registered") as e:
        run_training(cfg)
    step = int(re.search(r"at step (\d+)", str(e.value)).group(1))
    assert step >= 2, "the first steps should still be finite (a checkpoint must exist before the divergence)"
    last_good = re.search(r"the last good checkpoint stays in (\S+?)\. Lower", str(e.value)).group(1)
    state = json.loads((Path(last_good) / "history.json").read_text())
    assert state[-1]["step"] == step - 1 and math.isfinite(state[-1]["train_loss"])
    assert Registry(cfg.registry_dir).versions("diverge") == []
    assert not (Path(cfg.output_dir) / "ray" / "diverge" / "aigc_done.json").exists()


def test_a_tracked_run_writes_mlflow_and_tensorboard_with_generation_metrics(data):
    """Rank 0 logs params, per-step train loss, eval metrics with exact match and ROUGE-L, the plot and adapter."""
    from mlflow.tracking import MlflowClient

    from aigc.train.trainer import run_training

    cfg = _cfg(data, "tracked", "train.epochs=1", "train.num_workers=2", "train.batch_size=8",
               "tracking.mlflow=true", "tracking.tensorboard=true", "train.eval_generation_samples=6",
               "train.eval_max_new_tokens=16", "train.log_every_steps=2")  # fmt: skip
    res = run_training(cfg)
    assert 0.0 <= res.metrics["eval_exact_match"] <= 1.0 and 0.0 <= res.metrics["eval_rouge_l"] <= 1.0
    assert res.metrics["eval_rouge_l"] > 0.0  # the tiny model answers in the support domain after one epoch

    out = Path(cfg.output_dir)
    client = MlflowClient(tracking_uri=f"file:{out / 'mlruns'}")
    (run,) = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert run.info.status == "FINISHED" and run.data.params["train.batch_size"] == "8"
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in losses] == list(range(1, res.metrics["step"] + 1))
    assert [m.value for m in losses] == pytest.approx(res.step_losses)
    assert client.get_metric_history(run.info.run_id, "eval_rouge_l")[-1].value == pytest.approx(
        res.metrics["eval_rouge_l"]
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss.png", "adapter"} <= artifacts
    events = list((out / "tensorboard" / "tracked").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_a_sigkilled_rank0_worker_resumes_to_the_same_final_step_and_loss(data, uninterrupted, monkeypatch, tmp_path):
    """Rank 0's process SIGKILLs itself after step 5 of 2 epochs (``AIGC_KILL_AT_STEP``: no exception, no
    clean-up); checkpoints every 2 steps, one restart allowed. Ray Train replaces the worker group and the run
    resumes from step 4's checkpoint to the uninterrupted run's final step.

    Measured on CPU (2 workers, gloo, seeded): the final train loss, the final eval loss and every
    step's loss equal the uninterrupted run's exactly (difference 0.0), so the test asserts equality, as the
    fault test above does; on hardware with non-deterministic kernels compare within a tolerance instead. The
    worker writes a marker (its pid and step) just before the kill, and that pid is gone afterwards.
    """
    from aigc.train.context import FAULT_MARKER_ENV, KILL_ENV
    from aigc.train.trainer import run_training

    rows = data[1]
    common, bs, straight = uninterrupted  # its data cached in the object store; this run streams it: same batches
    marker = tmp_path / "killed.json"
    monkeypatch.setenv(KILL_ENV, "5")  # the driver's RayTrainContext carries both to the workers
    monkeypatch.setenv(FAULT_MARKER_ENV, str(marker))
    killed = run_training(_cfg(data, "killed", *common, "train.cache_data=false"))

    kill = json.loads(marker.read_text())
    assert kill["step"] == 5
    assert _gone(kill["pid"]), "the worker process should have died"
    steps = 2 * math.ceil(math.ceil(rows // 2 / bs) / 2)
    assert straight.metrics["step"] == killed.metrics["step"] == steps
    assert killed.history[-1]["epoch"] == 2
    assert len(killed.step_losses) == steps
    diffs = [abs(a - b) for a, b in zip(killed.step_losses, straight.step_losses, strict=True)]
    print(f"\nkilled vs uninterrupted: final loss {killed.step_losses[-1]!r} vs {straight.step_losses[-1]!r}, "
          f"eval loss {killed.metrics['eval_loss']!r} vs {straight.metrics['eval_loss']!r}, "
          f"largest step-loss difference {max(diffs)!r}")  # fmt: skip
    assert killed.step_losses[-1] == straight.step_losses[-1]  # bit-for-bit on CPU (see above)
    assert killed.metrics["eval_loss"] == straight.metrics["eval_loss"]
    assert killed.step_losses == straight.step_losses


def _gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie not yet reaped by its parent, the raylet, counts as ended)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "Z"


_AFTER_STEPS = """
import sys
from aigc.train.context import RayTrainContext
ctx = RayTrainContext()
ctx.world_rank = lambda: int(sys.argv[1])
ctx.after_step(4, resumed=False)
ctx.after_step(5, resumed=True)
print("alive", flush=True)
ctx.after_step(5, resumed=False)
print("still alive", flush=True)
"""


@pytest.mark.parametrize("rank", [0, 1])
def test_the_kill_injection_kills_only_rank_0_of_a_first_attempt(tmp_path, monkeypatch, rank):
    """``AIGC_KILL_AT_STEP=5`` in a plain process (no Ray): other steps and a resumed attempt go on; at step 5 of a
    first attempt rank 0 writes the marker and dies by SIGKILL, any other rank goes on."""
    from aigc.train.context import FAULT_MARKER_ENV, KILL_ENV, RayTrainContext

    marker = tmp_path / "killed.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform"), KILL_ENV: "5", FAULT_MARKER_ENV: str(marker)}
    proc = subprocess.Popen([sys.executable, "-c", _AFTER_STEPS, str(rank)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    out, err = proc.communicate(timeout=120)
    if rank == 0:
        assert proc.returncode == -signal.SIGKILL and out.splitlines() == ["alive"], err
        assert json.loads(marker.read_text()) == {"pid": proc.pid, "step": 5}
    else:
        assert proc.returncode == 0 and out.splitlines() == ["alive", "still alive"], err
        assert not marker.exists()
    monkeypatch.setenv(KILL_ENV, "five")
    with pytest.raises(ValueError, match="AIGC_KILL_AT_STEP='five': set it to the optimizer step"):
        RayTrainContext()


def test_the_hold_injection_stops_rank_0_until_released(tmp_path, monkeypatch):
    """``AIGC_HOLD_AT_STEP=5`` in a plain process: rank 0 of a first attempt writes the marker after step 5 and
    waits there until the release file exists, then goes on; without a release file named, it is refused."""
    from aigc.train.context import FAULT_MARKER_ENV, HOLD_ENV, HOLD_RELEASE_ENV, RayTrainContext

    marker, release = tmp_path / "held.json", tmp_path / "release"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "platform"), HOLD_ENV: "5", HOLD_RELEASE_ENV: str(release),
           FAULT_MARKER_ENV: str(marker)}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", _AFTER_STEPS, "0"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert json.loads(marker.read_text()) == {"pid": proc.pid, "step": 5}
        time.sleep(1.0)
        assert proc.poll() is None  # still held: the release file does not exist yet
        release.touch()
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.splitlines() == ["alive", "still alive"], err
    monkeypatch.delenv(HOLD_RELEASE_ENV, raising=False)
    monkeypatch.setenv(HOLD_ENV, "5")
    with pytest.raises(ValueError, match="AIGC_HOLD_AT_STEP is set: set AIGC_HOLD_RELEASE to the file"):
        RayTrainContext()
