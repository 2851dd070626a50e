"""Talking to the served app through the official ``openai`` client (the demo's chats, the pipeline's smoke test).

The server is the OpenAI-compatible app of :mod:`aigc.serve`; ``api_key`` is any text until the server checks
keys (``serve.auth``), then one of its keys: given, or from ``AIGC_API_KEY`` (never ``OPENAI_API_KEY``, which
may hold a key for another service).
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["ask", "openai_client"]


def openai_client(base_url: str, api_key: str | None = None, timeout: float = 60.0) -> Any:
    """An ``openai.OpenAI`` client for ``base_url`` (``http://host:port/v1``), one retry."""
    from openai import OpenAI

    key = api_key or os.environ.get("AIGC_API_KEY") or "not-needed-locally"
    return OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=1)


def ask(client: Any, model: str, question: str, max_tokens: int = 48, stream: bool = False) -> Any:
    """One user message to ``model``, greedy; the ChatCompletion (or the chunk stream with ``stream``)."""
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=stream,
    )
