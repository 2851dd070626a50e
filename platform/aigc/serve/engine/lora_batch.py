"""One forward pass for a batch whose rows use different LoRA adapters: one batched product per LoRA layer.

peft's mixed-adapter forward (``model(adapter_names=[...])``) splits every LoRA layer's input by adapter:
each adapter present in the batch costs an index copy of its rows, two small matmuls and a scatter back, in
every layer. With the base model and three adapters in one batch that ran at 0.65-0.72x of a single-model
batch. :class:`LoraForward` computes the same sum with the rows together instead:

1. **Stacks**, per LoRA layer, built once after each adapter load or delete (:meth:`LoraForward.reset`, called
   under the model lock): ``A [n+1, r, in]`` and ``B [n+1, out, r]`` over the ``n`` loaded adapters, zero-padded
   to the layer's largest rank, slot 0 all zeros (the base model). ``B`` holds peft's scaling folded in
   (``lora_alpha / r``, or ``lora_alpha / sqrt(r)`` with rslora, per layer as peft set it). An adapter that
   does not touch a layer has a zero slot there. The stacks copy the adapters' weights once (memory: the
   adapters' size again).
2. **Per forward**, each row gets its adapter's slot. The base model's own layers run unchanged; a forward hook
   on each LoRA layer adds the rows' LoRA outputs in one product:

   - *masked* (few adapters present): the present adapters' blocks side by side, ``x @ A_P^T`` for every row
     at once, multiplied by a 0/1 mask that keeps each row's own block, then ``@ B_P^T``. Two dense matmuls,
     no per-row weight copy; each row pays the ranks of every adapter present (``k * r``), so this serves
     while ``k * r <= MASKED_MAX_RANK``. ``A_P``/``B_P`` are cut from the stacks once per set of adapters
     present and reused while the batch keeps that set (usually many steps).
   - *gathered* (more adapters present): each row's ``A`` and ``B`` gathered by slot and applied with
     ``torch.bmm`` (``[rows, r, in]``): each row pays its own rank, at the cost of copying ``rows * r * (in +
     out)`` weights per layer per forward.

   peft's own modules still hold and load the adapters (``AdapterSet.load``/``delete`` are unchanged); its
   active adapter stays the engine's zero placeholder, so the wrapped layers compute the base output.

Falls back to peft's mixed-adapter forward, for that forward only, when a row's adapter cannot be batched
this way: a DoRA or other peft variant layer, LoRA on a non-``Linear`` layer (embeddings, convolutions), a
``lora_B`` bias (``lora_bias=True``), ``modules_to_save`` or trainable tokens, merged adapters or a model in
training mode. peft itself refuses DoRA in
a mixed batch, so such a forward fails exactly as it does without this module (the engine rejects DoRA
adapters at load anyway). ``lora_dropout`` does nothing at inference (the model is in eval mode) and is
ignored. A batch of base-model rows only skips every hook and runs the wrapped model alone. A batch whose
adapter rows are all on one adapter takes the batched path as well: peft's split would be one product there
too, but it still copies those rows' inputs out and their outputs back in every layer.

Results equal peft's up to float rounding: the scaling is applied to ``B`` before the product rather than
after it, and the zero padding adds exact zeros (``tests/test_batched_lora.py`` checks tokens and logits).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from aigc.serve.engine.adapters import BASE_ADAPTER, PLACEHOLDER

__all__ = ["MASKED_MAX_RANK", "LoraForward"]

MASKED_MAX_RANK = 128  # adapters present x rank above which each row's weights are gathered instead (bmm)


@dataclass(eq=False)
class _Layer:
    """One LoRA layer's stacks and its forward hook."""

    module: Any
    a: torch.Tensor  # [n+1, r, in]: slot 0 (base) and absent adapters are zeros
    b: torch.Tensor  # [n+1, out, r]: scaling folded in
    slots: frozenset[int]  # the slots of the adapters this layer holds
    hook: Any = None
    cut: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)


@dataclass(eq=False)
class _Step:
    """What the hooks need during one batched forward."""

    rows: torch.Tensor  # [rows]: each row's slot (0 = base)
    present: tuple[int, ...]  # sorted slots of the adapters in this batch
    gathered: bool
    held: dict[frozenset[int], tuple[int, ...]] = field(default_factory=dict)  # layer slots -> those present
    masks: dict[tuple[tuple[int, ...], int], torch.Tensor] = field(default_factory=dict)


