"""The demo: the whole path on one Ray cluster, then a before/after comparison through the served API.

preprocess (Ray Data) -> LoRA fine-tune (Ray Train) -> sweep (Ray Tune) -> serve (Ray Serve) ->
chat through the official ``openai`` client -> eval loss and task accuracy, base model vs adapters.
Writes ``<output_dir>/demo_report.json``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from aigc import storage
from aigc.cluster import link_ray_logs
from aigc.config import PlatformConfig
from aigc.data import checks as data_checks
from aigc.data.preprocess import preprocess
from aigc.demo.dataset import demo_eval_prompts, score_answer
from aigc.errors import ConfigError
from aigc.models.loading import model_id_for
from aigc.report import report_preprocess, report_sweep, report_train
from aigc.serve import checks as serve_checks
from aigc.serve.client import ask, openai_client
from aigc.serve.run import run_server
from aigc.train.trainer import run_training
from aigc.tune import checks as tune_checks
from aigc.tune.results import values_label
from aigc.tune.sweep import run_sweep

__all__ = ["check", "check_output_dir", "fresh_output_dir", "run_demo", "score_models", "sweep_spread"]

_N_EVAL_PROMPTS = 40
_EVAL_SEED = 1234


def _banner(step: str, t0: float) -> None:
    print(f"\n[demo {time.time() - t0:4.0f}s] == {step} ==", flush=True)


def score_models(base_url: str, models: list[str], prompts: list[str], max_tokens: int = 48) -> dict[str, Any]:
    """Greedy answers of each model to each held-out prompt, scored by the demo task's checker."""

    client = openai_client(base_url)
    out: dict[str, Any] = {}
    for model in models:
        answers = []
        for q in prompts:
            answers.append(ask(client, model, q, max_tokens).choices[0].message.content or "")
        correct = [score_answer(q, a) for q, a in zip(prompts, answers, strict=True)]
        out[model] = {"accuracy": sum(correct) / len(prompts), "answers": answers, "correct": correct}
    return out


