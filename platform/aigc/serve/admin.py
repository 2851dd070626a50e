"""``POST /v1/adapters`` and ``DELETE /v1/adapters/NAME``: load a LoRA adapter into the running servers by name,
and take it away, without registering a version (what vLLM's ``load_lora_adapter`` offers).

Only an admin key may call them (``aigc keys add NAME --admin``): a server without API keys refuses them,
whatever address it binds, because loading weights from a path is an administrator's act. The record is written
next to the registry (:mod:`aigc.registry.runtime`), so every replica serves the name; the adapter is loaded
into one generator replica before the answer, so one that cannot load (another base model's shapes, no weights)
is refused here with its reason and no record is kept. ``GET /v1/models`` lists it with its base model as
``parent``.

The body takes this platform's names or vLLM's: ``{"name": ..., "path": ...}`` or
``{"lora_name": ..., "lora_path": ...}``; ``path`` is a local directory or an ``s3://``/``gs://`` URI holding a
PEFT adapter (``adapter_config.json`` and its weights).
"""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from aigc import storage
from aigc.errors import AdapterLoadError, InvalidRequestError, RegistryError
from aigc.registry.runtime import ServedModels
from aigc.serve.api_errors import ApiError, api_error_from
from aigc.serve.keys import KeyPolicy
from aigc.serve.responses import ModelCard

__all__ = ["AdapterAdmin", "LoadAdapterRequest"]


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(validation_alias=AliasChoices("name", "lora_name"), min_length=1, max_length=64)
    path: str = Field(validation_alias=AliasChoices("path", "lora_path"), min_length=1, max_length=1024)


def _forbidden(message: str) -> ApiError:
    return ApiError(403, message, type="permission_error", code="admin_required")


class AdapterAdmin:
    """The two routes' work, given the ingress's model store, generator handle and base model ids."""

    def __init__(self, served: ServedModels, generator: Any, base_model_id: str, base_model_name: str):
        self._served, self._generator = served, generator
        self._base_id, self._base_name = base_model_id, base_model_name

    @staticmethod
    def check_admin(keys_on: bool, policy: KeyPolicy) -> None:
        """Raises 403 unless the caller holds an admin key."""
        if not keys_on:
            raise _forbidden(
                "loading adapters needs an admin API key, and this server runs without keys: add one with "
                "`aigc keys add NAME --admin` and serve with serve.api_keys_file"
            )
        if not policy.admin:
            raise _forbidden("this API key may not load or unload adapters (an admin key may: aigc keys add --admin)")

    async def load(self, body: LoadAdapterRequest, key: str | None) -> ModelCard:
        """Record, load into one replica, and describe the adapter; 400/409 naming what is wrong."""
        name, path = body.name, body.path
        if name == self._base_id:
            raise ApiError(409, f"'{name}' is the base model's id: choose another name", param="name",
                           code="name_taken")  # fmt: skip
        try:
            registered = await asyncio.to_thread(self._served.registry.versions, name)
        except RegistryError as exc:
            raise ApiError(400, f"invalid adapter name: {exc}", param="name", code="invalid_name") from None
        if registered:
            raise ApiError(409, f"'{name}' is a registered model ({len(registered)} version(s)): load the adapter "
                           "under another name, or register it as a new version", param="name",
                           code="name_taken")  # fmt: skip
        config = storage.join(path, "adapter_config.json")
        try:
            found = await asyncio.to_thread(storage.is_file, config)
        except (OSError, ValueError) as exc:
            raise ApiError(400, f"cannot read {path}: {exc}", param="path", code="adapter_not_found") from None
        if not found:
            raise ApiError(400, f"no PEFT adapter at {path} (no adapter_config.json there)", param="path",
                           code="adapter_not_found")  # fmt: skip
        entry = await asyncio.to_thread(self._served.runtime.add, name, path, self._base_name, key)
        try:
            await self._generator.options(multiplexed_model_id=name).warm_adapter.remote()
        except Exception as exc:
            await asyncio.to_thread(self._served.runtime.remove, name)
            cause = getattr(exc, "cause", None) or exc
            if not isinstance(cause, AdapterLoadError | InvalidRequestError):
                raise api_error_from(exc, name) from None
            # the caller is an administrator who gave this path: the reason is theirs to see
            raise ApiError(400, f"the adapter at {path} did not load: {cause}", param="path",
                           code="adapter_load_failed") from None  # fmt: skip
        return ModelCard(id=name, created=int(entry.created_at), root=name, parent=self._base_id)

    async def unload(self, name: str) -> dict[str, Any]:
        """Delete the record (404 when there is none). Every ingress replica stops resolving the name within
        ``serve.resolve_cache_s`` and every generator replica unloads it within its sweep period (2 s): until
        then a request may still be answered by it, as after an alias move."""
        try:
            removed = await asyncio.to_thread(self._served.runtime.remove, name)
        except RegistryError as exc:
            raise ApiError(400, f"invalid adapter name: {exc}", param="name", code="invalid_name") from None
        if not removed:
            raise ApiError(404, f"no adapter named '{name}' was loaded with POST /v1/adapters", param="name",
                           code="model_not_found")  # fmt: skip
        return {"id": name, "object": "model", "deleted": True}
