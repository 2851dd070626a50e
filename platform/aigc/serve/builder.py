"""Build the OpenAI-compatible Serve app from a platform config (what `serve_apps/` and `aigc serve` call)."""

from __future__ import annotations

from typing import Any

from ray import serve

from aigc.config import PlatformConfig, load_config
from aigc.errors import ConfigError
from aigc.feedback.store import feedback_dir_for
from aigc.models.hub import resolve_model
from aigc.models.loading import model_id_for
from aigc.serve.auth import check_exposure, proxy_bind_host
from aigc.serve.generator import Generator
from aigc.serve.ingress import INGRESS_MAX_ONGOING, OpenAIIngress

__all__ = ["build_app", "build_app_from_config"]


def build_app_from_config(cfg: PlatformConfig) -> serve.Application:
    """The OpenAI app for a platform config: its ``model``, ``registry_dir`` and ``serve`` sections.

    The base model is resolved here, once (a hub id pinned to one commit and downloaded where this runs):
    replicas load that snapshot, while clients keep naming it by its hub id.

    Raises:
        aigc.errors.ConfigError: ``serve.host``, or the address the running Serve proxy binds (a Serve YAML's
            ``http_options.host``), is reachable from other machines and no API keys are configured.
        aigc.errors.ModelUnavailableError: the base model cannot be had.
    """
    s = cfg.serve
    check_exposure(s.host, s.auth, s.api_keys_file, s.api_keys_env)
    bound = proxy_bind_host(s.host)  # `serve run app.yaml` binds its http_options.host, whatever serve.host says
    if bound != s.host:
        what = "the Serve HTTP proxy's bind address (http_options.host)"
        check_exposure(bound, s.auth, s.api_keys_file, s.api_keys_env, what=what)
    model = resolve_model(cfg.model, weights=True)
    base_model_id = s.base_model_id or model_id_for(cfg.model.name_or_path)
    generator = Generator.options(
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        max_surge_percent=s.max_surge_percent,
        autoscaling_config=s.autoscaling.model_dump(),
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        graceful_shutdown_timeout_s=s.graceful_shutdown_s,
        health_check_period_s=s.health_check_period_s,
    ).bind(
        model_name_or_path=model.load_path(),
        registry_dir=cfg.registry_dir,
        base_model_id=base_model_id,
        dtype=cfg.model.dtype,
        trust_remote_code=cfg.model.trust_remote_code,
        max_adapters=s.max_adapters_per_replica,
        max_batch_size=s.max_batch_size,
        max_replicas=s.autoscaling.max_replicas,
        max_prompt_tokens=s.max_prompt_tokens,
        stall_timeout_s=s.engine_stall_timeout_s,
        adapter_retry_s=s.adapter_retry_s,
        quantization=s.quantization,
    )
    ingress = OpenAIIngress.options(
        num_replicas=s.ingress_replicas,
        max_ongoing_requests=INGRESS_MAX_ONGOING,
        max_surge_percent=s.max_surge_percent,
        graceful_shutdown_timeout_s=s.graceful_shutdown_s,
    )
    return ingress.bind(
        generator,
        base_model_id=base_model_id,
        registry_dir=cfg.registry_dir,
        max_tokens_cap=s.max_tokens_cap,
        default_max_tokens=s.default_max_tokens,
        moderation=s.moderation,
        security=s,  # key sources only, never keys: the replica reads the keys
        feedback_dir=feedback_dir_for(s.feedback_dir, cfg.output_dir) if s.capture else None,
        resolve_cache_s=s.resolve_cache_s,
        base_model_name=model_id_for(cfg.model.name_or_path),
        request_timeout_s=s.request_timeout_s,
    )


def build_app(args: dict[str, Any] | None) -> serve.Application:
    """Build the OpenAI-compatible app from Serve config ``args``.

    ``args`` names a platform config file (plus optional ``section.key=value`` overrides), or gives its
    sections inline, or both (inline sections are merged into the file as objects, ``overrides`` win over
    both)::

        # serve run serve_apps/openai.yaml   (or: serve deploy serve_apps/openai.yaml)
        applications:
          - name: aigc
            route_prefix: /
            import_path: serve_apps.openai_app:build_app
            args:
              config: configs/demo.yaml
              overrides: ["serve.max_tokens_cap=128"]
              # or inline, without a file:
              # model: {name_or_path: assets/tiny-base}
              # registry_dir: runs/registry
              # serve: {max_adapters_per_replica: 8, autoscaling: {max_replicas: 4}}

    Raises:
        aigc.errors.ConfigError: ``args`` or the config is invalid; the message names the field.
    """
    if args is None:  # `args:` left empty in the YAML
        args = {}
    if not isinstance(args, dict):
        raise ConfigError(f"Serve args must be a mapping of config sections, got {type(args).__name__}")
    inline = dict(args)
    path = inline.pop("config", None)
    if path is not None and not isinstance(path, str):
        raise ConfigError(f"args.config must be the path of a config file, got {type(path).__name__}")
    overrides = inline.pop("overrides", None) or []
    # A lone string would otherwise be taken apart character by character.
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError(f"args.overrides must be a list of 'section.key=value' strings, got {overrides!r}")
    return build_app_from_config(load_config(path, overrides, inline=inline))
