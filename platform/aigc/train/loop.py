"""The per-worker training loop that Ray Train runs on every worker (one DDP/FSDP rank each).

It only trains: the driver (:mod:`aigc.train.trainer`) builds the scaling, run and failure configs. The loop
counts optimizer steps: it evaluates and reports every ``train.eval_every_steps`` and checkpoints every
``train.checkpoint_every_steps`` (and at every epoch end), stops early on an eval-loss plateau, and stops the
run with an error naming the step on a non-finite loss. On a restart, ``ray.train.get_checkpoint()`` hands back
the last checkpoint and the loop continues from the next unseen micro-batch (:mod:`aigc.train.checkpointing`).
"""

from __future__ import annotations

import contextlib
import math
import random
import tempfile
import time
from typing import Any

import numpy as np
import torch

from aigc.config import TrainConfig
from aigc.train import model_setup, optim
from aigc.train.checkpointing import TrainState, load_checkpoint, save_checkpoint
from aigc.train.context import RayTrainContext, WorkerContext
from aigc.train.gen_metrics import generation_metrics
from aigc.train.losses import all_reduce, collate_fn, evaluate, token_loss_sum
from aigc.train.preference import (
    PAIR_SUM_KEYS,
    PreferenceLoss,
    evaluate_pairs,
    pair_metric_sums,
    pair_metrics,
    preference_loss,
)
from aigc.train.progress import StepProgress
from aigc.train.tracking import Tracker
from aigc.train.worker_config import WorkerConfig

__all__ = ["NONFINITE_KEY", "run_worker", "train_loop_per_worker"]

NONFINITE_KEY = "nonfinite_loss_step"  # returned instead of raising, so Ray Train does not retry a diverged run


# The most memory a worker spends keeping its val batches between evaluations (larger val shards stream).
VAL_CACHE_BYTES = 256 * 2**20


