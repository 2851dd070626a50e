"""Preference losses (DPO and its hinge/IPO variants, ORPO) on chosen/rejected answer pairs, and their metrics.

A preference batch holds each pair as two rows of one padded batch, chosen rows first, then the rejected rows in
the same order (``[c_0 .. c_{B-1}, r_0 .. r_{B-1}]``), so one forward pass scores both answers. Only answer tokens
count: a label of -100 (the prompt, padding) is left out of every log-probability, as in SFT.

The formulas are TRL's (``DPOTrainer._compute_loss``, ``ORPOTrainer.odds_ratio_loss``, TRL 1.16), and
``tests/test_preference.py`` checks the loss and metrics against TRL's trainers on the same batch and model. One
choice differs on purpose: ORPO's NLL term counts answer tokens only (the paper's ``L_SFT``, and this platform's rule
for SFT), where TRL's ORPO trainer also counts prompt tokens.

The DPO reference model of a LoRA run is the same peft model with its adapters disabled (:func:`reference_logps`):
no second copy of the weights in memory, one extra forward pass without gradients per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from aigc.config import TrainConfig
from aigc.train.init_adapter import REFERENCE_ADAPTER
from aigc.train.losses import all_reduce

__all__ = [
    "DPO_LOSS_TYPES",
    "PAIR_SUM_KEYS",
    "PairOutput",
    "PreferenceLoss",
    "adapters_disabled",
    "answer_logps",
    "dpo_loss",
    "orpo_loss",
    "pair_metric_sums",
    "pair_metrics",
    "evaluate_pairs",
    "preference_loss",
    "reference_logps",
]

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge", "ipo")
"""DPO variants: ``sigmoid`` (the DPO paper), ``hinge`` (SLiC), ``ipo`` (IPO, log-ratios averaged per token)."""


@dataclass(frozen=True)
class PreferenceLoss:
    """What a preference step optimises (plain values, built from ``train.preference`` by the caller).

    Args:
        method: ``dpo`` (needs a reference: the base with adapters disabled) or ``orpo`` (no reference).
        beta: DPO: how far the policy may move from the reference (higher = stays closer); ORPO: the weight of
            the odds-ratio term against the NLL of the chosen answer (TRL's ``beta``, the paper's lambda).
        loss_type: the DPO variant, one of :data:`DPO_LOSS_TYPES` (ignored by ORPO).
    """

    method: Literal["dpo", "orpo"] = "dpo"
    beta: float = 0.1
    loss_type: Literal["sigmoid", "hinge", "ipo"] = "sigmoid"

    @classmethod
    def of(cls, train: TrainConfig) -> PreferenceLoss | None:
        """The loss ``train.preference`` asks for; None for supervised fine-tuning."""
        p = train.preference
        return cls(p.method, p.beta, p.loss_type) if p.method else None

    def __post_init__(self) -> None:
        if self.method not in ("dpo", "orpo"):
            raise ValueError(f"preference method must be 'dpo' or 'orpo', got {self.method!r}")
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"DPO loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {self.loss_type!r}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")


@dataclass
class PairOutput:
    """One batch's loss and the per-pair values its metrics are made of (all detached except ``loss``).

    ``chosen_rewards``/``rejected_rewards``: DPO: ``beta * (logp_policy - logp_reference)`` summed over the answer;
    ORPO: ``beta * mean log-probability per answer token`` (TRL's definitions). ``chosen_logps``/``rejected_logps``:
    the policy's summed answer log-probabilities (DPO) or their per-token means (ORPO), as TRL logs them.
    """

    loss: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    nll: torch.Tensor | None = None  # ORPO: mean NLL per chosen answer token


def _unwrap(model: Any) -> Any:
    """The model under a DDP/FSDP wrapper (``.module``), else ``model``."""
    return getattr(model, "module", model)


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """The base model's forward inside: a peft model's adapters are switched off (the DPO reference for LoRA).

    Raises:
        ValueError: ``model`` has no adapters to disable (a full fine-tune needs a separate reference model).
    """
    inner = _unwrap(model)
    if not hasattr(inner, "disable_adapter"):
        raise ValueError(
            "DPO needs a reference model: with LoRA it is the base with adapters disabled, but this model has no "
            "adapters. Train with train.method=dpo and LoRA, or use train.method=orpo (no reference)."
        )
    with inner.disable_adapter():
        yield


def answer_logps(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's summed log-probability of its answer tokens (labels != -100), and how many there were.

    ``batch``: ``input_ids``, ``attention_mask`` and ``labels`` of shape ``[rows, seq]``. Log-probabilities are
    taken in float32 whatever the model's dtype (as TRL does with autocast off).
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    counted = labels != -100
    token_logps = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token_logps * counted).sum(-1), counted.sum(-1)


@torch.no_grad()
def reference_logps(model: Any, batch: dict[str, torch.Tensor], ref_model: Any = None) -> torch.Tensor:
    """The reference model's summed answer log-probabilities: ``ref_model`` when given; the frozen
    :data:`~aigc.train.init_adapter.REFERENCE_ADAPTER` when the run started from an adapter; else ``model`` with
    its adapters disabled (LoRA: the base model, without a second copy of the weights)."""
    if ref_model is not None:
        return answer_logps(ref_model, batch)[0]
    inner = _unwrap(model)
    if REFERENCE_ADAPTER in (getattr(inner, "peft_config", None) or {}):  # a run from train.init_adapter
        inner.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
        try:
            return answer_logps(inner, batch)[0]
        finally:
            inner.set_adapter("default")  # trainable again
    with adapters_disabled(model):  # the wrapped module itself: a DDP forward here would expect a backward
        return answer_logps(_unwrap(model), batch)[0]


def dpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    beta: float,
    loss_type: str = "sigmoid",
    chosen_tokens: torch.Tensor | None = None,
    rejected_tokens: torch.Tensor | None = None,
) -> PairOutput:
    """DPO loss (mean over pairs) from summed answer log-probabilities of policy and reference.

    Args:
        chosen_tokens, rejected_tokens: answer token counts per pair; needed by ``ipo``, which averages the
            log-ratios per token (TRL's normalisation).
    """
    chosen_ratio = chosen_logps - ref_chosen_logps
    rejected_ratio = rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type 'ipo' needs the answer token counts (chosen_tokens, rejected_tokens)")
        per_token = chosen_ratio / chosen_tokens.clamp(min=1) - rejected_ratio / rejected_tokens.clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"DPO loss_type must be one of {', '.join(DPO_LOSS_TYPES)}; got {loss_type!r}")
    return PairOutput(
        loss=losses.mean(),
        chosen_rewards=(beta * chosen_ratio).detach(),
        rejected_rewards=(beta * rejected_ratio).detach(),
        chosen_logps=chosen_logps.detach(),
        rejected_logps=rejected_logps.detach(),
    )


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, stable on both sides of ``-ln 2``."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor, nll: torch.Tensor, beta: float
) -> PairOutput:
    """ORPO loss: ``nll - beta * mean(log sigmoid(log odds(chosen) - log odds(rejected)))``.

    Args:
        chosen_mean_logps, rejected_mean_logps: mean log-probability per answer token of each pair's answers.
        nll: the mean NLL per chosen answer token over the batch (the SFT term).
    """
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))
    return PairOutput(
        loss=nll - beta * F.logsigmoid(log_odds).mean(),
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
        chosen_logps=chosen.detach(),
        rejected_logps=rejected.detach(),
        nll=nll.detach(),
    )


def preference_loss(
    model: Any, batch: dict[str, torch.Tensor], spec: PreferenceLoss, ref_model: Any = None
) -> PairOutput:
    """One preference batch (chosen rows, then rejected rows) through ``model``: the loss and its pair values.

    DPO runs a second, gradient-free forward for the reference (:func:`reference_logps`); ORPO needs none.
    """
    ref = reference_logps(model, batch, ref_model) if spec.method == "dpo" else None  # before the policy's graph
    logps, counts = answer_logps(model, batch)
    chosen, rejected = logps.chunk(2)
    chosen_n, rejected_n = counts.chunk(2)
    if ref is None:
        nll = -chosen.sum() / chosen_n.sum().clamp(min=1)
        return orpo_loss(chosen / chosen_n.clamp(min=1), rejected / rejected_n.clamp(min=1), nll, spec.beta)
    ref_chosen, ref_rejected = ref.chunk(2)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected, spec.beta, spec.loss_type, chosen_n, rejected_n)


PAIR_SUM_KEYS = ("pairs", "loss", "reward_accuracy", "reward_margin", "rewards_chosen", "rewards_rejected",
             "logps_chosen", "logps_rejected")  # fmt: skip


def pair_metric_sums(out: PairOutput) -> dict[str, float]:
    """Sums over a batch's pairs (add them across batches and workers, then :func:`pair_metrics`): exact means
    over every pair seen, not means of batch means."""
    margin = out.chosen_rewards - out.rejected_rewards
    return {
        "pairs": float(margin.numel()),
        "loss": float(out.loss.detach()) * margin.numel(),
        "reward_accuracy": float((margin > 0).float().sum()),
        "reward_margin": float(margin.sum()),
        "rewards_chosen": float(out.chosen_rewards.sum()),
        "rewards_rejected": float(out.rejected_rewards.sum()),
        "logps_chosen": float(out.chosen_logps.sum()),
        "logps_rejected": float(out.rejected_logps.sum()),
    }


def pair_metrics(sums: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Means per pair from :func:`pair_metric_sums` (summed over batches), keys prefixed (``eval_``, ``train_``)."""
    n = max(sums.get("pairs", 0.0), 1.0)
    return {f"{prefix}{k}": v / n for k, v in sums.items() if k != "pairs"}


@torch.no_grad()
def evaluate_pairs(
    model: Any, batches: Any, device: torch.device, spec: PreferenceLoss, autocast: Any = None
) -> dict[str, float]:
    """The preference loss and pair metrics on the val split (``eval_loss``, ``eval_reward_accuracy``, ...), exact
    means over every pair of every worker."""
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {}
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast() if autocast else contextlib.nullcontext():
            part = pair_metric_sums(preference_loss(model, batch, spec))
        sums = {k: sums.get(k, 0.0) + v for k, v in part.items()}
    keys = PAIR_SUM_KEYS  # the same on every rank, even one without a batch: all_reduce needs equal shapes
    sums = dict(zip(keys, all_reduce(*[sums.get(k, 0.0) for k in keys], device=device), strict=True))
    model.train(was_training)
    return {**pair_metrics(sums, prefix="eval_"), "eval_pairs": sums["pairs"]}
