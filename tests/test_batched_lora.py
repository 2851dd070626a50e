"""Batched LoRA (one product per LoRA layer for rows on different adapters) against peft's per-adapter split.

One tiny model, adapters of different ranks, alphas and target layers (one with rslora), loaded the way the
engine loads them (``AdapterSet``). The same mixed batch of rows (base and every adapter, left-padded prompts
of different lengths) is prefilled and decoded greedily through :class:`RunningBatch` with peft's mixed-adapter
forward and with the batched one: the tokens must be identical and the logits of every step close. Then after
adapters are deleted and others loaded (one under a deleted adapter's name, so stale stacks would show), and
with adapters the batched path does not take (DoRA, an embedding LoRA), which must fall back to peft's path.
"""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
import torch
from helpers import make_tiny_adapter, make_tiny_model

from aigc.models.loading import load_base_model
from aigc.serve.engine import GenerationEngine, SamplingParams, lora_batch
from aigc.serve.engine.adapters import BASE_ADAPTER, PLACEHOLDER, AdapterSet
from aigc.serve.engine.batch import Row, RunningBatch
from aigc.serve.engine.lora_batch import LoraForward

PROMPTS = [[5, 17, 23, 42, 8], [9, 33], [71, 12, 64, 100, 3, 44, 18], [27], [88, 13, 50], [6, 7, 8, 9, 10, 11]]
STEPS = 12


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batched-lora")
    base = make_tiny_model(tmp / "base")
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    mlp = ["gate_proj", "up_proj", "down_proj"]
    return SimpleNamespace(
        base=base,
        r4=make_tiny_adapter(base, tmp / "r4", seed=4),  # rank 4, alpha 8, q/v/up
        r8=make_tiny_adapter(base, tmp / "r8", seed=5, r=8, lora_alpha=32, target_modules=attn + mlp),
        rs=make_tiny_adapter(
            base,
            tmp / "rs",
            seed=6,
            r=2,
            lora_alpha=4,
            use_rslora=True,
            target_modules=["k_proj", "o_proj", "down_proj"],
        ),  # fmt: skip
        r16=make_tiny_adapter(base, tmp / "r16", seed=7, r=16, lora_alpha=16, target_modules=["q_proj", "gate_proj"]),
        other=make_tiny_adapter(base, tmp / "other", seed=8, r=6, lora_alpha=3, target_modules=attn),
        dora=make_tiny_adapter(base, tmp / "dora", seed=9, use_dora=True),
        embed=make_tiny_adapter(base, tmp / "embed", seed=10, target_modules=["embed_tokens", "q_proj"]),
    )


def _setup(tiny, quantization: str = "none") -> SimpleNamespace:
    """The engine's model (a zero placeholder LoRA, then adapters loaded by AdapterSet), both forward paths."""
    from peft import LoraConfig, get_peft_model

    base = load_base_model(tiny.base, dtype="float32", quantization=quantization)
    model = get_peft_model(base, LoraConfig(r=1, target_modules=["q_proj"]), adapter_name=PLACEHOLDER).eval()
    batched, peft = LoraForward(model), LoraForward(model, batched=False)
    adapters = AdapterSet(model, threading.Lock(), on_change=batched.reset)
    for name in ("r4", "r8", "rs"):
        adapters.load(getattr(tiny, name), name)
    return SimpleNamespace(model=model, batched=batched, peft=peft, adapters=adapters)


@pytest.fixture
def setup(tiny):
    return _setup(tiny)


def _greedy(model, lora: LoraForward, adapters: list[str]) -> tuple[list[list[int]], torch.Tensor]:
    """Prefill one row per adapter (prompts of different lengths), decode STEPS tokens greedily."""
    batch = RunningBatch(model, pad_id=0, lora=lora)
    rows = [Row(prompt_ids=PROMPTS[i % len(PROMPTS)], adapter=a) for i, a in enumerate(adapters)]
    pre = batch.prefill(rows)
    batch.join(pre)
    logits = [pre.logits]
    for _ in range(STEPS):
        for row, token in zip(batch.rows, logits[-1].argmax(-1).tolist(), strict=True):
            row.tokens.append(token)
        logits.append(batch.decode())
    return [r.tokens for r in rows], torch.stack(logits)


def _assert_same(setup, adapters: list[str]) -> list[list[int]]:
    tokens, logits = _greedy(setup.model, setup.peft, adapters)
    before = setup.batched.peft_forwards
    fast_tokens, fast_logits = _greedy(setup.model, setup.batched, adapters)
    assert setup.batched.peft_forwards == before, "the batched path fell back to peft's"
    assert fast_tokens == tokens
    torch.testing.assert_close(fast_logits, logits, atol=1e-4, rtol=1e-4)
    return tokens


MIX = [BASE_ADAPTER, "r4", "r8", "rs", "r4", BASE_ADAPTER, "rs", "r8"]


@pytest.mark.parametrize("product", ["masked", "gathered"])
def test_a_mixed_batch_gets_the_same_tokens_and_logits_as_pefts_split(setup, monkeypatch, product):
    if product == "gathered":  # every row through its own gathered A and B (bmm), as with many adapters
        monkeypatch.setattr(lora_batch, "MASKED_MAX_RANK", 0)
    tokens = _assert_same(setup, MIX)
    # the adapters do change the answers: the first prompt alone on the base model and on each adapter
    alone = [_greedy(setup.model, setup.peft, [a])[0][0] for a in (BASE_ADAPTER, "r4", "r8", "rs")]
    assert tokens[0] == alone[0]  # padding and neighbours change nothing
    assert len(set(map(tuple, alone))) == 4, "each adapter should answer differently"
    assert setup.peft.peft_forwards > 0