def _seed(seed: int) -> None:
    """Same seed on every rank, so weights start identical before DDP syncs them."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class _Run:
    """One worker's training run: model, optimizer, data and the position in it."""

    def __init__(self, wc: WorkerConfig, ctx: WorkerContext) -> None:
        self.wc, self.tc, self.ctx = wc, wc.train, ctx
        _seed(self.tc.seed)
        self.rank, self.world_size = ctx.world_rank(), ctx.world_size()
        self.device = ctx.device()
        self.model = ctx.prepare_model(model_setup.build_model(wc, self.device), wc)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = optim.build_optimizer(self.model, self.tc)
        self.scaler = model_setup.grad_scaler(self.model, wc)  # fp16 loss scaling; a pass-through otherwise
        self.scheduler = optim.build_scheduler(self.optimizer, self.tc, wc.total_steps)
        self.train_shard = ctx.dataset_shard("train")
        self.val_shard = ctx.dataset_shard("val") if wc.has_val else None
        self.pref = PreferenceLoss.of(self.tc)  # DPO/ORPO on preference pairs; None = SFT
        self.pair_sums: dict[str, float] = {}  # preference metrics of the train steps since the last report
        self.collate = collate_fn(wc.pad_id, pairs=self.pref is not None)  # one object for every pass
        self._val_cache: list[dict[str, torch.Tensor]] | None = None
        self._val_cacheable = True
        self.state, self.resumed = TrainState(), False
        checkpoint = ctx.checkpoint()
        if checkpoint:
            with checkpoint.as_directory() as d:
                self.state = load_checkpoint(d, self.model, wc, self.optimizer, self.scheduler, self.rank)
            self.resumed = True
        self.tracker = Tracker.disabled()
        if self.rank == 0 and wc.tracking is not None:  # a restarted attempt continues the same tracked run
            self.tracker = Tracker.open(
                wc.tracking, wc.output_dir, wc.run_name, wc.params, parent_run_id=wc.parent_run_id, resume=True
            )

    def loss_sum(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """SFT: the summed loss of the answer tokens and their count; DPO/ORPO: the batch's loss times its pairs,
        and the pairs (so a step's loss is an exact mean over pairs, as SFT's is over tokens)."""
        if self.pref is None:
            return token_loss_sum(self.model, batch)
        out = preference_loss(self.model, batch, self.pref)
        self.pair_sums = {k: self.pair_sums.get(k, 0.0) + v for k, v in pair_metric_sums(out).items()}
        pairs = out.chosen_rewards.numel()
        return out.loss * pairs, torch.tensor(pairs)

    def train_pair_metrics(self) -> dict[str, float]:
        """Reward accuracy, margin, rewards and log-probabilities of the train pairs since the last call, over
        every rank (a collective: every rank calls it at the same step); empty for SFT."""
        if self.pref is None:
            return {}
        values = all_reduce(*[self.pair_sums.get(k, 0.0) for k in PAIR_SUM_KEYS], device=self.device)
        sums = dict(zip(PAIR_SUM_KEYS, values, strict=True))
        self.pair_sums = {}
        return {k: v for k, v in pair_metrics(sums, "train_").items() if k != "train_loss"}

    def autocast(self) -> contextlib.AbstractContextManager:
        return model_setup.autocast(self.wc, self.device)

    def batches(self, shard: Any, epoch: int | None) -> Any:
        """A shard's batches; ``epoch`` seeds the local shuffle of the train split (None = eval, in order)."""
        bs = self.tc.batch_size
        return shard.iter_torch_batches(
            batch_size=bs,
            collate_fn=self.collate,
            local_shuffle_buffer_size=4 * bs if epoch is not None else None,
            local_shuffle_seed=self.tc.seed + epoch if epoch is not None else None,
        )

    def val_batches(self) -> Any:
        """The val shard's batches, kept in memory after the first pass when they take at most
        ``VAL_CACHE_BYTES``: later evaluations (every ``eval_every_steps``) then start no Ray Data execution.
        The same batches in the same order either way, so the eval loss does not change."""
        if self._val_cache is not None:
            yield from self._val_cache
            return
        kept: list[dict[str, torch.Tensor]] | None = [] if self._val_cacheable else None
        size = 0
        for batch in self.batches(self.val_shard, None):
            if kept is not None:
                size += sum(t.numel() * t.element_size() for t in batch.values())
                if size <= VAL_CACHE_BYTES:
                    kept.append(batch)
                else:
                    kept = None  # too large to keep: stream it at every evaluation
            yield batch
        if self._val_cacheable:
            # Every rank decides alike: the val split is a streaming split, whose every pass all ranks must join.
            everywhere = all_reduce(float(kept is None), device=self.device)[0] == 0
            self._val_cache, self._val_cacheable = (kept if everywhere else None), everywhere

    def evaluate(self, generate: bool = False) -> dict[str, float]:
        """Eval loss and perplexity on the val split; with ``generate``, also the generation metrics."""
        if self.pref is not None:
            metrics = evaluate_pairs(self.model, self.val_batches(), self.device, self.pref, self.autocast)
        else:
            metrics = evaluate(self.model, self.val_batches(), self.device, self.autocast)
        if generate and self.wc.gen_samples:
            metrics.update(
                generation_metrics(
                    self.model, list(self.wc.gen_samples), self.wc.tokenizer,
                    max_new_tokens=self.tc.eval_max_new_tokens, device=self.device, rank=self.rank,
                    world_size=self.world_size, autocast=self.autocast,
                )
            )  # fmt: skip
        return metrics


def _report(run: _Run, metrics: dict[str, Any], checkpoint: bool) -> None:
    """Report ``metrics`` (every rank: it is a collective), with a checkpoint written by all ranks when asked."""
    with tempfile.TemporaryDirectory() as tmp:
        if checkpoint:
            save_checkpoint(tmp, run.model, run.wc, run.optimizer, run.scheduler, run.state, run.rank)
        run.ctx.report(metrics, tmp if checkpoint and run.rank == 0 else None)


def _plateaued(state: TrainState, eval_loss: float, tc: TrainConfig) -> bool:
    """Track the best eval loss; True when ``early_stopping_patience`` evals in a row did not improve it."""
    if state.best_eval is None or eval_loss < state.best_eval - tc.early_stopping_min_delta:
        state.best_eval, state.evals_since_best = eval_loss, 0
        return False
    state.evals_since_best += 1
    return tc.early_stopping_patience is not None and state.evals_since_best >= tc.early_stopping_patience


class _Window:
    """Train loss and tokens since the last report, and its wall time."""

    def __init__(self) -> None:
        self.loss, self.tokens, self.t0 = 0.0, 0.0, time.monotonic()

    def metrics(self) -> dict[str, float]:
        secs = max(time.monotonic() - self.t0, 1e-6)
        return {
            "train_loss": self.loss / max(self.tokens, 1.0),
            "train_time_s": round(secs, 3),
            "train_tokens_per_s": round(self.tokens / secs, 1),
        }


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Ray Train's entry point: :func:`run_worker` with ``config["worker"]`` (a :class:`WorkerConfig`, from
    :func:`aigc.train.worker_config.build_worker_config`) and ``config["context"]`` (a Ray Train worker when
    absent)."""
    return run_worker(config["worker"], config.get("context") or RayTrainContext())


def run_worker(wc: WorkerConfig, ctx: WorkerContext) -> dict[str, Any] | None:
    """Fine-tune on this worker's shard of the ``train`` dataset; evaluate on its shard of ``val``.

    ``ctx`` says where it runs (:mod:`aigc.train.context`): a Ray Train worker, or a sweep trial training by itself.

    Returns:
        ``{NONFINITE_KEY: step}`` when the loss became NaN or infinite (the driver raises; the checkpoints
        written before stay as they are), else None.

    Raises:
        TrainingError: out of memory, naming the settings that use less.
    """
    run = _Run(wc, ctx)
    status = "FAILED"
    try:
        out = _train(run)
        status = "FINISHED"
        return out
    except torch.OutOfMemoryError as exc:
        raise model_setup.oom_error(exc, wc) from exc
    finally:
        run.tracker.close(status)


def _train(run: _Run) -> dict[str, Any] | None:
    wc, tc, st = run.wc, run.wc.train, run.state
    if st.initial_eval is None and run.val_shard is not None:
        st.initial_eval = run.evaluate()["eval_loss"]
    progress = StepProgress(wc.total_steps, tc.epochs, tc.log_every_steps, st.step, run.rank == 0, wc.progress)
    window = _Window()
    n, accum = wc.micro_per_epoch, tc.grad_accum
    last_group = n - (n % accum or accum)  # micro-batches before the epoch's last accumulation group

    for epoch in range(st.epoch, tc.epochs):
        epoch_t0, skip = time.monotonic(), st.micro if epoch == st.epoch else 0
        st.epoch, st.micro = epoch, skip
        step_loss, step_tokens = 0.0, 0.0
        run.optimizer.zero_grad(set_to_none=True)
        seen = skip
        for i, batch in enumerate(run.batches(run.train_shard, epoch)):
            seen = i + 1
            if i < skip:  # already trained on before the checkpoint this attempt resumed from
                continue
            if i >= n:  # a longer shard than the driver counted: every rank stops at the same micro-batch
                break
            batch = {k: v.to(run.device) for k, v in batch.items()}
            group = accum if i < last_group else n - last_group
            sync = (i + 1) % accum == 0 or i + 1 == n
            no_sync = run.model.no_sync() if (not sync and hasattr(run.model, "no_sync")) else contextlib.nullcontext()
            with no_sync, run.autocast():
                s, cnt = run.loss_sum(batch)
                run.scaler.scale(s / max(int(cnt), 1) / group).backward()
            step_loss, step_tokens = step_loss + float(s.detach()), step_tokens + float(cnt)
            st.micro = i + 1
            if not sync:
                continue

            # one optimizer step
            run.scaler.unscale_(run.optimizer)
            model_setup.clip_grad_norm(run.model, run.params, tc.max_grad_norm)
            run.scaler.step(run.optimizer)
            run.scaler.update()
            run.scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
            st.step += 1
            loss_sum, tokens = all_reduce(step_loss, step_tokens, device=run.device)
            step_loss = step_tokens = 0.0
            loss = loss_sum / max(tokens, 1.0)
            if not math.isfinite(loss):  # every rank sees the same reduced loss, so all of them stop here
                return {NONFINITE_KEY: st.step}
            st.step_losses.append(loss)
            window.loss, window.tokens = window.loss + loss_sum, window.tokens + tokens
            lr = run.scheduler.get_last_lr()[0]
            rate = progress.step(st.step, epoch, loss, lr, tokens)
            run.tracker.log_metrics({"train_loss": loss, "lr": lr, "train_tokens_per_s": rate}, st.step)
            run.ctx.after_step(st.step, run.resumed)

            epoch_end = st.micro >= n
            ckpt = epoch_end or (tc.checkpoint_every_steps is not None and st.step % tc.checkpoint_every_steps == 0)
            ev = ckpt or (tc.eval_every_steps is not None and st.step % tc.eval_every_steps == 0)
            if not ev:
                continue
            if epoch_end:
                st.epoch, st.micro = epoch + 1, 0
            metrics: dict[str, Any] = {
                "epoch": epoch + 1 if epoch_end else round(epoch + st.micro / n, 3),
                "step": st.step,
                "lr": lr,
                **window.metrics(),
                **run.train_pair_metrics(),
            }
            if epoch_end:
                metrics["epoch_time_s"] = round(time.monotonic() - epoch_t0, 2)
            stop = False
            if run.val_shard is not None:
                eval_t0 = time.monotonic()
                metrics.update(run.evaluate(generate=True))
                metrics["eval_time_s"] = round(time.monotonic() - eval_t0, 3)  # loss + generation metrics
                metrics["initial_eval_loss"] = st.initial_eval
                stop = _plateaued(st, metrics["eval_loss"], tc)
                metrics["stopped_early"] = stop
            st.history.append(metrics)
            tracked = ("eval_", "train_reward", "train_logps")  # the pair metrics of preference runs too
            run.tracker.log_metrics({k: v for k, v in metrics.items() if k.startswith(tracked)}, st.step)
            _report(run, metrics, checkpoint=ckpt or stop)
            window = _Window()
            if stop:
                progress.note(f"[train] early stop at step {st.step}: eval loss has not improved for "
                              f"{st.evals_since_best} evaluations (best {st.best_eval:.4f})")  # fmt: skip
                return None
        if seen < n:  # ranks would disagree on the step count: fail loudly rather than hang in a collective
            raise RuntimeError(f"rank {run.rank}: the train shard ended after {seen} micro-batches, {n} expected")
    return None
