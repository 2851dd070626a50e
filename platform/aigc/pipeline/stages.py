"""The pipeline's stages, built on the platform's stage functions: what each reads (its fingerprint), how it
runs, and how its output is found again.

- **preprocess** reads ``data``, ``model`` and the data files' content; re-run when ``stats.json`` no longer
  names its shards.
- **start** (a DPO feedback round, :mod:`aigc.pipeline.feedback_round`) pins the version the alias serves as the
  round's starting adapter and reference; upstream preprocess.
- **sweep** (``pipeline.sweep``) reads ``tune`` and the space file's content, ``train`` except
  ``train.num_workers`` (trials have their own), ``lora``, ``model``; upstream start (or preprocess); its output
  is ``best_config.yaml``. Trials train ``tune.epochs`` (short trials), the train stage ``train.epochs``.
- **train** reads ``model``, ``lora``, ``train`` with the sweep's best values; upstream sweep (or start, or preprocess);
  its output is the exported model directory, done only when it was published whole
  (:func:`aigc.storage.is_complete`: a publish killed part-way trains again).
- **register** reads ``registry_dir`` and ``train.adapter_name``; upstream train; its output is the published
  version.
- **gate** (``pipeline.promote_if``, :mod:`aigc.pipeline.gate`) reads the gate and ``generate``'s held-out
  prompts; upstream register; ``aigc eval`` of the served version against the new one, and the gate's verdict.
- **promote** (``pipeline.promote``) reads ``pipeline.alias``; upstream gate (or register); moves the alias to
  the version, unless the gate held it back.
- **deploy** (``pipeline.deploy``) reads ``serve``, ``model``, ``registry_dir``, ``output_dir``; no upstream;
  its output is the Serve app, RUNNING.
- **smoke** asks the served name ``pipeline.smoke_prompt``; never skipped: it checks the live endpoint.

``model`` enters a fingerprint by what it names (``name_or_path``, ``revision``, the resolved ``commit``,
``dtype``...), not by where its snapshot sits on disk (``resolved_path``, ``cache_dir``): a moved branch reruns
everything that reads the model, a moved cache nothing.

Deploy depends on no training stage on purpose: the endpoint resolves ``name`` and ``name:ALIAS`` per request,
so a new version is served by moving the alias (the promote stage), never by a redeploy. Keys no stage reads
(``tracking``, ``cluster``, ``pipeline.keep_serving``) change no fingerprint, nor does ``data.keep_shard_sets``
(how long old shards stay, not what the data is).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from aigc import storage
from aigc.config import DataConfig, PlatformConfig
from aigc.pipeline.feedback_round import round_config, served_name, start_stage
from aigc.pipeline.fingerprint import content_hash
from aigc.pipeline.gate import gate_stage
from aigc.pipeline.runner import Outputs, Stage

__all__ = ["build_stages"]

HashData = Callable[[DataConfig], str]


def _jsonable(value: Any) -> Any:
    """Tune's sampled values (numpy scalars included) as plain JSON values."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


# Keys that say where a thing sits or how long it is kept, not what it is: no stage reruns when they change.
_NOT_CONTENT = {"model": {"resolved_path", "cache_dir"}, "data": {"keep_shard_sets"}}


def _sections(cfg: PlatformConfig, *names: str) -> dict[str, Any]:
    return {n: getattr(cfg, n).model_dump(mode="json", exclude=_NOT_CONTENT.get(n)) for n in names}


def build_stages(cfg: PlatformConfig, hash_data: HashData) -> list[Stage]:
    """The stages ``cfg.pipeline`` asks for, in order.

    Args:
        cfg: the pipeline's config (:func:`pipeline_config` applied).
        hash_data: a dataset's content hash (the real pipeline hashes every file with Ray tasks).
    """
    p = cfg.pipeline
    stages = [_preprocess(cfg, hash_data)]
    upstream = "preprocess"
    if p.feedback and p.feedback_method == "dpo":
        stages.append(start_stage(cfg))
        upstream = "start"
    if p.sweep:
        stages.append(_sweep(cfg, upstream))
        upstream = "sweep"
    stages += [_train(cfg, upstream), _register(cfg)]
    if p.promote:
        if p.promote_if:
            stages.append(gate_stage(cfg))
        stages.append(_promote(cfg, "gate" if p.promote_if else "register"))
    if p.deploy:
        stages += [_deploy(cfg), _smoke(cfg, "promote" if p.promote else "register")]
    return stages


