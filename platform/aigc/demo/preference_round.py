"""``aigc demo-preference``: one preference round on the tiny model, offline, in a few minutes.

1. **SFT**: the pipeline trains a short supervised adapter on the demo data (one epoch, no sweep), registers it,
   promotes it and serves it with answer capture on.
2. **Feedback**: training questions are asked several times each through the ``openai`` client (sampled), and a
   scripted rater rates every answer through ``POST /v1/feedback`` as a person would: good when it routes the
   customer to the right department without a wrong order number (the demo's own check,
   :func:`aigc.demo.dataset.score_answer`), bad otherwise, with the right reply as a correction for some of
   the bad ones. Held-out questions are asked the same way but never rated: their good and bad answers become
   the held-out pairs the round is judged on.
3. **Pairs**: ``aigc feedback export --pairs``.
4. **DPO**: the pipeline's feedback round (``pipeline.feedback_method=dpo``) trains from the served SFT version,
   which is also the DPO reference, and promotes the result.
5. **Eval**: ``aigc eval`` puts the SFT and DPO versions side by side on the held-out questions (exact match,
   ROUGE-L, reference loss, ROUGE-L win rate) and the held-out pairs (reward accuracy and margin of DPO's
   implicit reward against the SFT version; how often each model scores the chosen answer above the rejected).
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from aigc import storage
from aigc.config import PlatformConfig, with_values
from aigc.demo.dataset import answer_for, demo_eval_prompts, expected_answer_fields, score_answer
from aigc.demo.driver import check_output_dir, fresh_output_dir

__all__ = ["RoundSettings", "check", "run_preference_demo"]


@dataclass(frozen=True)
class RoundSettings:
    """How big the round is (the defaults take a few minutes on 2 cores)."""

    train_questions: int = 96
    heldout_questions: int = 48
    samples: int = 4  # answers per question
    temperature: float = 1.0
    max_tokens: int = 48
    correction_every: int = 3  # every 3rd bad answer also gets the right reply as a correction
    sft_epochs: int = 1
    sft_lr: float = 4e-4  # a short, weak SFT: its sampled answers are often wrong, so there is something to learn
    dpo_epochs: int = 2
    dpo_lr: float = 5e-4
    beta: float = 0.1


def check(cfg: PlatformConfig) -> PlatformConfig:
    """Before any Ray work: the round's output directory (the demo's rules), and the pipeline's checks of its
    first round; returns ``cfg`` with its model resolved."""
    from aigc.pipeline.checks import check as pipeline_check

    sft, _ = round_configs(cfg, RoundSettings(), "unused")
    check_output_dir(sft)
    return cfg.model_copy(update={"model": pipeline_check(sft).model})


def _banner(step: str, t0: float) -> None:
    print(f"\n[demo-preference {time.time() - t0:5.0f}s] {step}", flush=True)


def round_configs(cfg: PlatformConfig, s: RoundSettings, pairs_path: str) -> tuple[PlatformConfig, PlatformConfig]:
    """The SFT round's config and the DPO round's, both derived from the demo's."""
    out = cfg.output_dir.rstrip("/") + "-preference"
    common = {
        "output_dir": out,
        "train.adapter_name": f"{cfg.train.adapter_name}-pref",
        "train.eval_generation_samples": 0,
        "tracking.mlflow": False,
        "tracking.tensorboard": False,
        "serve.capture": True,
        "serve.feedback_per_key_per_minute": None,  # the scripted rater rates hundreds of answers in a minute
        "pipeline.sweep": False,
        "pipeline.deploy": True,
        "pipeline.keep_serving": False,
        "pipeline.alias": None,
    }
    sft = with_values(cfg, {**common, "train.epochs": s.sft_epochs, "train.lr": s.sft_lr})
    dpo = with_values(cfg, {**common, "train.epochs": s.dpo_epochs, "train.lr": s.dpo_lr,
                            "train.preference.beta": s.beta, "pipeline.feedback": pairs_path,
                            "pipeline.feedback_method": "dpo"})  # fmt: skip
    return sft, dpo


def _training_questions(cfg: PlatformConfig, n: int) -> list[str]:
    """The first ``n`` questions of the training data (its deliberately broken rows left out)."""
    rows = []
    for line in storage.read_text(cfg.data.path).splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    questions = [r["instruction"] for r in rows if isinstance(r, dict) and r.get("instruction")]
    return [q for q in questions if expected_answer_fields(q)["department"]][:n]


def _ask(base_url: str, model: str, question: str, s: RoundSettings) -> list[tuple[str, str]]:
    """``samples`` answers to ``question``: (completion id, text) each."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key="unused", max_retries=2, timeout=120)
    out = []
    for seed in range(s.samples):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                           temperature=s.temperature, seed=seed, max_tokens=s.max_tokens)  # fmt: skip
        out.append((r.id, r.choices[0].message.content or ""))
    return out


def collect(base_url: str, model: str, questions: list[str], s: RoundSettings) -> dict[str, list[tuple[str, str]]]:
    """Every question's sampled answers, eight questions in flight (the engine batches them)."""
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda q: _ask(base_url, model, q, s), questions))
    return dict(zip(questions, answers, strict=True))


