"""What each stage prints: one function per stage result, shared by the CLI and the demo.

Stage functions (``preprocess``, ``run_training``, ``run_sweep``) return results and print nothing final;
these functions turn a result into the lines a person reads.
"""

from __future__ import annotations

import time
from typing import Any

__all__ = ["registry_table", "report_export", "report_preprocess", "report_sweep", "report_train"]


def _registered(registry_id: str | None) -> str:
    return f"registered as {registry_id}" if registry_id else "not registered"


def report_preprocess(res: Any) -> None:
    """Rows in, kept, rejected by reason, token counts and where the shards went."""
    s = res.stats
    print(
        f"[preprocess] {s['rows_in']} rows in -> {s['rows_kept']} kept ({s['rows_train']} train / "
        f"{s['rows_val']} val), rejected {s['rows_rejected'] or 'none'}; {s['tokens_total']} tokens, "
        f"max {s['tokens_per_example']['max']} per example"
        + (f"; {s['seconds']:.1f} s, {s['rows_in'] / max(s['seconds'], 1e-9):.0f} rows/s" if "seconds" in s else "")
        + f"\n[preprocess] wrote {res.data_dir}"
    )


def report_train(res: Any, per_epoch: bool = False) -> None:
    """Eval loss before -> after (and each epoch with ``per_epoch``), the adapter and its registry id."""
    if per_epoch:
        for h in res.history:
            ev, secs = h.get("eval_loss", float("nan")), h["train_time_s"]
            print(f"  epoch {h['epoch']} (step {h['step']}): train loss {h['train_loss']:.4f}  eval loss {ev:.4f}  "
                  f"({secs:.1f}s)")  # fmt: skip
    m = res.metrics
    nan = float("nan")
    print(
        f"[train] eval loss {m.get('initial_eval_loss') or nan:.4f} -> {m.get('eval_loss', nan):.4f} "
        f"(perplexity {m.get('eval_perplexity', nan):.2f}) after {m.get('epoch')} epochs\n"
        f"[train] model: {res.adapter_dir}; {_registered(res.registry_id)}"
    )


def report_sweep(res: Any) -> None:
    """The trials table, the plots and best config written, the best trial's values and registry id."""
    print(f"\n[sweep] {res.sweep_id} trials (best first):\n" + res.trials.to_string(float_format=lambda x: f"{x:.4g}"))
    for path in res.plots:
        print(f"[sweep] plot: {path}")
    loss = res.best_metrics.get("eval_loss")
    shown = f"{loss:.4f}" if isinstance(loss, float) else "n/a"
    print(f"[sweep] best {res.best_overrides}: eval loss {shown}; config: {res.best_config_path}\n"
          f"[sweep] model: {res.adapter_dir}; {_registered(res.registry_id)}")  # fmt: skip


_COLUMNS = ("model", "kind", "base model", "data", "eval_loss", "created")


def registry_table(entries: list[Any]) -> str:
    """Registered versions as an aligned text table: id, kind, base model, data fingerprint (short), eval loss
    and creation time (local), oldest first per name."""
    if not entries:
        return "(no registered models)"
    rows = [_COLUMNS]
    for e in entries:
        loss = e.metrics.get("eval_loss")
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created_at)) if e.created_at else "-"
        rows.append((e.model_id, e.kind, e.base_model, (e.data_hash or "-")[:10],
                     f"{loss:.4f}" if isinstance(loss, int | float) else "-", created))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)


def report_export(res: Any) -> None:
    """Which registered model went where, merged or not."""
    what = "merged model" if res.merged else ("adapter" if res.entry.kind == "lora" else "model")
    print(f"[export] {res.entry.model_id} ({res.entry.kind}, base {res.entry.base_model}) -> {what} in {res.out_dir}")
