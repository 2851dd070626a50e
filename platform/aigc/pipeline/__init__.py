"""One resumable command from a dataset to a served, promoted adapter (``aigc pipeline``).

``fingerprint`` hashes a stage's inputs, ``state`` keeps each stage's last outcome, ``runner`` runs stages and
skips the unchanged ones, ``stages`` defines the platform's stages, ``smoke`` checks the endpoint, ``run`` is
the command.
"""

from aigc.pipeline.run import PipelineResult, run_pipeline
from aigc.pipeline.runner import Stage, StageOutcome, run_stages

__all__ = ["PipelineResult", "Stage", "StageOutcome", "run_pipeline", "run_stages"]
