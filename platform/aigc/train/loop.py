"""The per-worker training loop that Ray Train runs on every worker (one DDP rank each).

It only trains: the driver (:mod:`aigc.train.trainer`) builds the scaling, run and failure configs. Every
epoch it reports train loss, eval loss and perplexity, and a checkpoint (adapter + optimizer state +
history) from rank 0. On a restart, ``ray.train.get_checkpoint()`` hands back the last one and the loop
continues from the next epoch with the same schedule, so a resumed run ends at the same step count.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from aigc.config import LoraConfig, ModelConfig, TrainConfig
from aigc.train import model_setup

__all__ = [
    "ADAPTER_SUBDIR",
    "HISTORY_FILE",
    "STATE_FILE",
    "WorkerConfig",
    "collate",
    "evaluate",
    "token_losses",
    "train_loop_per_worker",
]

ADAPTER_SUBDIR = "adapter"
STATE_FILE = "train_state.pt"
HISTORY_FILE = "history.json"


@dataclass(frozen=True)
class WorkerConfig:
    """What every worker receives: the typed config sections plus facts the driver measured.

    Args:
        model, lora, train: the run's config sections, as validated objects.
        steps_per_epoch: optimizer steps per epoch (from the row count), so the LR schedule is resume-exact.
        pad_id: the tokenizer's padding id.
        has_val: whether a ``val`` dataset shard exists.
    """

    model: ModelConfig
    lora: LoraConfig
    train: TrainConfig
    steps_per_epoch: int
    pad_id: int
    has_val: bool


def collate(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch of variable-length rows; padded label positions are -100.

    Rows with ``position_ids`` (packed, :mod:`aigc.data.packing`) get them padded with 0 and no
    ``attention_mask``: transformers then reads each example's bounds from where the positions restart and masks
    attention across them (each padding token is a sequence of its own). Other rows get an ``attention_mask``.
    """
    ids, labels = batch["input_ids"], batch["labels"]
    packed = "position_ids" in batch
    width = max(len(x) for x in ids)
    out_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    out_labels = torch.full((len(ids), width), -100, dtype=torch.long)
    extra = torch.zeros((len(ids), width), dtype=torch.long)  # position ids, or the attention mask
    for i, (x, y) in enumerate(zip(ids, labels, strict=True)):
        n = len(x)
        out_ids[i, :n] = torch.as_tensor(np.asarray(x, dtype=np.int64))
        out_labels[i, :n] = torch.as_tensor(np.asarray(y, dtype=np.int64))
        extra[i, :n] = torch.as_tensor(np.asarray(batch["position_ids"][i], dtype=np.int64)) if packed else 1
    key = "position_ids" if packed else "attention_mask"
    return {"input_ids": out_ids, "labels": out_labels, key: extra}


