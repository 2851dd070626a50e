"""Typed configuration: one schema for every stage, loaded from YAML with ``section.key=value`` overrides.

- :mod:`aigc.config.section`: the base of every section (unknown keys are errors);
- :mod:`aigc.config.schema`: the stage sections (data, model, LoRA, train, tune, tracking, pipeline, cluster)
  and :class:`PlatformConfig`, the whole run;
- :mod:`aigc.config.serving`: the ``serve`` section (autoscaling, moderation, keys, limits);
- :mod:`aigc.config.loading`: YAML loading, overrides, path resolution, validation with readable errors.

Import from here: ``from aigc.config import PlatformConfig, load_config``.
"""

from aigc.config.loading import *  # noqa: F403
from aigc.config.loading import __all__  # noqa: F401