def _show_chat(base_url: str, models: list[str], question: str) -> None:
    """One question to each model, the fine-tuned ones streamed token by token."""

    client = openai_client(base_url)
    print(f"\n  customer> {question}")
    for model in models:
        print(f"  {model:>18}> ", end="", flush=True)
        for chunk in ask(client, model, question, max_tokens=48, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                print(chunk.choices[0].delta.content, end="", flush=True)
        print()


def sweep_spread(trials: Any, keys: list[str]) -> dict[str, Any]:
    """The best and the worst trial by eval loss (values, eval loss, exact match, status, steps) and a line
    saying how far apart they are: the sweep's ranking is worth something only if the trials differ."""

    def row(r: Any) -> dict[str, Any]:
        exact = r.get("eval_exact_match")
        return {
            "values": {k: r[k].item() if hasattr(r[k], "item") else r[k] for k in keys},
            "eval_loss": float(r["eval_loss"]),
            "exact_match": None if exact is None or exact != exact else float(exact),
            "status": str(r["status"]),
            "step": int(r["step"]),
        }

    def show(r: dict[str, Any]) -> str:
        values = values_label(r["values"])
        exact = f", exact match {r['exact_match']:.0%}" if r["exact_match"] is not None else ""
        return f"{values}: eval loss {r['eval_loss']:.4f}{exact} ({r['status']} at step {r['step']})"

    ranked = trials[trials["eval_loss"].notna()].sort_values("eval_loss")
    best, worst = row(ranked.iloc[0]), row(ranked.iloc[-1])
    line = f"the trials differ: best {show(best)}\n                     worst {show(worst)}"
    return {"best": best, "worst": worst, "line": line}


_MARKER = ".aigc-demo-output"  # written into output_dir by the demo; only such a directory is ever cleared


def check(cfg: PlatformConfig) -> PlatformConfig:
    """What the demo checks before any Ray work: its output directory, then each stage it runs as that stage's
    own command checks it; returns ``cfg`` with its model resolved (tokenizer and config only)."""
    check_output_dir(cfg)
    checked = tune_checks.check(data_checks.check(cfg), preprocessed=False)
    return serve_checks.check(checked)


def check_output_dir(cfg: PlatformConfig) -> None:
    """Refuse an ``output_dir`` the demo must never clear: the working directory or a parent of it, the home
    directory, the filesystem root, one that holds ``registry_dir``, or a non-empty one the demo did not write.

    Raises:
        ConfigError: naming the directory and what to use instead.
    """
    out = cfg.output_dir
    if storage.is_uri(out):
        return _check_demo_owned(out)
    real = os.path.realpath(out)
    cwd, home = os.path.realpath(os.getcwd()), os.path.realpath(os.path.expanduser("~"))
    registry = os.path.realpath(cfg.registry_dir) if not storage.is_uri(cfg.registry_dir) else None
    reasons = [
        (real == os.path.dirname(real), "is the filesystem root"),
        (real == home, "is the home directory"),
        (cwd == real or cwd.startswith(real + os.sep), "is the working directory or a parent of it"),
        (registry is not None and (registry == real or registry.startswith(real + os.sep)), "holds registry_dir"),
    ]
    for bad, why in reasons:
        if bad:
            raise ConfigError(f"output_dir: {out} {why}; the demo clears output_dir, so give it a directory "
                              f"of its own (e.g. output_dir=runs/demo)")  # fmt: skip
    _check_demo_owned(out)


def fresh_output_dir(out: str) -> None:
    """Clear ``out`` (checked by :func:`check_output_dir`) and mark it as the demo's, so its next run may clear it."""
    storage.remove_tree(out)
    storage.write_text(storage.join(out, _MARKER), "written by `aigc demo`; cleared by its next run\n")


def _check_demo_owned(out: str) -> None:
    if storage.is_dir(out) and storage.list_files(out) and not storage.is_file(storage.join(out, _MARKER)):
        raise ConfigError(
            f"output_dir: {out} is not empty and was not written by the demo (no {_MARKER} in it); the demo "
            f"clears output_dir, so point it at a new directory or remove this one yourself"
        )


def run_demo(cfg: PlatformConfig) -> dict[str, Any]:
    """Run every stage on the current Ray cluster and print the before/after figures."""
    from ray import serve

    t0 = time.time()
    check_output_dir(cfg)
    # The demo starts clean (only a directory an earlier demo wrote); the registry keeps every version.
    fresh_output_dir(cfg.output_dir)
    ray_logs = link_ray_logs(cfg.output_dir)  # what Ray's workers printed, reachable from the run's directory

    _banner(f"1/4 preprocess {cfg.data.path} with Ray Data", t0)
    report_preprocess(preprocess(cfg.data, cfg.model, cfg.output_dir))

    _banner(f"2/4 LoRA fine-tune with Ray Train: {cfg.train.num_workers} workers, {cfg.train.epochs} epochs", t0)
    trained = run_training(cfg)
    report_train(trained, per_epoch=True)
    print(f"  loss curve: {storage.join(cfg.output_dir, 'train', 'loss.png')}")

    t = cfg.tune
    budget = f"{t.epochs or cfg.train.epochs} epoch(s) each" + (
        f", eval every {t.eval_every_steps} steps" if t.eval_every_steps else ""
    )
    _banner(f"3/4 sweep with Ray Tune: {t.num_samples} trials over {t.space}, {budget}, {t.scheduler}", t0)
    swept = run_sweep(cfg)
    report_sweep(swept)
    spread = sweep_spread(swept.trials, list(swept.best_overrides))
    print(f"\n  {spread['line']}")

    _banner("4/4 serve base model + adapters with Ray Serve; chat through the openai client", t0)
    base_url = run_server(cfg, blocking=False)
    base_id = cfg.serve.base_model_id or model_id_for(cfg.model.name_or_path)
    models = [base_id, trained.registry_id, swept.registry_id]
    try:
        prompts = demo_eval_prompts(_N_EVAL_PROMPTS, seed=_EVAL_SEED)
        for q in prompts[:3]:
            _show_chat(base_url, models, q)
        scores = score_models(base_url, models, prompts)
    finally:
        serve.shutdown()

    # Eval loss on the held-out split, from the same evaluation pass: before training vs each adapter.
    eval_loss = {
        base_id: trained.metrics.get("initial_eval_loss"),
        trained.registry_id: trained.metrics.get("eval_loss"),
        swept.registry_id: swept.best_metrics.get("eval_loss"),
    }
    report = {
        "models": {m: {"eval_loss": eval_loss[m], "accuracy": scores[m]["accuracy"]} for m in models},
        "held_out_prompts": len(prompts),
        "sweep_best": swept.best_overrides,
        "sweep_spread": {k: spread[k] for k in ("best", "worst")},
        "elapsed_s": round(time.time() - t0, 1),
    }
    report_path = storage.join(cfg.output_dir, "demo_report.json")
    storage.write_json(report_path, {**report, "answers": {m: scores[m]["answers"] for m in models}}, indent=1)

    _banner("result: base model vs fine-tuned adapters (held-out data)", t0)
    print(f"  {'model':<22}{'eval loss':>12}{'accuracy':>12}")
    for m in models:
        print(f"  {m:<22}{eval_loss[m]:>12.4f}{scores[m]['accuracy']:>12.0%}")
    base_loss, best_loss = (
        eval_loss[base_id],
        min(eval_loss[trained.registry_id], eval_loss[swept.registry_id]),
    )
    print(f"\n  eval loss {(1 - best_loss / base_loss):.0%} lower after fine-tuning; "
          f"report: {report_path}; total {report['elapsed_s']:.0f}s")  # fmt: skip
    if ray_logs:
        print(f"  Ray's worker logs: {ray_logs}")
    print(f"  keep serving with: aigc serve --config <this config>   (OpenAI base_url {base_url})")
    return report
