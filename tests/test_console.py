"""The console a person watches: stage lines, the training progress events, the sweep's line (no Ray cluster)."""

from __future__ import annotations

import io
import pickle
from types import SimpleNamespace

import pytest

from aigc.console import StageLine, verbose
from aigc.train.progress import StepProgress
from aigc.tune.progress import SweepProgress


@pytest.mark.parametrize(("value", "expected"), [("1", True), ("true", True), ("", False), ("0", False)])
def test_verbose_reads_the_environment(monkeypatch, value, expected):
    monkeypatch.setenv("AIGC_VERBOSE", value)
    assert verbose() is expected


def test_plain_stage_line_prints_at_quarters_and_keeps_logged_lines(capsys):
    """Not a terminal: 100 updates print 4 lines (25/50/75/100%), plus the lines logged on purpose."""
    with StageLine("train", live=False) as line:
        for step in range(1, 101):
            line.update(done=step, total=100, text=f"step {step}/100")
            if step == 60:
                line.log("early stop at step 60")
    assert capsys.readouterr().out.splitlines() == [
        "[train] step 25/100",
        "[train] step 50/100",
        "[train] early stop at step 60",
        "[train] step 75/100",
        "[train] step 100/100",
    ]


def test_plain_stage_line_skips_an_update_a_log_line_just_said(capsys):
    line = StageLine("sweep", total=2, live=False)
    line.update(done=1, text="trial 1/2 ended", plain=False)
    line.update(done=1, text="trial 2/2 epoch 1")  # the 50% mark was spent by the update before: no line
    line.update(done=2, text="2 done")
    assert capsys.readouterr().out.splitlines() == ["[sweep] 2 done"]


def test_live_stage_line_draws_a_bar_and_keeps_logged_lines():
    """On a terminal the bar holds the latest text and the step count; a logged line stays above it."""
    from rich.console import Console

    screen = io.StringIO()
    with StageLine("train", live=True, console=Console(file=screen, force_terminal=True, width=150)) as line:
        line.update(done=3, total=10, text="step 3/10  loss 0.5000")
        line.log("early stop at step 3")
        task = line._bar.tasks[0]
        assert (task.completed, task.total, task.description) == (3, 10, "step 3/10  loss 0.5000")
    drawn = screen.getvalue()
    assert "[train] early stop at step 3" in drawn and "3/10" in drawn and "step 3/10  loss 0.5000" in drawn


def test_step_progress_sends_events_to_its_sink_and_prints_nothing(capsys):
    """Rank 0 hands its lines to the driver's queue (here a list); the worker's own output stays empty."""
    events = []
    p = StepProgress(total_steps=4, epochs=2, every=2, start_step=0, enabled=True, sink=events.append)
    for step in range(1, 5):
        p.step(step, epoch=(step - 1) // 2, loss=1.0 / step, lr=1e-4, tokens=100)
    p.note("[train] early stop at step 4")
    assert capsys.readouterr().out == ""
    assert [(e["step"], e["total"]) for e in events[:2]] == [(2, 4), (4, 4)]
    assert events[0]["line"].startswith("[train] step 2/4 (epoch 1/2)  loss 0.5000")
    assert events[2] == {"note": "[train] early stop at step 4"}
    other_rank = StepProgress(total_steps=4, epochs=2, every=2, start_step=0, enabled=False, sink=events.append)
    other_rank.step(2, epoch=0, loss=1.0, lr=1e-4, tokens=100)
    other_rank.note("not rank 0")
    assert len(events) == 3


def _trial(n: int, status: str, epoch: float | None = None, loss: float | None = None) -> SimpleNamespace:
    last = {"epoch": epoch, "eval_loss": loss} if epoch is not None else None
    return SimpleNamespace(trial_id=f"sweep_{n:05d}", status=status, config={"train.lr": 0.004}, last_result=last,
                           path=f"/runs/sweep/trial_{n}")  # fmt: skip


def test_sweep_progress_keeps_one_line_per_finished_trial(capsys):
    """Not a terminal: trial starts and results only move the line; each finished trial leaves one line."""
    progress = SweepProgress("eval_loss", 2, StageLine("sweep", total=2, live=False))
    a, b = _trial(0, "RUNNING"), _trial(1, "PENDING")
    progress.on_trial_start(0, [a, b], a)
    progress.on_trial_result(0, [a, b], a, {"epoch": 0.5, "eval_loss": 0.2})
    a.status, a.last_result = "TERMINATED", {"epoch": 1, "eval_loss": 0.1}
    progress.on_trial_complete(0, [a, b], a)
    b.status = "ERROR"
    progress.on_trial_error(0, [a, b], b)
    assert capsys.readouterr().out.splitlines() == [
        "[sweep] trial 1/2 ended after 1 epoch(s): eval_loss 0.1000 (train.lr=0.004)",
        "[sweep] trial 2/2 FAILED; see /runs/sweep/trial_1 (0 running, 2 done)",
    ]


def test_sweep_progress_pickles_without_its_live_bar():
    """Tune pickles its callbacks with the experiment: the live bar stays behind, a plain line takes over."""
    with StageLine("sweep", total=4, live=True) as line:
        restored = pickle.loads(pickle.dumps(SweepProgress("eval_loss", 4, line)))
    assert restored._line is not line and restored._line.live is False and restored.num_samples == 4


def test_ray_data_stays_quiet_after_it_rebuilds_its_loggers():
    """Ray Data rebuilds its loggers whenever a dataset's context reaches the driver (mid-run): its INFO lines
    must stay off the console after that too, its warnings must not."""
    import subprocess
    import sys

    script = (
        "import logging\n"
        "from aigc.cluster import quiet_console\n"
        "from ray.data._internal.logging import update_dataset_logger_for_worker\n"
        "quiet_console()\n"
        "update_dataset_logger_for_worker('dataset_1')\n"
        "log = logging.getLogger('ray.data._internal.execution.streaming_executor')\n"
        "log.info('Starting execution of Dataset dataset_1')\n"
        "log.info('Progress bars disabled. To enable, set DataContext.enable_progress_bars = True.')\n"
        "log.warning('a warning the user must see')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True)
    console = done.stdout + done.stderr
    assert "a warning the user must see" in console
    assert "Starting execution" not in console and "Progress bars disabled" not in console, console
