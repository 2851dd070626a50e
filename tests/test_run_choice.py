"""Which run `aigc train` continues (no Ray: run directories and their records only)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from aigc.config import load_config
from aigc.train.run_choice import DONE_MARKER, RUN_RECORD, choose_run, record_run, run_inputs

STATS = {"fingerprint": "data-v1"}


def _inputs(*overrides: str, stats: dict | None = None) -> dict:
    cfg = load_config("configs/demo.yaml", list(overrides))
    return run_inputs(cfg, stats or STATS)


def _started(parent: Path, name: str, inputs: dict | None, done: bool = False) -> None:
    """A run directory as a killed (or, with ``done``, a finished) run leaves it."""
    run = parent / name
    (run / "checkpoint_000001").mkdir(parents=True)
    if inputs is not None:
        (run / RUN_RECORD).write_text(json.dumps({"inputs": inputs}))
    if done:
        (run / DONE_MARKER).write_text("{}")


def test_an_unchanged_unfinished_run_is_resumed(tmp_path):
    inputs = _inputs()
    _started(tmp_path, "bot", inputs)
    choice = choose_run(str(tmp_path), "bot", inputs)
    assert (choice.name, choice.resumed) == ("bot", True)
    assert choice.message == "resuming run 'bot' from its last checkpoint"


def test_changed_data_starts_a_new_run_and_says_why(tmp_path):
    _started(tmp_path, "bot", _inputs())
    choice = choose_run(str(tmp_path), "bot", _inputs(stats={"fingerprint": "data-v2"}))
    assert (choice.name, choice.resumed) == ("bot-2", False)
    assert choice.message == (
        "new run 'bot-2'; not continuing 'bot', started on other inputs (data 'data-v1' -> 'data-v2'; "
        "train.resume=always continues it anyway)"
    )


@pytest.mark.parametrize(
    ("override", "changed"),
    [("lora.r=16", "lora.r 8 -> 16"), ("train.batch_size=4", "train.batch_size 8 -> 4"),
     ("train.num_workers=1", "train.num_workers 2 -> 1"), ("train.method=full", "lora.alpha 16.0 -> None")],
)  # fmt: skip
def test_what_decides_a_run_is_compared(tmp_path, override, changed):
    base = _inputs()
    _started(tmp_path, "bot", base)
    choice = choose_run(str(tmp_path), "bot", _inputs(override))
    assert choice.name == "bot-2" and not choice.resumed and changed in choice.message, choice.message


def test_logging_and_evaluation_cadence_do_not_decide_a_run(tmp_path):
    _started(tmp_path, "bot", _inputs())
    choice = choose_run(str(tmp_path), "bot", _inputs("train.log_every_steps=1", "train.keep_checkpoints=5"))
    assert (choice.name, choice.resumed) == ("bot", True)


def test_more_epochs_extend_a_run_only_with_a_constant_schedule(tmp_path):
    constant = ("train.lr_scheduler=constant", "train.warmup_steps=2")
    _started(tmp_path, "flat", _inputs("train.epochs=2", *constant))
    _started(tmp_path, "cosine", _inputs("train.epochs=2", "train.lr_scheduler=cosine"))
    flat = choose_run(str(tmp_path), "flat", _inputs("train.epochs=3", *constant))
    assert (flat.name, flat.resumed) == ("flat", True)
    assert flat.message == "resuming run 'flat' and extending it (2 -> 3 epochs; constant schedule)"
    cosine = choose_run(str(tmp_path), "cosine", _inputs("train.epochs=3", "train.lr_scheduler=cosine"))
    assert (cosine.name, cosine.resumed) == ("cosine-2", False)
    assert "train.epochs 2 -> 3" in cosine.message


def test_finished_runs_are_skipped_and_a_matching_unfinished_one_found(tmp_path):
    inputs = _inputs()
    _started(tmp_path, "bot", inputs, done=True)
    _started(tmp_path, "bot-2", _inputs("lora.r=4"))
    _started(tmp_path, "bot-3", inputs)
    choice = choose_run(str(tmp_path), "bot", inputs)
    assert (choice.name, choice.resumed) == ("bot-3", True)


def test_a_run_without_a_record_is_not_continued_in_auto_mode(tmp_path):
    _started(tmp_path, "bot", None)
    choice = choose_run(str(tmp_path), "bot", _inputs())
    assert choice.name == "bot-2" and "no record of the inputs it started on" in choice.message


def test_resume_always_and_never_force_either_way(tmp_path):
    _started(tmp_path, "bot", _inputs())
    forced = choose_run(str(tmp_path), "bot", _inputs(stats={"fingerprint": "data-v2"}), mode="always")
    assert (forced.name, forced.resumed) == ("bot", True)
    assert forced.message.startswith("resuming run 'bot' although it changed (train.resume=always): data")
    fresh = choose_run(str(tmp_path), "bot", _inputs(), mode="never")
    assert (fresh.name, fresh.resumed) == ("bot-2", False) and "train.resume=never" in fresh.message


def test_the_record_is_written_where_the_run_will_be(tmp_path):
    inputs = _inputs()
    choice = choose_run(str(tmp_path), "bot", inputs)
    record_run(str(tmp_path), choice)
    assert json.loads((tmp_path / "bot" / RUN_RECORD).read_text())["inputs"] == inputs
    assert choose_run(str(tmp_path), "bot", inputs).resumed
