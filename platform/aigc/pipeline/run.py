"""``aigc pipeline``: from a dataset to a served, promoted adapter on one Ray cluster, resumable.

1. take ``<output_dir>/pipeline/lock.json`` (:mod:`aigc.pipeline.lock`): one pipeline per output_dir at a time,
   a second one stops here, before any Ray work, naming the first; released when this one ends;
2. join the cluster (``RAY_ADDRESS``) or start an embedded one;
3. run the stages (:mod:`aigc.pipeline.stages`: preprocess, sweep, train, register, promote, deploy, smoke)
   against ``<output_dir>/pipeline/state.json``: each is skipped when it last succeeded with the same
   fingerprint and its output is still there;
4. print the summary: which version is served under which name, and where;
5. on an embedded cluster with ``pipeline.keep_serving``, keep serving until Ctrl-C (the app lives as long as
   this process); on a joined cluster the app stays up after the command ends.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any

from aigc.config import PlatformConfig
from aigc.pipeline.feedback_round import pipeline_config
from aigc.pipeline.lock import pipeline_lock
from aigc.pipeline.runner import StageOutcome, run_stages
from aigc.pipeline.stages import build_stages
from aigc.pipeline.state import PipelineState, state_path

__all__ = ["PipelineResult", "ray_data_hash", "run_pipeline"]


@dataclass
class PipelineResult:
    """Every stage's outcome, and where the result is served (None without the deploy stage)."""

    stages: list[StageOutcome]
    registry_id: str
    served_as: str
    base_url: str | None
    elapsed_s: float
    serving: str = ""  # the version served_as names now: registry_id, unless the gate held the promote back

    def outcome(self, name: str) -> str:
        return next(s.outcome for s in self.stages if s.name == name)


def ray_data_hash(data: Any) -> str:
    """The content hash of ``data``'s input files, each hashed by a Ray task where it is read."""
    import ray

    from aigc.data.input_files import hash_inputs, list_input_files
    from aigc.pipeline.fingerprint import data_hash

    return data_hash(ray.get(hash_inputs(list_input_files(data))))


def run_pipeline(cfg: PlatformConfig, block: bool = False) -> PipelineResult:
    """Run (or continue) the pipeline on the current Ray cluster (started if needed).

    Args:
        cfg: the run's config; ``pipeline`` says which stages run.
        block: after the summary, keep serving until Ctrl-C (what ``aigc pipeline`` does on an embedded cluster).

    Raises:
        LockHeldError: another pipeline runs on the same output_dir (nothing else happened).
        AigcError: the stage that failed (recorded as failed; re-running continues from it).
    """
    t0 = time.monotonic()
    cfg = pipeline_config(cfg)
    with pipeline_lock(cfg.output_dir, echo=lambda line: print(line, flush=True)):
        return _run_locked(cfg, block, t0)


def _run_locked(cfg: PlatformConfig, block: bool, t0: float) -> PipelineResult:
    from aigc.cluster import init_ray
    from aigc.models.hub import resolve_model

    # before any Ray work: one commit for every stage, its fingerprints and the registered version
    cfg = cfg.model_copy(update={"model": resolve_model(cfg.model, weights=True)})
    init_ray(cfg.cluster.num_cpus)
    state = PipelineState.load(state_path(cfg.output_dir))
    stages = build_stages(cfg, ray_data_hash)
    print(f"[pipeline] {' -> '.join(s.name for s in stages)}; state in {state.path}", flush=True)
    outcomes = run_stages(stages, state, echo=lambda line: print(line, flush=True))
    out = {o.name: o.outputs for o in outcomes}
    version = out["register"]["registry_id"]
    served_as = out.get("promote", {}).get("served_as", version)
    serving = out.get("promote", {}).get("serving") or version
    result = PipelineResult(outcomes, version, served_as, out.get("deploy", {}).get("base_url"), time.monotonic() - t0,
                            serving)  # fmt: skip
    _summary(cfg, result)
    if block and result.base_url:
        _serve_until_interrupted()
    return result


def _summary(cfg: PlatformConfig, res: PipelineResult) -> None:
    counts = {k: sum(s.outcome == k for s in res.stages) for k in ("ran", "skipped")}
    print(f"[pipeline] done in {res.elapsed_s:.0f}s: {counts['ran']} ran, {counts['skipped']} skipped")
    if res.base_url:
        held = f" ({res.registry_id} registered, held back by the gate)" if res.serving != res.registry_id else ""
        print(f"[pipeline] serving {res.served_as} -> {res.serving} at {res.base_url} (app {cfg.serve.app_name!r},"
              f" registry {cfg.registry_dir}){held}")  # fmt: skip
    else:
        shown = res.registry_id if res.served_as == res.registry_id else f"{res.registry_id} as {res.served_as}"
        print(f"[pipeline] registered {shown} (pipeline.deploy is off)")


def _serve_until_interrupted() -> None:
    from ray import serve

    if os.environ.get("RAY_ADDRESS"):
        return  # a joined cluster keeps the app after this process ends
    print("[pipeline] embedded cluster: serving until Ctrl-C (pipeline.keep_serving=false to exit at once)")
    try:
        while True:
            time.sleep(1)
    except KeyboardInterrupt:
        print("[pipeline] shutting down")
    finally:
        serve.shutdown()