def token_losses(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token loss at every position (0 where the label is -100), and which positions count.

    ``use_cache=False``: training needs no KV cache, and with one (the default of most model configs)
    transformers ignores packed ``position_ids`` and lets packed examples attend to each other.
    """
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    logits = model(**inputs, use_cache=False).logits
    shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]
    loss = torch.nn.functional.cross_entropy(
        shift_logits.transpose(1, 2), shift_labels, ignore_index=-100, reduction="none"
    )
    return loss, shift_labels != -100


def _token_loss_sum(model: Any, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token losses over answer tokens, and how many there were (exact, not a mean of means)."""
    loss, counted = token_losses(model, batch)
    return loss.sum(), counted.sum()


def _all_reduce(*values: float, device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(model: Any, batches: Any, device: torch.device) -> dict[str, float]:
    """Eval loss per answer token and perplexity, summed exactly across all workers."""
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0.0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        s, n = _token_loss_sum(model, batch)
        loss_sum += float(s)
        count += float(n)
    loss_sum, count = _all_reduce(loss_sum, count, device=device)
    model.train(was_training)
    loss = loss_sum / max(count, 1.0)
    return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def _save_checkpoint(
    model: Any, wc: Any, optimizer: Any, scheduler: Any, state: dict, history: list, path: str, rank: int
) -> None:
    model_setup.save_weights(model, wc, os.path.join(path, ADAPTER_SUBDIR), rank)
    optim = model_setup.optimizer_state(model, optimizer)
    if rank == 0:
        torch.save({"optimizer": optim, "scheduler": scheduler.state_dict(), **state}, os.path.join(path, STATE_FILE))
        with open(os.path.join(path, HISTORY_FILE), "w") as f:
            json.dump(history, f, indent=1)


def _load_checkpoint(model: Any, wc: Any, optimizer: Any, scheduler: Any, path: str) -> tuple[dict, list]:
    model_setup.load_weights(model, wc, os.path.join(path, ADAPTER_SUBDIR))
    state = torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)
    model_setup.load_optimizer_state(model, optimizer, state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    with open(os.path.join(path, HISTORY_FILE)) as f:
        history = json.load(f)
    return state, history


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Fine-tune on this worker's shard of the ``train`` dataset; evaluate on its shard of ``val``.

    ``config["worker"]`` is the :class:`WorkerConfig` built by :func:`aigc.train.trainer.train_loop_config`.
    """
    import ray.train
    import ray.train.torch
    from transformers import get_cosine_schedule_with_warmup

    # 1. setup: same seed on every rank so LoRA weights start identical before DDP syncs them
    wc: WorkerConfig = config["worker"]
    tc = wc.train
    torch.manual_seed(tc.seed)
    ctx = ray.train.get_context()
    rank = ctx.get_world_rank()
    device = ray.train.torch.get_device()
    model = model_setup.prepare(model_setup.build_model(wc, device), wc)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=tc.lr, weight_decay=tc.weight_decay)
    total_steps = max(1, tc.epochs * wc.steps_per_epoch)
    scheduler = get_cosine_schedule_with_warmup(optimizer, int(tc.warmup_ratio * total_steps), total_steps)

    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val") if wc.has_val else None

    def batches(shard: Any, shuffle: bool, epoch: int = 0) -> Any:
        return shard.iter_torch_batches(
            batch_size=tc.batch_size,
            collate_fn=lambda b: collate(b, wc.pad_id),
            local_shuffle_buffer_size=4 * tc.batch_size if shuffle else None,
            local_shuffle_seed=tc.seed + epoch if shuffle else None,
        )

    # 2. resume, or measure the starting point
    start_epoch, step, history = 0, 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as d:
            state, history = _load_checkpoint(model, wc, optimizer, scheduler, d)
        start_epoch, step = state["epoch"] + 1, state["step"]
    if history:
        initial_eval = history[0].get("initial_eval_loss")
    elif val_shard is not None:
        initial_eval = evaluate(model, batches(val_shard, False), device)["eval_loss"]
    else:
        initial_eval = None

    # 3. epochs: accumulate grad_accum micro-batches per optimizer step; DDP syncs only on the last one
    for epoch in range(start_epoch, tc.epochs):
        t0, loss_sum, tok_count, micro = time.time(), 0.0, 0.0, 0
        optimizer.zero_grad(set_to_none=True)
        for batch in batches(train_shard, True, epoch):
            batch = {k: v.to(device) for k, v in batch.items()}
            micro += 1
            sync = micro % tc.grad_accum == 0
            with model.no_sync() if (not sync and hasattr(model, "no_sync")) else contextlib.nullcontext():
                s, n = _token_loss_sum(model, batch)
                (s / max(int(n), 1) / tc.grad_accum).backward()
            loss_sum, tok_count = loss_sum + float(s.detach()), tok_count + float(n)
            if sync:
                torch.nn.utils.clip_grad_norm_(params, tc.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
        loss_sum, tok_count = _all_reduce(loss_sum, tok_count, device=device)
        metrics: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": loss_sum / max(tok_count, 1.0),
            "lr": scheduler.get_last_lr()[0],
            "epoch_time_s": round(time.time() - t0, 2),
            "train_tokens_per_s": round(tok_count / max(time.time() - t0, 1e-6), 1),
        }
        if val_shard is not None:
            metrics.update(evaluate(model, batches(val_shard, False), device))
            metrics["initial_eval_loss"] = initial_eval
        history.append(metrics)

        # 4. report; rank 0 alone writes the checkpoint, every rank reports (it is a collective)
        with tempfile.TemporaryDirectory() as tmp:
            _save_checkpoint(model, wc, optimizer, scheduler, {"epoch": epoch, "step": step}, history, tmp, rank)
            ckpt = ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None
            ray.train.report(metrics, checkpoint=ckpt)
