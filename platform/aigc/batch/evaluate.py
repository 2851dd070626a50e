"""``aigc eval``: several models (the base, adapters, versions) on the same held-out prompts, side by side.

    aigc eval --config configs/demo.yaml generate.input=HELD_OUT.jsonl --models base support-bot:v1 support-bot:v2

1. each model answers every prompt of ``generate.input`` through the batch generator (:mod:`aigc.batch.generate`,
   one resumable run per model version under ``<eval_dir>/generations/<version>/``);
2. on the prompts every model answered and that have a reference answer: exact match and ROUGE-L (training's
   own scoring, :func:`aigc.train.gen_metrics.answer_scores`), ``win_rate`` (share of prompts where the model's
   ROUGE-L beats the reference model's, ties half) and, with ``generate.judge``, ``judge_win_rate``;
3. loss and perplexity of the reference answers, and with ``generate.eval_pairs`` the summed log-probabilities of
   each pair's chosen and rejected answers (:mod:`aigc.batch.logprobs`): ``pair_accuracy`` (chosen more likely),
   and against the reference model the DPO implicit reward ``r = logp_model - logp_reference``:
   ``reward_accuracy`` (r_chosen > r_rejected) and ``reward_margin`` (mean r_chosen - r_rejected), computed by
   the DPO training code (:func:`aigc.train.preference.dpo_loss` with beta 1);
4. ``<eval_dir>/report.json``, a table on the console (:func:`eval_table`) and ``<eval_dir>/eval.png``.

The first model is the reference: its ``win_rate``, ``judge_win_rate``, ``reward_accuracy`` and ``reward_margin``
are null.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import torch

from aigc import storage
from aigc.batch.generate import run_generate
from aigc.batch.inputs import detect_format, read_rows
from aigc.batch.judge import judge_win_rate
from aigc.batch.logprobs import ModelScores, score_model, tokenize_pairs, tokenize_references
from aigc.batch.models import resolve_model_ref
from aigc.config import DataConfig, PlatformConfig
from aigc.config.generate import BASE_MODEL
from aigc.errors import ConfigError
from aigc.plots import figure
from aigc.train.gen_metrics import answer_scores
from aigc.train.preference import dpo_loss, pair_metric_sums, pair_metrics

__all__ = ["METRICS", "eval_dir", "eval_table", "run_eval"]

METRICS = ("exact_match", "rouge_l", "loss", "perplexity", "judge_win_rate", "win_rate", "pair_accuracy",
           "reward_accuracy", "reward_margin")  # fmt: skip
_DATA_FORMATS = ("alpaca", "messages", "sharegpt")  # formats whose rows carry a reference answer to score


def eval_dir(cfg: PlatformConfig) -> str:
    """``generate.eval_dir``, or ``<output_dir>/eval``."""
    return cfg.generate.eval_dir or storage.join(cfg.output_dir, "eval")


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _generations(cfg: PlatformConfig, ref: str, out: str) -> dict[int, dict[str, Any]]:
    """Every answered row of ``ref`` on ``generate.input``, by row number (a resumable generate run)."""
    g = cfg.generate.model_copy(update={"model": ref, "output_format": "jsonl"})
    result = run_generate(cfg.model_copy(update={"generate": g}), output=out)
    rows = [json.loads(line) for line in storage.read_text(result.path).splitlines() if line.strip()]
    return {r["index"]: r for r in rows}


def _pair_scores(scores: ModelScores, ref: ModelScores | None) -> dict[str, float | None]:
    if not scores.chosen_logps:
        return {"pair_accuracy": None, "reward_accuracy": None, "reward_margin": None}
    c, r = torch.tensor(scores.chosen_logps), torch.tensor(scores.rejected_logps)
    out: dict[str, float | None] = {"pair_accuracy": float((c > r).float().mean())}
    if ref is None:
        return {**out, "reward_accuracy": None, "reward_margin": None}
    rc, rr = torch.tensor(ref.chosen_logps), torch.tensor(ref.rejected_logps)
    m = pair_metrics(pair_metric_sums(dpo_loss(c, r, rc, rr, beta=1.0)))  # rewards = logp - logp_ref
    return {**out, "reward_accuracy": m["reward_accuracy"], "reward_margin": m["reward_margin"]}


def _tokenized(cfg: PlatformConfig, raws: list[str], fmt: str, pairs: bool) -> Any:
    d = cfg.data
    data = DataConfig(path=cfg.generate.eval_pairs if pairs else cfg.generate.input, format=fmt, preference=pairs,
                      max_length=d.max_length, overflow=d.overflow, system_prompt=d.system_prompt,
                      val_fraction=0.0)  # fmt: skip
    return tokenize_pairs(cfg.model, data, raws) if pairs else (tokenize_references(cfg.model, data, raws), 0)


def run_eval(cfg: PlatformConfig, models: list[str | None]) -> dict[str, Any]:
    """Score ``models`` (``base`` or registered references; the first is the reference model) on the prompts of
    ``generate.input``; writes ``report.json`` and ``eval.png`` under :func:`eval_dir`.

    Returns:
        ``{"prompts": N, "pairs": P, "reference_model": label, "models": {label: {"version", <METRICS>}}}``.

    Raises:
        ConfigError: no input, an unknown model, a model named twice.
    """
    import ray

    labels = [m or BASE_MODEL for m in models]
    if not labels or len(set(labels)) != len(labels):
        raise ConfigError(f"--models: name each model once, the reference first (got {labels})")
    choices = [resolve_model_ref(cfg, m, key="--models") for m in labels]
    if not ray.is_initialized():
        ray.init()
    out = eval_dir(cfg)
    # 1. answers of every model
    # one directory per version: an alias moved since the last eval gets fresh answers; two labels of one version
    # share them
    gens = {c.label: _generations(cfg, c.label, storage.join(out, "generations", re.sub(r"[^\w.-]", "_", c.version)))
            for c in choices}  # fmt: skip
    common = sorted(set.intersection(*(set(g) for g in gens.values())))
    scored = [i for i in common if gens[labels[0]][i].get("reference") is not None]
    # 2. likelihoods of the references (a data format) and of the pairs
    raws = read_rows(cfg.generate.input or "", cfg.generate.limit)
    fmt = detect_format(raws, cfg.generate.format, cfg.generate.prompt_column)
    refs = _tokenized(cfg, [raws[i] for i in scored], fmt, False)[0] if fmt in _DATA_FORMATS else {}
    pairs, left_out = {}, 0
    if cfg.generate.eval_pairs:
        praws = read_rows(cfg.generate.eval_pairs, None, what="generate.eval_pairs")
        pfmt = detect_format(praws, cfg.generate.eval_pairs_format, cfg.generate.prompt_column, pairs=True)
        pairs, left_out = _tokenized(cfg, praws, pfmt, True)
    refs = refs or {"input_ids": [], "labels": []}
    gpus = cfg.generate.gpus_per_actor
    likelihood = {c.label: score_model(cfg.model, c.adapter_uri, refs, pairs, gpus) for c in choices}
    # 3. the report
    reference = labels[0]
    ref_rouge: list[float] = []
    report: dict[str, Any] = {"prompts": len(scored), "pairs": len(pairs.get("input_ids", [])),
                              "pairs_left_out": left_out, "reference_model": reference, "models": {}}  # fmt: skip
    for c in choices:
        pairs_of = [answer_scores(gens[c.label][i]["answer"], gens[c.label][i]["reference"]) for i in scored]
        rouge = [r for _, r in pairs_of]
        if c.label == reference:
            ref_rouge = rouge
        own = c.label == reference
        wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rouge, ref_rouge, strict=True)]
        judged = None
        if cfg.generate.judge is not None and not own:
            judged = judge_win_rate(cfg.generate.judge, [gens[c.label][i]["prompt"] for i in scored],
                                    [gens[reference][i]["answer"] for i in scored],
                                    [gens[c.label][i]["answer"] for i in scored])  # fmt: skip
        s = likelihood[c.label]
        report["models"][c.label] = {
            "version": c.version,
            "exact_match": _mean([e for e, _ in pairs_of]),
            "rouge_l": _mean(rouge),
            "loss": s.loss,
            "perplexity": s.perplexity,
            "judge_win_rate": judged,
            "win_rate": None if own else _mean(wins),
            **_pair_scores(s, None if own else likelihood[reference]),
        }
    storage.write_json(storage.join(out, "report.json"), report)
    _plot(report, out)
    return report


def _shown(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def eval_table(report: dict[str, Any]) -> str:
    """The report as a text table: one row per model, the reference model first."""
    heads = ["model", "version", *METRICS]
    rows = [[label, m["version"], *(_shown(m.get(k)) for k in METRICS)] for label, m in report["models"].items()]
    widths = [max(len(str(r[i])) for r in [heads, *rows]) for i in range(len(heads))]
    lines = ["  ".join(str(v).ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in [heads, *rows]]
    note = (f"{report['prompts']} prompts, {report.get('pairs', 0)} pairs; reference model: "
            f"{report['reference_model']}")  # fmt: skip
    return "\n".join([*lines, note])


def _plot(report: dict[str, Any], out: str) -> None:
    """``<out>/eval.png``: grouped bars of each model's scores in [0, 1] (exact match, ROUGE-L, win rates, pair
    accuracies)."""
    shown = ["exact_match", "rouge_l", "win_rate", "judge_win_rate", "pair_accuracy", "reward_accuracy"]
    models = list(report["models"])
    width = 0.8 / max(len(models), 1)
    with (
        storage.local_staging(out) as local,
        figure(os.path.join(local, "eval.png"), "aigc eval", "metric", "score", size=(8, 3.5)) as ax,
    ):
        for j, label in enumerate(models):
            values = [report["models"][label].get(k) for k in shown]
            xs = [i + j * width for i, v in enumerate(values) if v is not None]
            ax.bar(xs, [v for v in values if v is not None], width=width, label=label)
        ax.set_xticks([i + width * (len(models) - 1) / 2 for i in range(len(shown))], shown, fontsize=7)
        ax.set_ylim(0, 1)