# 1. preprocess
def _preprocess(cfg: PlatformConfig, hash_data: HashData) -> Stage:
    def inputs(_: Outputs) -> dict[str, Any]:
        return {**_sections(cfg, "data", "model"), "content": hash_data(cfg.data)}

    def run(_: Outputs) -> dict[str, Any]:
        from aigc.data.preprocess import preprocess
        from aigc.report import report_preprocess

        res = preprocess(cfg.data, cfg.model, cfg.output_dir)
        report_preprocess(res)
        s = res.stats
        return {"shards": s["shards"], "data_hash": s["fingerprint"], "rows_train": s["rows_train"],
                "rows_val": s["rows_val"]}  # fmt: skip

    def exists(out: dict[str, Any]) -> bool:
        from aigc.data.preprocess import read_stats, shards_dir
        from aigc.errors import DataError

        try:
            stats = read_stats(cfg.output_dir)
            return stats.get("shards") == out.get("shards") and storage.is_dir(shards_dir(cfg.output_dir, stats))
        except DataError:
            return False

    return Stage("preprocess", inputs, run, exists=exists)


# 2. sweep
def _sweep(cfg: PlatformConfig, upstream: str) -> Stage:
    def inputs(done: Outputs) -> dict[str, Any]:
        sections = _sections(round_config(cfg, {"start": done.get("start")}), "tune", "train", "lora", "model")
        # Trials run tune.num_workers_per_trial workers: scaling up the final run must not sweep again.
        del sections["train"]["num_workers"]
        return {**sections, "space": content_hash(cfg.tune.space)}

    def run(done: Outputs) -> dict[str, Any]:
        from aigc.report import report_sweep
        from aigc.tune.sweep import run_sweep

        # Not registered: the sweep only chooses values; the train stage trains them for the full schedule.
        res = run_sweep(round_config(cfg, {"start": done.get("start")}), register=False)
        report_sweep(res)
        metrics = {k: v for k, v in res.best_metrics.items() if isinstance(v, int | float)}
        return _jsonable({"sweep_id": res.sweep_id, "values": res.best_overrides, "metrics": metrics,
                          "best_config": res.best_config_path})  # fmt: skip

    def exists(out: dict[str, Any]) -> bool:
        return bool(out.get("best_config")) and storage.is_file(out["best_config"])

    return Stage("sweep", inputs, run, upstream=upstream, exists=exists)


# 3. train
def _train(cfg: PlatformConfig, upstream: str) -> Stage:
    def inputs(done: Outputs) -> dict[str, Any]:
        return _sections(round_config(cfg, done), "model", "lora", "train")

    def run(done: Outputs) -> dict[str, Any]:
        from aigc.report import report_train
        from aigc.train.trainer import run_training

        res = run_training(round_config(cfg, done), register=False)  # the register stage does it
        report_train(res)
        return _jsonable({"model_dir": res.model_dir, "metrics": res.metrics})

    def exists(out: dict[str, Any]) -> bool:
        return (
            bool(out.get("model_dir"))
            and storage.is_complete(out["model_dir"])
            and bool(storage.list_files(out["model_dir"], recursive=False))
        )

    return Stage("train", inputs, run, upstream=upstream, exists=exists)