class LoraForward:
    """Runs the model for a batch of rows, each on its adapter (see the module doc). Engine thread only.

    Args:
        model: the engine's ``PeftModel`` (its active adapter a zero placeholder).
        batched: False runs every mixed batch through peft's per-adapter split (the comparison path).
    """

    def __init__(self, model: Any, batched: bool = True):
        self.model, self.batched = model, batched
        self._layers: list[_Layer] | None = None  # None: to be built at the next mixed forward
        self._slots: dict[str, int] = {}  # batchable adapter name -> stack slot (1..n)
        self._rank = 0  # the largest rank in the stacks
        self._step: _Step | None = None
        self.peft_forwards = 0  # forwards that fell back to peft's split (for tests and stats)

    def reset(self) -> None:
        """Drop the stacks (an adapter was loaded or deleted); call under the model lock."""
        for layer in self._layers or []:
            layer.hook.remove()
        self._layers, self._slots = None, {}

    def __call__(self, adapters: list[str], **kwargs: Any) -> Any:
        """The model's output for rows on ``adapters`` (one name per row; ``BASE_ADAPTER`` = no adapter)."""
        if all(a == BASE_ADAPTER for a in adapters):
            # Skip peft's per-row hooks: the active adapter is the zero placeholder, so this is the base output.
            return self.model.get_base_model()(**kwargs)
        if self.batched and self._layers is None:
            self._build()
        if not self.batched or self.model.training or any(a != BASE_ADAPTER and a not in self._slots for a in adapters):
            return self._peft(adapters, **kwargs)
        rows = [0 if a == BASE_ADAPTER else self._slots[a] for a in adapters]
        present = tuple(sorted(set(rows) - {0}))
        self._step = _Step(
            rows=torch.tensor(rows, device=self.model.device),
            present=present,
            gathered=len(present) * self._rank > MASKED_MAX_RANK,
        )
        try:
            return self.model.get_base_model()(**kwargs)
        finally:
            self._step = None

    def _peft(self, adapters: list[str], **kwargs: Any) -> Any:
        """peft's mixed-adapter forward: every LoRA layer splits its rows per adapter.

        ``model(adapter_names=...)`` would do the same, but peft (0.21) leaves its ``adapter_names`` hooks on
        every layer when the forward raises: each later forward would then run on the failed batch's adapters
        (or fail on its row count). These hooks go in every case.
        """
        from peft.tuners.lora import LoraLayer
        from peft.utils.other import AuxiliaryTrainingWrapper

        self.peft_forwards += 1

        def inject(module: Any, args: tuple, kw: dict) -> tuple[tuple, dict]:
            kw["adapter_names"] = adapters
            return args, kw

        handles = [
            m.register_forward_pre_hook(inject, with_kwargs=True)
            for m in self.model.modules()
            if isinstance(m, (LoraLayer, AuxiliaryTrainingWrapper))
        ]
        try:
            return self.model.get_base_model()(**kwargs)
        finally:
            for handle in handles:
                handle.remove()

    # 1. stacks ------------------------------------------------------------------------------------------
    def _build(self) -> None:
        from peft.tuners.lora import LoraLayer

        modules = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        names = sorted({n for m in modules for n in _adapter_names(m)} - {PLACEHOLDER})
        unbatchable = {n for m in modules for n in _adapter_names(m) if not _batchable(m, n)}
        for name, config in self.model.peft_config.items():  # whole modules trained or tokens: peft's path
            if getattr(config, "modules_to_save", None) or getattr(config, "trainable_token_indices", None):
                unbatchable.add(name)
        slots = {n: i + 1 for i, n in enumerate(n for n in names if n not in unbatchable)}
        layers = []
        for m in modules:  # every stack first: a failure here (memory) leaves no half-built state behind
            held = {n: s for n, s in slots.items() if n in m.lora_A}
            if held:
                layers.append(_stack(m, held, len(slots)))
        for layer in layers:
            layer.hook = layer.module.register_forward_hook(self._make_hook(layer), with_kwargs=True)
        self._layers, self._slots = layers, slots
        self._rank = max((layer.a.shape[1] for layer in layers), default=0)

    # 2. the per-layer product ---------------------------------------------------------------------------
    def _make_hook(self, layer: _Layer) -> Any:
        def hook(module: Any, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
            step = self._step
            if step is None:
                return None  # a peft or base-only forward: leave the output alone
            present = step.held.get(layer.slots)
            if present is None:  # shared by the layers that hold the same adapters (usually all of them)
                present = step.held[layer.slots] = tuple(s for s in step.present if s in layer.slots)
            if not present:
                return None
            x = args[0] if args else kwargs["x"]
            if x.shape[0] != step.rows.shape[0]:
                raise RuntimeError(f"LoRA layer input has {x.shape[0]} rows, the batch {step.rows.shape[0]}")
            x = x.to(layer.a.dtype)
            delta = _gathered(layer, step.rows, x) if step.gathered else self._masked(layer, step, present, x)
            return output + delta.to(output.dtype)

        return hook

    def _masked(self, layer: _Layer, step: _Step, present: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
        cut = layer.cut.get(present)
        if cut is None:  # a new set of adapters in the batch: cut their blocks out of the stacks once
            index = torch.tensor(present, device=layer.a.device)
            a = layer.a.index_select(0, index).flatten(0, 1)  # [k*r, in]
            b = layer.b.index_select(0, index).permute(1, 0, 2).flatten(1, 2)  # [out, k*r]
            layer.cut = {present: (a, b)}
            cut = (a, b)
        rank = layer.a.shape[1]
        mask = step.masks.get((present, rank))
        if mask is None:  # shared by every layer with the same adapters and rank in this forward
            owner = torch.tensor(present, device=x.device).repeat_interleave(rank)  # [k*r]
            mask = (step.rows[:, None] == owner[None, :]).to(x.dtype)  # [rows, k*r]
            step.masks[(present, rank)] = mask
        h = F.linear(x, cut[0])
        h = h * mask.view(mask.shape[0], *([1] * (x.dim() - 2)), mask.shape[1])
        return F.linear(h, cut[1])


def _stack(m: Any, held: dict[str, int], n: int) -> _Layer:
    """Layer ``m``'s stacks over ``n`` adapter slots, filled for the adapters in ``held`` (name -> slot)."""
    first = next(iter(held))
    ref = m.lora_A[first].weight
    rank = max(m.lora_A[name].weight.shape[0] for name in held)
    a = torch.zeros(n + 1, rank, m.lora_A[first].in_features, dtype=ref.dtype, device=ref.device)
    b = torch.zeros(n + 1, m.lora_B[first].out_features, rank, dtype=ref.dtype, device=ref.device)
    with torch.no_grad():
        for name, slot in held.items():
            r = m.lora_A[name].weight.shape[0]
            a[slot, :r] = m.lora_A[name].weight
            b[slot, :, :r] = m.lora_B[name].weight * m.scaling[name]
    return _Layer(m, a, b, frozenset(held.values()))


def _gathered(layer: _Layer, rows: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each row through its own adapter's gathered ``A`` and ``B`` (``bmm``; base rows hit the zero slot)."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])  # [rows, tokens, in]
    h = torch.bmm(flat, layer.a.index_select(0, rows).transpose(1, 2))  # [rows, tokens, r]
    out = torch.bmm(h, layer.b.index_select(0, rows).transpose(1, 2))  # [rows, tokens, out]
    return out.reshape(*x.shape[:-1], out.shape[-1])


def _adapter_names(m: Any) -> set[str]:
    names = set(m.lora_A.keys())
    for extra in ("lora_embedding_A", "lora_magnitude_vector"):
        names |= set(getattr(m, extra, {}).keys())
    return names


def _batchable(m: Any, name: str) -> bool:
    """Whether ``name``'s LoRA on layer ``m`` is the plain ``B(A(x)) * scaling`` the stacks compute."""
    if name not in m.lora_A or name in getattr(m, "lora_embedding_A", {}):
        return False
    a, b = m.lora_A[name], m.lora_B[name]
    return (
        type(a) is torch.nn.Linear
        and type(b) is torch.nn.Linear
        and b.bias is None
        and name not in getattr(m, "lora_variant", {})
        and not getattr(m, "use_dora", {}).get(name, False)
        and not m.merged
        and not m.disable_adapters
        and not m.training
    )
