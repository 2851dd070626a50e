"""The pipeline's last stage: ask the served name one question through the ``openai`` client.

It passes when the answer is not empty and comes from the version just registered (the response's ``model``
names the version that answered): that proves the app is up, the adapter loads and the alias move reached
traffic. The endpoint caches an alias for ``serve.resolve_cache_s``, so a stale answer is asked again until
``timeout_s``.
"""

from __future__ import annotations

import time
from typing import Any

from aigc.errors import AigcError

__all__ = ["SmokeTestError", "smoke_test"]


class SmokeTestError(AigcError, RuntimeError):
    """The served model did not answer as the pipeline expected (or not at all)."""


def smoke_test(
    base_url: str, model: str, expect: str, prompt: str, max_tokens: int = 16, timeout_s: float = 30.0
) -> dict[str, Any]:
    """Ask ``model`` ``prompt`` at ``base_url`` until version ``expect`` answers (or ``timeout_s`` passes).

    Returns:
        ``{"model", "answered_by", "answer", "latency_s"}``.

    Raises:
        SmokeTestError: the answer is empty, or another version kept answering.
    """
    import openai

    from aigc.serve.client import ask, openai_client

    client = openai_client(base_url)
    deadline = time.monotonic() + timeout_s
    while True:
        t0 = time.monotonic()
        try:
            r = ask(client, model, prompt, max_tokens)
        except openai.OpenAIError as exc:  # connection refused, 4xx/5xx: one line, the server's own message
            raise SmokeTestError(f"asking {model!r} at {base_url} failed: {type(exc).__name__}: {exc}") from None
        answer, answered_by = r.choices[0].message.content or "", r.model
        if answered_by == expect or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    if answered_by != expect:
        raise SmokeTestError(
            f"{model!r} at {base_url} is answered by {answered_by!r}, not the new {expect!r}, after {timeout_s:.0f}s: "
            f"check the alias (aigc registry) and the app's registry_dir"
        )
    if not answer.strip():
        raise SmokeTestError(f"{model!r} at {base_url} answered {prompt!r} with empty text")
    return {"model": model, "answered_by": answered_by, "answer": answer, "latency_s": round(time.monotonic() - t0, 3)}
