"""The model a training worker trains: base model + method, the parallel wrapper, precision and gradient clipping
(its weights in and out of a checkpoint: :mod:`aigc.train.weights`).

Methods (``train.method``), cheapest in memory first:

- ``qlora``: the base model quantized to 4-bit NF4 (bitsandbytes, GPU only) + LoRA. About a quarter of the
  weight memory of bf16; slower steps (dequantize on the fly).
- ``lora``: frozen base + low-rank adapters (``lora.*``: rank, rsLoRA scaling, DoRA, ``modules_to_save``).
  Gradients and optimizer state only for the adapters.
- ``full``: every weight trained: gradients and two AdamW moments for every parameter (about 4x the weights).

``train.gradient_checkpointing`` recomputes activations in backward (less memory, ~30% slower steps);
``train.mixed_precision`` autocasts the forward pass; ``train.strategy=fsdp`` shards parameters, gradients and
optimizer state across workers (:mod:`aigc.train.sharding`).

Every function here that touches a wrapped model's weights is a collective under FSDP: all ranks call it.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from aigc.config import ModelConfig, TrainConfig
from aigc.errors import ConfigError, TrainingError
from aigc.models.hub import local_model_dir
from aigc.models.loading import apply_lora, load_base_model, resolve_dtype
from aigc.models.targets import raise_for_missing
from aigc.train import sharding
from aigc.train.init_adapter import start_from_adapter
from aigc.train.worker_config import WorkerConfig

__all__ = ["autocast", "build_model", "check_strategy", "clip_grad_norm", "grad_scaler", "oom_error", "prepare"]

_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16}


def check_strategy(train_cfg: TrainConfig) -> None:
    """Combinations of method and strategy this platform does not run (checked on the driver, too).

    Raises:
        ConfigError: ``qlora`` with ``fsdp`` (4-bit weights are not sharded here).
    """
    if train_cfg.method == "qlora" and train_cfg.strategy == "fsdp":
        raise ConfigError(
            "train.strategy: 'fsdp' cannot shard qlora's 4-bit base model; use train.strategy=ddp with qlora, "
            "or method lora/full with fsdp"
        )


# 1. build: base model -> method -> gradient checkpointing -> train mode
def _load_4bit(m: ModelConfig, device: torch.device) -> Any:
    """The base model quantized to 4-bit NF4 on ``device``, prepared for k-bit training (norms in fp32)."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainingError(
            'train.method=qlora needs bitsandbytes: install the GPU extra with pip install -e ".[gpu]"'
        ) from None
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = resolve_dtype("auto" if m.dtype in ("auto", "float32") else m.dtype, str(device))
    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,  # quantize the quantization constants too: ~0.4 bit/weight less
        bnb_4bit_compute_dtype=compute,
    )
    return AutoModelForCausalLM.from_pretrained(
        local_model_dir(m.load_path(), weights=True),  # the driver's resolved snapshot, never the hub id
        quantization_config=quant,
        dtype=compute,
        device_map={"": device},
        trust_remote_code=m.trust_remote_code,
    )


