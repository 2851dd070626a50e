"""The model lifecycle: the registry of trained versions, their aliases, and exports that open without this
platform.

- :mod:`aigc.registry.store`: name -> versions -> {weights, base model, metrics, config, data hash};
- :mod:`aigc.registry.aliases`: movable names (``support-bot:stable``) with their history;
- :mod:`aigc.registry.export`: a registered version as a plain or merged model directory.

Publishing a training run into the registry is the trainer's job (:mod:`aigc.train.publish`): it knows the
checkpoint layout.
"""

from aigc.registry.store import AdapterVersion, Alias, Registry, RegistryError, model_kind

__all__ = ["AdapterVersion", "Alias", "Registry", "RegistryError", "model_kind"]
