"""``aigc eval``'s likelihood scores: loss and perplexity of the reference answers, and the log-probabilities of
each preference pair's chosen and rejected answers, for one model.

Everything here is training's own code, so the numbers mean what they mean in training: rows are tokenized by the
preprocessor's actors (:class:`~aigc.data.tokenizing.Tokenize`, :class:`~aigc.data.pair_tokenizing.TokenizePairs`:
the same chat template, labels and truncation policy), batched by the trainer's collate functions, and scored by
:func:`aigc.train.preference.answer_logps` (summed log-probabilities of the answer tokens). The loss is the mean
negative log-likelihood per reference answer token, as ``eval_loss`` is in training.

One forward pass per batch of rows per model, without gradients; run as a Ray task (:func:`score_model`) so the
model is loaded on a worker, not in the driver.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from aigc import storage
from aigc.config import DataConfig, ModelConfig
from aigc.data.pair_tokenizing import TokenizePairs
from aigc.data.tokenizing import Tokenize
from aigc.models.loading import load_base_model, load_tokenizer
from aigc.train.losses import collate, collate_pairs, evaluate
from aigc.train.preference import answer_logps

__all__ = ["ModelScores", "score_model", "tokenize_pairs", "tokenize_references"]

_BATCH = 8  # rows per forward pass


@dataclass(frozen=True)
class ModelScores:
    """One model's likelihoods: the reference answers' loss (None without references) and each pair's summed
    answer log-probabilities (empty without pairs)."""

    loss: float | None
    perplexity: float | None
    chosen_logps: list[float]
    rejected_logps: list[float]


def _columns(table: Any, names: list[str]) -> dict[str, list]:
    kept = table.filter(table.column("ok"))
    return {n: kept.column(n).to_pylist() for n in names}


def tokenize_references(model: ModelConfig, data: DataConfig, raws: list[str]) -> dict[str, list]:
    """The rows of ``raws`` that have a reference answer, tokenized as training tokenizes them (``input_ids``,
    ``labels``); rows that do not fit are left out (the generation run quarantines them)."""
    if not raws:
        return {"input_ids": [], "labels": []}
    return _columns(Tokenize(model, data)({"raw": raws}), ["input_ids", "labels"])


def tokenize_pairs(model: ModelConfig, data: DataConfig, raws: list[str]) -> tuple[dict[str, list], int]:
    """Preference rows tokenized as preference training tokenizes them, and how many rows were left out."""
    table = TokenizePairs(model, data)({"raw": raws})
    cols = _columns(table, ["input_ids", "labels", "rejected_ids", "rejected_labels"])
    return cols, len(raws) - len(cols["input_ids"])


def _load(model: ModelConfig, adapter_uri: str | None, device: str) -> Any:
    from peft import PeftModel

    base = load_base_model(model.load_path(), dtype=model.dtype, device=device,
                           trust_remote_code=model.trust_remote_code)  # fmt: skip
    if adapter_uri is None:
        return base
    return PeftModel.from_pretrained(base, storage.local_dir(adapter_uri)).eval()


def _score(model: ModelConfig, adapter_uri: str | None, refs: dict[str, list], pairs: dict[str, list]) -> ModelScores:

    tok = load_tokenizer(model.load_path(), model.trust_remote_code)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray hides GPUs from a task without num_gpus
    lm = _load(model, adapter_uri, device)
    n_refs = len(refs["input_ids"])
    batches = (collate({k: v[b : b + _BATCH] for k, v in refs.items()}, pad) for b in range(0, n_refs, _BATCH))
    loss = evaluate(lm, batches, torch.device(device))["eval_loss"] if n_refs else None  # training's eval_loss
    chosen: list[float] = []
    rejected: list[float] = []
    with torch.no_grad():
        for b in range(0, len(pairs.get("input_ids", [])), _BATCH):
            batch = collate_pairs({k: v[b : b + _BATCH] for k, v in pairs.items()}, pad)
            c, r = (
                answer_logps(lm, {k: v.to(device) for k, v in batch.items()})[0].float().cpu().chunk(2)
            )  # chosen rows first, then the rejected ones
            chosen += c.tolist()
            rejected += r.tolist()
    return ModelScores(loss, None if loss is None else math.exp(min(loss, 50.0)), chosen, rejected)


def score_model(
    model: ModelConfig, adapter_uri: str | None, refs: dict[str, list], pairs: dict[str, list], num_gpus: float = 0.0
) -> ModelScores:
    """:class:`ModelScores` of the base model with ``adapter_uri`` (None = the base alone), computed in a Ray task
    (the caller has joined the cluster) with ``num_gpus`` GPUs."""
    import ray

    task = ray.remote(num_cpus=1, num_gpus=num_gpus)(_score)
    return ray.get(task.remote(model, adapter_uri, refs, pairs))