def rate(base_url: str, answers: dict[str, list[tuple[str, str]]], s: RoundSettings) -> dict[str, int]:
    """The scripted rater: +1 / -1 per answer through ``POST /v1/feedback``, corrections on some bad ones."""
    import httpx

    counts = {"good": 0, "bad": 0, "corrected": 0}
    with httpx.Client(base_url=base_url, timeout=60) as http:
        for question, got in answers.items():
            right = answer_for(expected_answer_fields(question)["department"])
            for cid, text in got:
                good = score_answer(question, text)
                body: dict[str, Any] = {"id": cid, "rating": 1 if good else -1}
                if not good:
                    counts["bad"] += 1
                    if counts["bad"] % s.correction_every == 0:
                        body["correction"] = right
                        counts["corrected"] += 1
                else:
                    counts["good"] += 1
                http.post("/feedback", json=body).raise_for_status()
    return counts


def heldout_files(out_dir: str, answers: dict[str, list[tuple[str, str]]]) -> tuple[str, str, int]:
    """The held-out questions with their right replies (alpaca) and their held-out pairs (messages + chosen /
    rejected, a good sampled answer over a bad one); returns both paths and the pair count."""
    rows, pairs = [], []
    for question, got in answers.items():
        rows.append({"instruction": question, "input": "", "output": answer_for(
            expected_answer_fields(question)["department"])})  # fmt: skip
        good = [t for _, t in got if score_answer(question, t)]
        bad = [t for _, t in got if not score_answer(question, t)]
        if good and bad:
            pairs.append({"messages": [{"role": "user", "content": question}],
                          "chosen": {"role": "assistant", "content": good[0]},
                          "rejected": {"role": "assistant", "content": bad[0]}})  # fmt: skip
    rows_path, pairs_path = storage.join(out_dir, "heldout.jsonl"), storage.join(out_dir, "heldout-pairs.jsonl")
    storage.write_text(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
    storage.write_text(pairs_path, "".join(json.dumps(p) + "\n" for p in pairs))
    return rows_path, pairs_path, len(pairs)


def run_preference_demo(cfg: PlatformConfig, s: RoundSettings | None = None) -> dict[str, Any]:
    """Run the round on the current Ray cluster; returns (and writes) its report."""
    from ray import serve

    from aigc.batch.evaluate import eval_table, run_eval
    from aigc.feedback.export import export_feedback
    from aigc.pipeline import run_pipeline

    s = s or RoundSettings()
    t0 = time.time()
    pairs_path = storage.join(cfg.output_dir.rstrip("/") + "-preference", "feedback-pairs.jsonl")
    sft_cfg, dpo_cfg = round_configs(cfg, s, pairs_path)
    out = sft_cfg.output_dir
    fresh_output_dir(out)

    _banner(f"1/5 SFT: {s.sft_epochs} epoch on {cfg.data.path}, registered, promoted and served (capture on)", t0)
    sft = run_pipeline(sft_cfg)
    base_url, served = sft.base_url, sft.served_as
    try:
        step = (f"2/5 feedback: {s.train_questions} training questions x {s.samples} answers, rated by a script "
                f"through POST /v1/feedback; {s.heldout_questions} held-out questions kept for the eval")  # fmt: skip
        _banner(step, t0)
        trained_on = collect(base_url, served, _training_questions(cfg, s.train_questions), s)
        counts = rate(base_url, trained_on, s)
        print(f"  ratings: {counts['good']} good, {counts['bad']} bad ({counts['corrected']} with a correction)")
        heldout = collect(base_url, served, demo_eval_prompts(s.heldout_questions, seed=7), s)
        rows_path, heldout_pairs, n_heldout = heldout_files(out, heldout)
        print(f"  held-out: {len(heldout)} questions, {n_heldout} pairs ({heldout_pairs})")

        _banner("3/5 aigc feedback export --pairs", t0)
        exported = export_feedback(sft_cfg, output=pairs_path, policy=None, pairs=True)

        _banner(f"4/5 DPO: the pipeline's feedback round from {sft.registry_id} (also the reference)", t0)
        dpo = run_pipeline(dpo_cfg)
    finally:
        serve.shutdown()

    _banner(f"5/5 aigc eval: {sft.registry_id} (SFT) vs {dpo.registry_id} (DPO) on held-out data", t0)
    eval_cfg = with_values(dpo_cfg, {"generate.input": rows_path, "generate.eval_pairs": heldout_pairs,
                                     "generate.max_tokens": s.max_tokens})  # fmt: skip
    report = run_eval(eval_cfg, [sft.registry_id, dpo.registry_id])
    print(eval_table(report))
    result = {"sft": sft.registry_id, "dpo": dpo.registry_id, "pairs": getattr(exported, "pairs", None),
              "ratings": counts, "heldout_pairs": n_heldout, "eval": report,
              "elapsed_s": round(time.time() - t0, 1)}  # fmt: skip
    storage.write_json(storage.join(out, "preference_report.json"), result, indent=1)
    print(f"\n  report: {storage.join(out, 'preference_report.json')}; total {result['elapsed_s']:.0f}s")
    return result
