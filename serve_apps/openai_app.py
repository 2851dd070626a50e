"""Serve entry point: ``serve run serve_apps/openai.yaml`` imports ``serve_apps.openai_app:build_app``.

The application lives in the library (:mod:`aigc.serve.builder`); this file only names it for Serve.
"""

from aigc.serve.builder import build_app

__all__ = ["build_app"]
