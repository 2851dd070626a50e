"""Serving: the generation engine (no Ray import), OpenAI schemas, the generator and ingress deployments
(:mod:`aigc.serve.generator`, :mod:`aigc.serve.ingress`), the app builder (:mod:`aigc.serve.builder`) and
:func:`~aigc.serve.run.run_server`. Import those modules directly; this package imports nothing eagerly.
"""
