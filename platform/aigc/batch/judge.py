"""The optional judge of ``aigc eval``: any OpenAI-compatible chat endpoint (a hosted model, or a model this
platform serves) asked which of two answers to a prompt is better.

The reference model's answer is A on even rows and B on odd rows, so a judge that prefers a position favours
neither model. A reply that names neither letter counts as a tie (half a win), as does a failed request after
the error is printed once: a flaky judge lowers the signal, never the run.
"""

from __future__ import annotations

import json
import os
import urllib.request
from typing import Any

from aigc.config import JudgeConfig

__all__ = ["judge_win_rate", "verdict"]


def verdict(reply: str) -> str | None:
    """``A`` or ``B`` from a judge's reply (the first of them that stands alone), else None."""
    for word in reply.replace(".", " ").replace(":", " ").split():
        if word.strip("*\"'()").upper() in ("A", "B"):
            return word.strip("*\"'()").upper()
    return None


def _ask(judge: JudgeConfig, content: str) -> str:
    headers = {"Content-Type": "application/json"}
    if judge.api_key_env:
        headers["Authorization"] = f"Bearer {os.environ.get(judge.api_key_env, '')}"
    body = {"model": judge.model, "messages": [{"role": "user", "content": content}], "max_tokens": judge.max_tokens,
            "temperature": 0}  # fmt: skip
    request = urllib.request.Request(judge.url.rstrip("/") + "/chat/completions", json.dumps(body).encode(), headers)
    with urllib.request.urlopen(request, timeout=judge.timeout_s) as response:  # noqa: S310 (the configured judge)
        data: dict[str, Any] = json.loads(response.read())
    return str(data["choices"][0]["message"]["content"] or "")


def judge_win_rate(judge: JudgeConfig, prompts: list[str], reference: list[str], answers: list[str]) -> float | None:
    """Share of ``prompts`` on which the judge prefers ``answers`` over the reference model's (ties half); None
    without prompts."""
    if not prompts:
        return None
    wins, warned = 0.0, False
    for i, (prompt, ref, ans) in enumerate(zip(prompts, reference, answers, strict=True)):
        a, b = (ref, ans) if i % 2 == 0 else (ans, ref)
        try:
            choice = verdict(_ask(judge, judge.prompt.format(prompt=prompt, a=a, b=b)))
        except (OSError, ValueError, KeyError, IndexError, TypeError) as exc:
            if not warned:
                print(f"[eval] judge request failed ({type(exc).__name__}: {exc}); counted as a tie", flush=True)
                warned = True
            choice = None
        model_letter = "B" if i % 2 == 0 else "A"
        wins += 0.5 if choice is None else float(choice == model_letter)
    return wins / len(prompts)
