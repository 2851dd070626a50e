"""Which run ``aigc train`` continues: a run resumes only when what decides it is unchanged.

Every run directory ``<output_dir>/ray/<name>/`` gets ``aigc_run.json`` before its first step: the inputs that
decide the run (the data's fingerprint from ``stats.json``, the base model and its commit, the method and LoRA
settings, the effective batch and the optimisation settings, the epoch budget). Re-running ``aigc train``
walks ``NAME``, ``NAME-2``, ``NAME-3``, ... and takes the first of:

- an unfinished run whose record matches: it is resumed from its last checkpoint;
- an unfinished run whose record differs only in ``train.epochs``, where the schedule does not depend on the
  epoch budget (``lr_scheduler: constant`` with a fixed or no warmup): it is resumed and extended;
- a name with no run yet: a new run starts there, and one line says why an unfinished run was not continued.

A finished run (``aigc_done.json``) is never touched. ``train.resume`` forces either way: ``always`` continues
the first unfinished run whatever changed (and says what), ``never`` always starts a new run.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

from aigc import storage
from aigc.config import PlatformConfig

__all__ = ["DONE_MARKER", "RUN_RECORD", "RunChoice", "choose_run", "record_run", "run_inputs"]

DONE_MARKER = "aigc_done.json"  # written into a finished run's directory
RUN_RECORD = "aigc_run.json"  # what a run was started on

# The train settings that change what a step does; logging, evaluation and checkpoint cadence do not.
_DECIDING_TRAIN = (
    "method", "strategy", "mixed_precision", "num_workers", "batch_size", "grad_accum", "lr", "lr_scheduler",
    "weight_decay", "warmup_ratio", "warmup_steps", "max_grad_norm", "seed", "gradient_checkpointing",
)  # fmt: skip


@dataclass(frozen=True)
class RunChoice:
    """The run directory to use: ``name``, whether it continues a checkpointed run, the line to print, and the
    inputs to record there (:func:`record_run`)."""

    name: str
    resumed: bool
    message: str
    inputs: dict[str, Any]


def run_inputs(cfg: PlatformConfig, stats: dict[str, Any]) -> dict[str, Any]:
    """What decides a training run, as JSON: two runs with equal inputs train the same steps on the same data."""
    model = cfg.model
    return {
        "data": stats.get("fingerprint"),
        "model": {"name_or_path": model.name_or_path, "commit": model.commit, "dtype": model.dtype},
        "lora": None if cfg.train.method == "full" else cfg.lora.model_dump(mode="json"),
        "train": {key: getattr(cfg.train, key) for key in _DECIDING_TRAIN}
        | {"epochs": cfg.train.epochs}
        # DPO/ORPO settings decide the run too (absent for SFT, so earlier SFT runs keep resuming)
        | ({"preference": cfg.train.preference.model_dump(mode="json")} if cfg.train.preference.method else {}),
    }


def _changes(old: dict[str, Any], new: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """``{"train.lr": (0.001, 0.002), ...}``: every input that changed, by its dotted key."""

    def flat(value: Any, prefix: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return {k: v for key, item in value.items() for k, v in flat(item, f"{prefix}.{key}".lstrip(".")).items()}
        return {prefix: value}

    before, after = flat(old, ""), flat(new, "")
    return {key: (before.get(key), after.get(key)) for key in sorted(before.keys() | after.keys())
            if before.get(key) != after.get(key)}  # fmt: skip


def _epoch_free(train: dict[str, Any]) -> bool:
    """The learning rate at a step does not depend on the epoch budget: a constant schedule, a fixed warmup."""
    fixed_warmup = train.get("warmup_steps") is not None or train.get("warmup_ratio") == 0
    return train.get("lr_scheduler") == "constant" and fixed_warmup


def choose_run(parent: str, base: str, inputs: dict[str, Any], mode: str = "auto") -> RunChoice:
    """The run under ``parent`` to continue, or the name of a new one (see the module docstring).

    Args:
        parent: the directory holding the runs (``<output_dir>/ray``).
        base: ``train.run_name`` or the adapter name.
        inputs: :func:`run_inputs` of this invocation.
        mode: ``train.resume``: ``auto``, ``always`` or ``never``.
    """
    inputs = json.loads(json.dumps(inputs, default=str))  # as a record reads back: lists, not tuples
    skipped: list[str] = []
    n = 1
    while True:
        name = base if n == 1 else f"{base}-{n}"
        run = storage.join(parent, name)
        n += 1
        if storage.is_file(storage.join(run, DONE_MARKER)):
            continue
        if not storage.exists(run):
            why = f"; not continuing {skipped[0]}" if skipped else ""
            return RunChoice(name, False, f"new run {name!r}{why}", inputs)
        record_path = storage.join(run, RUN_RECORD)
        old = storage.read_json(record_path).get("inputs") if storage.is_file(record_path) else None
        if old is None:  # a run from before records were kept: what it trained on is unknown
            changes, changed = {}, ["no record of the inputs it started on"]
        else:
            changes = _changes(old, inputs)
            changed = [f"{key} {before!r} -> {after!r}" for key, (before, after) in changes.items()]
        if mode == "never":
            skipped.append(f"{name!r} (train.resume=never)")
        elif not changed:
            return RunChoice(name, True, f"resuming run {name!r} from its last checkpoint", inputs)
        elif set(changes) == {"train.epochs"} and _epoch_free(inputs.get("train", {})):
            epochs = "{} -> {} epochs".format(*changes["train.epochs"])
            return RunChoice(
                name, True, f"resuming run {name!r} and extending it ({epochs}; constant schedule)", inputs
            )
        elif mode == "always":
            return RunChoice(name, True, f"resuming run {name!r} although it changed (train.resume=always): "
                                         + "; ".join(changed), inputs)  # fmt: skip
        else:
            more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
            skipped.append(f"{name!r}, started on other inputs ({'; '.join(changed[:3])}{more}; "
                           "train.resume=always continues it anyway)")  # fmt: skip


def record_run(parent: str, choice: RunChoice) -> None:
    """Write ``choice``'s record: before its first step for a new run, and with the new budget when extended."""
    storage.write_json(
        storage.join(parent, choice.name, RUN_RECORD), {"inputs": choice.inputs, "recorded": time.time()}
    )
