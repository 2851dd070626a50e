"""Serving: the generation engine, OpenAI request/response schemas and starting the Serve app.

The Serve application itself (deployments, ``build_app``) lives in ``serve_apps/openai_app.py``.
"""

from aigc.serve.engine import Completion, Delta, GenerationEngine, SamplingParams
from aigc.serve.run import run_server

__all__ = ["Completion", "Delta", "GenerationEngine", "SamplingParams", "run_server"]
