"""Where the training loop runs: its rank, device, data, checkpoint and reports, behind one small interface.

:func:`aigc.train.loop.train_loop_per_worker` is the same function for ``aigc train`` and every sweep trial;
only the context differs:

- :class:`RayTrainContext` (the default): a Ray Train worker in a TorchTrainer's worker group (DDP ranks).
- :class:`TuneTrialContext`: a 1-worker sweep trial that trains inside the Tune trial itself, with no nested
  worker group: rank 0 of 1, the trial's own device, the Ray Datasets as its "shards", Tune's checkpoint and
  ``ray.tune.report``. It saves a trial the Train controller, worker-group start-up and a second checkpoint copy.

Fault injection for resume tests lives here, not in the loop's arguments. Read from the environment of the
process that builds the trainer, and carried to the workers by the :class:`RayTrainContext` it ships them:

- ``AIGC_FAULT_AT_STEP=N``: the first attempt (not resumed from a checkpoint) raises after optimizer step ``N``;
- ``AIGC_KILL_AT_STEP=N``: the first attempt's rank-0 worker process SIGKILLs itself after step ``N`` (no
  exception, no clean-up: as a lost process or an out-of-memory kill);
- ``AIGC_HOLD_AT_STEP=N``: the first attempt's rank 0 stops after step ``N`` (before that step's checkpoint, if
  it has one) until the file ``AIGC_HOLD_RELEASE`` names exists, so a test can break something outside the
  process at a known step (kill a node, cut the object store) and then let it go on (at most 10 minutes).

Before killing or holding, rank 0 writes ``{"pid", "step"}`` to the file ``AIGC_FAULT_MARKER`` names, if set, so
a test can tell the moment has come. The restarted attempt resumes from the last checkpoint and goes on; set
``N`` past the first checkpoint, or every attempt starts afresh and fails again.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any, Protocol

import torch

from aigc import storage
from aigc.train import model_setup
from aigc.train.worker_config import WorkerConfig

__all__ = [
    "FAULT_ENV",
    "FAULT_MARKER_ENV",
    "HOLD_ENV",
    "HOLD_RELEASE_ENV",
    "KILL_ENV",
    "RayTrainContext",
    "TuneTrialContext",
    "WorkerContext",
]

FAULT_ENV = "AIGC_FAULT_AT_STEP"
KILL_ENV = "AIGC_KILL_AT_STEP"
HOLD_ENV = "AIGC_HOLD_AT_STEP"
HOLD_RELEASE_ENV = "AIGC_HOLD_RELEASE"
FAULT_MARKER_ENV = "AIGC_FAULT_MARKER"
HOLD_LIMIT_S = 600.0


class WorkerContext(Protocol):
    """What the loop needs from the process it runs in."""

    def world_rank(self) -> int: ...

    def world_size(self) -> int: ...

    def device(self) -> torch.device: ...

    def prepare_model(self, model: Any, wc: WorkerConfig) -> Any: ...

    def dataset_shard(self, name: str) -> Any: ...

    def checkpoint(self) -> Any: ...

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        """Report ``metrics``; with ``checkpoint_dir`` (rank 0 only), that directory is the checkpoint."""

    def after_step(self, step: int, resumed: bool) -> None:
        """Called after every optimizer step (``resumed``: this attempt started from a checkpoint)."""


class RayTrainContext:
    """A Ray Train worker: everything through ``ray.train``.

    Built on the driver and shipped to the workers; it reads the fault-injection variables there (resume
    tests, see the module docstring).

    Raises:
        ValueError: :data:`FAULT_ENV`, :data:`KILL_ENV` or :data:`HOLD_ENV` is set to something other than a step
            number, or :data:`HOLD_ENV` without :data:`HOLD_RELEASE_ENV`.
    """

    def __init__(self) -> None:
        self.fault_at_step = _step_from_env(FAULT_ENV, "fail after")
        self.kill_at_step = _step_from_env(KILL_ENV, "SIGKILL rank 0 after")
        self.hold_at_step = _step_from_env(HOLD_ENV, "hold rank 0 after")
        self.hold_release = os.environ.get(HOLD_RELEASE_ENV) or None
        if self.hold_at_step is not None and not self.hold_release:
            raise ValueError(f"{HOLD_ENV} is set: set {HOLD_RELEASE_ENV} to the file whose creation lets rank 0 go on")
        self.marker = os.environ.get(FAULT_MARKER_ENV) or None

    def world_rank(self) -> int:
        import ray.train

        return ray.train.get_context().get_world_rank()

    def world_size(self) -> int:
        import ray.train

        return ray.train.get_context().get_world_size()

    def device(self) -> torch.device:
        import ray.train.torch

        return ray.train.torch.get_device()

    def prepare_model(self, model: Any, wc: WorkerConfig) -> Any:
        return model_setup.prepare(model, wc)

    def dataset_shard(self, name: str) -> Any:
        import ray.train

        return ray.train.get_dataset_shard(name)

    def checkpoint(self) -> Any:
        import ray.train

        return ray.train.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.train

        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    def after_step(self, step: int, resumed: bool) -> None:
        """On the first attempt: fail after step :data:`FAULT_ENV`, kill rank 0 after step :data:`KILL_ENV`, or
        hold rank 0 after step :data:`HOLD_ENV` (as set when the driver built this context)."""
        if resumed:
            return
        if step in (self.kill_at_step, self.hold_at_step) and self.world_rank() == 0:
            if self.marker:
                storage.write_json(self.marker, {"pid": os.getpid(), "step": step})
            if step == self.kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            self._hold(step)
        if self.fault_at_step == step:
            raise RuntimeError(f"injected fault after step {step} ({FAULT_ENV})")

    def _hold(self, step: int) -> None:
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not storage.exists(self.hold_release):
            if time.monotonic() > deadline:
                raise RuntimeError(f"held after step {step} ({HOLD_ENV}) for {HOLD_LIMIT_S:.0f}s: "
                                   f"{self.hold_release} was never created")  # fmt: skip
            time.sleep(0.2)


def _step_from_env(name: str, what: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if raw and not raw.isdigit():
        raise ValueError(f"{name}={raw!r}: set it to the optimizer step to {what}, or unset it")
    return int(raw) if raw else None


class TuneTrialContext:
    """A Tune trial that trains by itself (one worker): rank 0, the datasets whole, Tune's checkpoints.

    Args:
        datasets: ``{"train": Dataset, "val": Dataset}``, iterated whole (the trial is the only worker).
        use_gpu: train on the trial's GPU (Tune sets CUDA_VISIBLE_DEVICES to the one it reserved).
    """

    def __init__(self, datasets: dict[str, Any], use_gpu: bool = False) -> None:
        self.datasets, self.use_gpu = datasets, use_gpu

    def world_rank(self) -> int:
        return 0

    def world_size(self) -> int:
        return 1

    def device(self) -> torch.device:
        return torch.device("cuda:0" if self.use_gpu else "cpu")

    def prepare_model(self, model: Any, wc: WorkerConfig) -> Any:
        return model.to(self.device())  # no process group: nothing to wrap

    def dataset_shard(self, name: str) -> Any:
        return self.datasets[name]

    def checkpoint(self) -> Any:
        import ray.tune

        return ray.tune.get_checkpoint()

    def report(self, metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        import ray.tune

        ckpt = ray.tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.tune.report(metrics, checkpoint=ckpt)

    def after_step(self, step: int, resumed: bool) -> None:
        """Nothing: faults are injected into Ray Train workers only."""