# 4. register
def _register(cfg: PlatformConfig) -> Stage:
    def inputs(_: Outputs) -> dict[str, Any]:
        return {"registry_dir": cfg.registry_dir, "name": cfg.train.adapter_name}

    def run(done: Outputs) -> dict[str, Any]:
        from aigc.train.publish import register_model  # aigc.train imports torch: only when the stage runs

        trained, sweep = done["train"], done.get("sweep")
        chosen = sweep and {"id": sweep["sweep_id"], "values": sweep["values"]}
        config = {**round_config(cfg, done).model_dump(), "sweep": chosen}
        entry = register_model(cfg, trained["model_dir"], trained["metrics"], config, done["preprocess"]["data_hash"])
        print(f"[register] {trained['model_dir']} -> {entry.model_id}")
        return {"registry_id": entry.model_id}

    def exists(out: dict[str, Any]) -> bool:
        from aigc.errors import RegistryError
        from aigc.registry import Registry

        try:
            Registry(cfg.registry_dir).resolve(out["registry_id"])
            return True
        except (RegistryError, KeyError):
            return False

    return Stage("register", inputs, run, upstream="train", exists=exists)


# 5. promote
def _promote(cfg: PlatformConfig, upstream: str) -> Stage:
    """Move the alias to the new version, unless the gate (``pipeline.promote_if``) held it back. Its own stage,
    so a changed ``pipeline.alias`` moves an alias and registers nothing; recorded as done, it is not redone: an
    alias rolled back by hand stays rolled back until a new version is registered."""
    alias_name = cfg.pipeline.alias

    def run(done: Outputs) -> dict[str, Any]:
        from aigc.registry import Registry

        new, gate = done["register"]["registry_id"], done.get("gate")
        if gate is not None and not gate["passed"]:
            held = gate["previous_version"]
            print(f"[promote] held back by pipeline.promote_if: {served_name(cfg)} keeps serving {held}; {new} "
                  f"stays registered (report: {gate['report']}; `aigc promote {new}` promotes it anyway)")  # fmt: skip
            return {"served_as": served_name(cfg), "previous": None, "serving": held, "held": True}
        alias, before = Registry(cfg.registry_dir).promote(new, alias_name)
        was = "unset (latest)" if before is None else f"v{before}"
        print(f"[promote] {alias.model_id} -> {alias.target} (was {was})")
        return {"served_as": alias.model_id, "previous": before, "serving": new}

    return Stage("promote", lambda _: {"alias": alias_name}, run, upstream=upstream)


# 6. deploy
def _deploy(cfg: PlatformConfig) -> Stage:
    def inputs(_: Outputs) -> dict[str, Any]:
        return {**_sections(cfg, "serve", "model"), "registry_dir": cfg.registry_dir, "output_dir": cfg.output_dir}

    def run(_: Outputs) -> dict[str, Any]:
        from aigc.serve.run import run_server

        return {"base_url": run_server(cfg, blocking=False), "app": cfg.serve.app_name}

    def exists(out: dict[str, Any]) -> bool:
        from ray import serve

        app = serve.status().applications.get(out.get("app", ""))
        return app is not None and app.status == "RUNNING"

    return Stage("deploy", inputs, run, exists=exists)


# 7. smoke
def _smoke(cfg: PlatformConfig, upstream: str) -> Stage:
    p = cfg.pipeline

    def inputs(done: Outputs) -> dict[str, Any]:
        return {"prompt": p.smoke_prompt, "max_tokens": p.smoke_max_tokens, "base_url": done["deploy"]["base_url"]}

    def run(done: Outputs) -> dict[str, Any]:
        from aigc.pipeline.smoke import smoke_test

        version = done.get("promote", {}).get("serving") or done["register"]["registry_id"]
        name = done.get("promote", {}).get("served_as", version)
        timeout = max(10.0, 5 * cfg.serve.resolve_cache_s)  # a moved alias reaches traffic within resolve_cache_s
        res = smoke_test(done["deploy"]["base_url"], name, version, p.smoke_prompt, p.smoke_max_tokens, timeout)
        print(f"[smoke] {res['model']} ({res['answered_by']}) answered {p.smoke_prompt!r} with {res['answer']!r} "
              f"in {res['latency_s']:.2f}s")  # fmt: skip
        return res

    return Stage("smoke", inputs, run, upstream=upstream, cached=False)