def test_an_int8_base_model_with_adapters_on_top_gets_the_same_tokens_and_logits(tiny):
    setup = _setup(tiny, quantization="int8")  # torchao's int8 layers under peft's LoRA layers
    _assert_same(setup, MIX)


def test_batches_on_one_adapter_or_a_subset_of_adapters_are_batched_too(setup):
    _assert_same(setup, ["r8"] * 4)
    _assert_same(setup, ["rs", BASE_ADAPTER, "rs"])
    _assert_same(setup, ["r4", "r8"])


def test_stacks_follow_adapters_deleted_and_loaded(setup, tiny):
    _assert_same(setup, MIX)  # builds the stacks
    setup.adapters.delete("r8")
    setup.adapters.delete("r4")
    setup.adapters.load(tiny.r16, "r16")
    setup.adapters.load(tiny.other, "r4")  # a different adapter under a deleted one's name
    assert setup.adapters.names == ["r16", "r4", "rs"]
    # stale stacks would answer "r4" with the deleted adapter's weights, or send "r16" to peft's path
    _assert_same(setup, [BASE_ADAPTER, "r16", "r4", "rs", "r4", "r16"])


def test_a_forward_that_fails_midway_leaves_the_next_one_exact(setup):
    layer = setup.model.get_base_model().model.layers[1].mlp.up_proj
    failures = []

    def fail_once(module, args):
        if not failures:
            failures.append(1)
            raise RuntimeError("injected fault")

    handle = layer.register_forward_pre_hook(fail_once)
    try:
        for lora in (setup.batched, setup.peft):
            failures.clear()
            with pytest.raises(RuntimeError, match="injected fault"):
                _greedy(setup.model, lora, MIX)
    finally:
        handle.remove()
    _assert_same(setup, [BASE_ADAPTER, "rs", "r8"])  # another size and mix: nothing of the failed batch is left


def test_an_embedding_lora_in_the_batch_falls_back_to_pefts_forward(setup, tiny):
    setup.adapters.load(tiny.embed, "embed")
    mix = [BASE_ADAPTER, "embed", "r8", "rs"]
    tokens, logits = _greedy(setup.model, setup.peft, mix)
    before = setup.batched.peft_forwards
    fast_tokens, fast_logits = _greedy(setup.model, setup.batched, mix)
    assert setup.batched.peft_forwards - before == STEPS + 1  # every forward of this batch took peft's path
    assert fast_tokens == tokens
    torch.testing.assert_close(fast_logits, logits, atol=1e-4, rtol=1e-4)
    _assert_same(setup, [BASE_ADAPTER, "r4", "r8", "rs"])  # batches without it stay batched


def test_a_dora_adapter_in_the_batch_falls_back_to_peft_which_refuses_it_as_before(setup, tiny):
    # The engine rejects DoRA adapters at load (peft cannot mix them per row); injected behind its back,
    # a batch holding one takes peft's path and fails exactly as it did before batched LoRA.
    setup.model.load_adapter(tiny.dora, adapter_name="dora")
    setup.batched.reset()
    mix = [BASE_ADAPTER, "dora", "r4"]
    for lora in (setup.peft, setup.batched):
        with pytest.raises(ValueError, match="Cannot pass `adapter_names` when DoRA is enabled"):
            _greedy(setup.model, lora, mix)
    assert setup.batched.peft_forwards == 1
    # Both paths go on working: peft's own hooks would have outlived the failed forward (peft 0.21 does not
    # remove them when it raises) and sent the next batch, of another size, to the failed batch's adapters.
    _assert_same(setup, MIX)  # the other adapters stay batched and identical while DoRA is loaded


def test_the_engine_batches_by_default_and_answers_as_with_pefts_split(tiny):
    """End to end through GenerationEngine: concurrent requests on a mix, then after replacing an adapter."""
    engines = {
        b: GenerationEngine(tiny.base, max_batch_size=8, admit_min_rows=4, batched_lora=b) for b in (True, False)
    }
    params = SamplingParams(max_tokens=10, temperature=0)
    jobs = [(p, a) for p in ("Where is my parcel?", "Hello", "The coffee grinder") for a in (None, "r4", "r8", "rs")]

    async def answers(engine: GenerationEngine) -> list[str]:
        outs = await asyncio.gather(*(engine.agenerate(p, params, adapter=a) for p, a in jobs))
        return [o.text for o in outs]

    try:
        out = {}
        for batched, engine in engines.items():
            for name in ("r4", "r8", "rs"):
                engine.load_adapter(getattr(tiny, name), name)
            first = asyncio.run(answers(engine))
            engine.delete_adapter("r8")
            engine.load_adapter(tiny.other, "r8")
            out[batched] = (first, asyncio.run(answers(engine)))
        assert out[True] == out[False]
        assert out[True][0] != out[True][1]  # the replaced adapter answers differently
        assert engines[True].max_rows_seen > 4  # the rows did share steps
    finally:
        for engine in engines.values():
            engine.close()