def _enable_checkpointing(model: Any, kwargs: dict[str, Any]) -> None:
    """transformers >= 5.24 calls it activation checkpointing; older versions gradient checkpointing."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def build_model(wc: WorkerConfig, device: torch.device) -> Any:
    """The base model on ``device`` with ``train.method`` applied, in train mode.

    Raises:
        ConfigError: ``lora.target_modules`` / ``modules_to_save`` name modules the model does not have.
        TrainingError: qlora without bitsandbytes installed.
    """
    m, tc, lo = wc.model, wc.train, wc.lora
    check_strategy(tc)
    gc_kwargs = {"use_reentrant": False}  # non-reentrant: works with frozen inputs, DDP and FSDP
    if tc.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = _load_4bit(m, device)
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=tc.gradient_checkpointing, gradient_checkpointing_kwargs=gc_kwargs
        )
    else:
        model = load_base_model(m.load_path(), m.dtype, str(device), m.trust_remote_code)  # the resolved snapshot
        if tc.gradient_checkpointing:
            _enable_checkpointing(model, gc_kwargs)
    if tc.gradient_checkpointing:
        model.config.use_cache = False
    if tc.method in ("lora", "qlora"):
        raise_for_missing(model, lo, m.name_or_path)
        model = apply_lora(
            model,
            lo.r,
            lo.alpha,
            lo.dropout,
            lo.target_modules,
            use_rslora=lo.use_rslora,
            use_dora=lo.use_dora,
            modules_to_save=lo.modules_to_save,
        )
        if tc.init_adapter:
            model = start_from_adapter(model, tc)
        if tc.gradient_checkpointing:
            model.enable_input_require_grads()  # checkpointed blocks see an input that requires grad
    else:
        for p in model.parameters():
            p.requires_grad_(True)
    model.train()
    return model


# 2. wrap for the strategy, and the precision of the forward pass
def prepare(model: Any, wc: WorkerConfig) -> Any:
    """Wrap for ``train.strategy`` (DDP or FSDP) and move to the worker's device (a no-op for one worker).

    DDP and FSDP on GPUs go through Ray Train's ``prepare_model``. Ray refuses FSDP without CUDA, so on CPU
    workers (gloo) the model is wrapped here with the same arguments.
    """
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device()
    move = wc.train.method != "qlora"  # a 4-bit model is loaded onto its device and cannot be moved
    if wc.train.strategy == "ddp":
        return ray.train.torch.prepare_model(model, move_to_device=move)
    kwargs = sharding.fsdp_kwargs(model, device)
    if device.type == "cuda":
        return ray.train.torch.prepare_model(
            model, move_to_device=move, parallel_strategy="fsdp", parallel_strategy_kwargs=kwargs
        )
    model = ray.train.torch.prepare_model(model, move_to_device=move, parallel_strategy=None)
    if ray.train.get_context().get_world_size() > 1:
        model = sharding.FSDP(model, **kwargs)
    return model


def autocast(wc: WorkerConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """The forward pass's precision context for ``train.mixed_precision`` (weights stay in their dtype)."""
    dtype = _PRECISION.get(wc.train.mixed_precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def grad_scaler(model: Any, wc: WorkerConfig) -> Any:
    """A loss scaler for ``mixed_precision=fp16`` (fp16 gradients underflow without one), else a disabled one.

    Use as ``scaler.scale(loss).backward()``, ``scaler.unscale_(opt)`` before clipping, ``scaler.step(opt)``,
    ``scaler.update()``; disabled, each call passes through.
    """
    enabled = wc.train.mixed_precision == "fp16"
    if sharding.is_fsdp(model):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(enabled=enabled)
    return torch.amp.GradScaler(enabled=enabled)


def clip_grad_norm(model: Any, params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip gradients to a global L2 norm; under FSDP the norm spans every rank's shard."""
    if sharding.is_fsdp(model):
        return model.clip_grad_norm_(max_norm)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def oom_error(exc: BaseException, wc: WorkerConfig) -> TrainingError:
    """A TrainingError for an out-of-memory failure, saying which settings use less memory."""
    tc = wc.train
    tips = []
    if tc.batch_size > 1:
        smaller = max(1, tc.batch_size // 2)
        accum = tc.grad_accum * tc.batch_size // smaller
        tips.append(f"train.batch_size={smaller} train.grad_accum={accum} (same examples per optimizer step)")
    if not tc.gradient_checkpointing:
        tips.append("train.gradient_checkpointing=true (recompute activations: less memory, slower steps)")
    if tc.method == "full":
        tips.append("train.method=lora (only adapter weights get gradients and optimizer state)")
    if tc.method != "qlora" and tc.use_gpu and tc.strategy == "ddp":
        tips.append("train.method=qlora (4-bit base model)")
    if tc.strategy == "ddp" and tc.method != "qlora" and tc.num_workers > 1:
        tips.append("train.strategy=fsdp (shard weights and optimizer state across the workers)")
    if tc.mixed_precision == "no" and tc.use_gpu:
        tips.append("train.mixed_precision=bf16")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    where = "GPU" if tc.use_gpu else "memory"
    return TrainingError(
        f"out of {where} training {wc.model.name_or_path} (method {tc.method}, batch_size {tc.batch_size}): "
        f"{first}. Try: " + "; ".join(tips or ["a smaller data.max_length, or a bigger machine"])
    )
