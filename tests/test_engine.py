"""The generation engine on its own (no Ray, no Serve): the protocol the ``Generator`` deployment drives it
through, batched output equal to sequential output, then one request at a time (adapters, stop strings, eos,
streams closed early, seeded sampling).

A tiny random Llama and two LoRA adapters whose random weights change the greedy tokens. Batched requests are
sent from many threads at once so they share decoding steps (asserted through ``max_rows_seen``).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from helpers import make_tiny_adapter, make_tiny_model

from aigc.errors import InvalidRequestError
from aigc.serve.engine import GenerationEngine, SamplingParams, ServingEngine

GREEDY = SamplingParams(max_tokens=24, temperature=0)
PROMPTS = [
    "Where is my parcel?",
    "Hello",
    "Please send us your order number so we can check the refund and reply today.",
    "The coffee grinder",
    [{"role": "user", "content": "My app crashes at checkout, what should I do?"}],
    [{"role": "system", "content": "You are helpful."}, {"role": "user", "content": "Returns?"}],
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny base model and two adapters on it (seeds picked so that greedy replies contain spaces: the
    streamer releases text a word at a time)."""
    tmp = tmp_path_factory.mktemp("engine")
    base = make_tiny_model(tmp / "base")
    a1, a2 = make_tiny_adapter(base, tmp / "a1", seed=4), make_tiny_adapter(base, tmp / "a2", seed=5)
    return SimpleNamespace(base=base, a1=a1, a2=a2)


@pytest.fixture(scope="module")
def engine(tiny):
    eng = GenerationEngine(tiny.base, max_batch_size=8, admit_min_rows=3)  # joiners wait up to 20 ms for company
    eng.load_adapter(tiny.a1, "a1")
    eng.load_adapter(tiny.a2, "a2")
    yield eng
    eng.close()


def _jobs() -> list[tuple[object, SamplingParams, str | None]]:
    """Every prompt on the base model and both adapters, with different max_tokens and a stop string."""
    jobs = []
    for i, p in enumerate(PROMPTS):
        for j, adapter in enumerate((None, "a1", "a2")):
            params = replace(GREEDY, max_tokens=8 + 5 * ((i + j) % 4), stop=(" t",) if (i + j) % 3 == 0 else ())
            jobs.append((p, params, adapter))
    return jobs


def test_batched_greedy_equals_sequential_across_adapters(engine):
    jobs = _jobs()
    sequential = [engine.generate(*job) for job in jobs]  # one at a time: a batch of one
    assert len({c.text for c in sequential}) > len(PROMPTS)  # adapters really change the answers
    before = engine.max_rows_seen
    with ThreadPoolExecutor(len(jobs)) as pool:
        batched = list(pool.map(lambda job: engine.generate(*job), jobs))
    assert engine.max_rows_seen >= 4 > before  # the requests did decode together
    for job, seq, bat in zip(jobs, sequential, batched, strict=True):
        assert bat == seq, job


def test_a_request_joining_mid_flight_gets_the_same_tokens(engine):
    alone = engine.generate(PROMPTS[2], replace(GREEDY, max_tokens=6), "a1")
    long_params = SamplingParams(max_tokens=60, temperature=0)
    with ThreadPoolExecutor(3) as pool:
        running = [pool.submit(engine.generate, PROMPTS[i], long_params, a) for i, a in ((0, None), (1, "a2"))]
        time.sleep(0.05)  # the long ones are decoding; this one joins between their steps
        joined = pool.submit(engine.generate, PROMPTS[2], replace(GREEDY, max_tokens=6), "a1").result(60)
        [f.result(60) for f in running]
    assert joined == alone


def test_stream_pieces_join_to_the_whole_text_and_closing_frees_the_slot(engine):
    params = SamplingParams(max_tokens=40, temperature=0)
    whole = engine.generate(PROMPTS[0], params, "a1")

    async def collect(limit: int | None) -> list:
        out = []
        async for d in engine.astream(PROMPTS[0], params, "a1"):
            out.append(d)
            if limit is not None and len(out) >= limit:
                break  # the client went away
        return out

    deltas = asyncio.run(collect(None))
    assert len(deltas) > 2 and "".join(d.text for d in deltas) == whole.text
    assert deltas[-1].finish_reason == whole.finish_reason
    assert deltas[-1].completion_tokens == whole.completion_tokens


def test_a_slow_stream_consumer_gets_what_piled_up_as_one_delta(engine):
    params = SamplingParams(max_tokens=40, temperature=0)
    whole = engine.generate(PROMPTS[3], params)

    async def slow() -> list:
        out = []
        async for d in engine.astream(PROMPTS[3], params):
            out.append(d)
            if len(out) == 1:
                await asyncio.sleep(1.0)  # the engine decodes the rest meanwhile (~0.2 s on a quiet machine)
        return out

    deltas = asyncio.run(slow())
    assert whole.completion_tokens > 10 and len(deltas) < whole.completion_tokens / 2
    assert "".join(d.text for d in deltas) == whole.text and deltas[-1].completion_tokens == whole.completion_tokens


def test_a_finished_rows_adapter_can_go_while_its_row_still_sits_in_the_cache(engine, tmp_path):
    """Finished rows leave the KV cache lazily; deleting their adapter meanwhile must not break the batch."""
    engine.load_adapter(make_tiny_adapter(engine.model_name_or_path, tmp_path / "a3", seed=6), "a3")
    long_params = SamplingParams(max_tokens=80, temperature=0)
    alone = [engine.generate(PROMPTS[i], long_params, a) for i, a in ((0, None), (1, "a1"))]
    with ThreadPoolExecutor(3) as pool:
        assert engine.acquire_adapter("a3")
        running = [pool.submit(engine.generate, PROMPTS[i], long_params, a) for i, a in ((0, None), (1, "a1"))]
        time.sleep(0.02)
        short = engine.generate(PROMPTS[2], replace(GREEDY, max_tokens=3), "a3")
        engine.release_adapter("a3")
        engine.delete_adapter("a3")  # removed between steps while the long rows still decode
        together = [f.result(60) for f in running]
    assert short.completion_tokens == 3 and "a3" not in engine.adapters
    assert together == alone


def test_closing_a_stream_frees_its_row_at_the_next_step(engine):
    """The engine is paused (its model lock held) while the consumer leaves: the row must not decode again."""
    params = SamplingParams(max_tokens=400, temperature=0)
    seen: dict[str, int] = {}

    async def leave_after_first_delta() -> None:
        stream = engine.astream("Hello", params)
        await stream.__anext__()
        with engine._model_lock:  # between two steps: nothing decodes while we look and leave
            (row,) = engine._scheduler.batch.rows
            seen["tokens"], seen["row"] = len(row.tokens), row
            await stream.aclose()  # what Serve does when the HTTP client disconnects

    asyncio.run(leave_after_first_delta())
    deadline = time.monotonic() + 10
    while engine.active_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active_rows == 0
    assert len(seen["row"].tokens) == seen["tokens"] < params.max_tokens  # it never decoded again


def test_seeded_sampling_does_not_depend_on_batch_neighbours(engine):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=40, seed=11)
    alone = engine.generate(PROMPTS[1], params)
    noise = [(PROMPTS[i], SamplingParams(max_tokens=30, temperature=1.0), "a2") for i in range(4)]
    with ThreadPoolExecutor(5) as pool:
        others = [pool.submit(engine.generate, *job) for job in noise]
        together = pool.submit(engine.generate, PROMPTS[1], params).result(60)
        [f.result(60) for f in others]
    assert together == alone
    assert engine.generate(PROMPTS[1], replace(params, top_k=1)) == engine.generate(PROMPTS[1], replace(GREEDY,
                                                                                   max_tokens=16))  # fmt: skip


def test_too_long_prompt_is_rejected_before_any_work(engine):
    with pytest.raises(InvalidRequestError) as err:
        engine.generate("word " * 600, GREEDY)
    assert err.value.code == "context_length_exceeded" and "context is 512 tokens" in str(err.value)


def test_many_threads_get_their_own_answers(engine):
    """32 concurrent callers on 3 models: every answer equals that request alone (no adapter swaps)."""
    jobs = [(PROMPTS[i % len(PROMPTS)], GREEDY, (None, "a1", "a2")[i % 3]) for i in range(32)]
    expected = {(str(p), a): engine.generate(p, GREEDY, a).text for p, _, a in jobs}
    barrier = threading.Barrier(len(jobs))

    def run(job):
        barrier.wait(timeout=30)
        return engine.generate(*job).text

    with ThreadPoolExecutor(len(jobs)) as pool:
        got = list(pool.map(run, jobs))
    assert got == [expected[(str(p), a)] for p, _, a in jobs]


# ============================================================================ the protocol Serve drives it by
def _protocol_members() -> dict[str, object]:
    """The members ServingEngine declares: its methods and properties, and its annotated attributes."""
    declared = {n: m for n, m in vars(ServingEngine).items() if not n.startswith("_")}
    return {**declared, **dict.fromkeys(ServingEngine.__annotations__)}


def test_the_engine_satisfies_the_serving_protocol(engine):
    assert isinstance(engine, ServingEngine)  # runtime_checkable: every member is present
    assert not isinstance(SimpleNamespace(check_health=lambda: None), ServingEngine)  # a partial one is not
    members = _protocol_members()
    assert {"agenerate", "astream", "load_adapter", "acquire_adapter", "release_adapter", "check_health",
            "close", "max_batch_size"} <= set(members)  # fmt: skip
    # Statically: each method takes the same parameters (names, kinds, defaults, annotations) and returns the
    # same type; each property returns the same type; async stays async.
    for name, declared in members.items():
        ours = inspect.getattr_static(GenerationEngine, name, None)
        if declared is None:  # a data attribute: set on every instance
            assert name in vars(engine), name
        elif isinstance(declared, property):
            assert isinstance(ours, property), name
            assert inspect.signature(ours.fget) == inspect.signature(declared.fget), name
        else:
            assert inspect.signature(ours) == inspect.signature(declared), name
            assert inspect.iscoroutinefunction(ours) == inspect.iscoroutinefunction(declared), name
    assert inspect.isasyncgenfunction(GenerationEngine.astream)  # what AsyncIterator[Delta] promises


# ================================================ one request at a time: adapters, stops, eos, sampling
# A fresh engine with default settings and no adapter loaded (the tests load and delete their own).
MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "Where is my parcel?"},
]
GREEDY16 = SamplingParams(max_tokens=16, temperature=0)


@pytest.fixture(scope="module")
def plain_engine(tiny):
    eng = GenerationEngine(tiny.base)
    yield eng
    eng.close()


def _stream(engine: GenerationEngine, params: SamplingParams, adapter: str | None = None) -> list:
    async def collect():
        return [d async for d in engine.astream(MESSAGES, params, adapter=adapter)]

    return asyncio.run(collect())


def test_engine_base_vs_adapter(plain_engine, tiny):
    base = plain_engine.generate(MESSAGES, GREEDY16)
    plain_engine.load_adapter(tiny.a1, "support_v1")
    try:
        with_adapter = plain_engine.generate(MESSAGES, GREEDY16, adapter="support_v1")
        assert with_adapter.text != base.text  # the adapter is applied ...
        assert plain_engine.generate(MESSAGES, GREEDY16).text == base.text  # ... and only where asked for
        prompt = plain_engine.tokenizer.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
        n_prompt = len(plain_engine.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        assert base.prompt_tokens == with_adapter.prompt_tokens == n_prompt
        # A random tiny model never picks eos in 16 greedy steps here: both run to max_tokens.
        assert (with_adapter.finish_reason, with_adapter.completion_tokens) == ("length", GREEDY16.max_tokens)
    finally:
        plain_engine.delete_adapter("support_v1")
    assert plain_engine.adapters == []
    assert "support_v1" not in plain_engine.model.peft_config
    assert plain_engine.generate(MESSAGES, GREEDY16).text == base.text


def test_engine_stop_strings_and_streaming(plain_engine, tiny):
    plain_engine.load_adapter(tiny.a2, "support_v2")
    try:
        full = plain_engine.generate(MESSAGES, GREEDY16, adapter="support_v2")
        assert len(full.text) >= 8, f"the tiny model should say something: {full.text!r}"

        # Streaming yields the same text as one call, in several pieces, and ends with usage.
        deltas = _stream(plain_engine, GREEDY16, adapter="support_v2")
        assert "".join(d.text for d in deltas) == full.text
        assert deltas[-1].finish_reason == full.finish_reason
        assert (deltas[-1].prompt_tokens, deltas[-1].completion_tokens) == (
            full.prompt_tokens,
            full.completion_tokens,
        )

        # A stop string cuts the text before it, finishes with "stop" and ends generation early.
        stop = full.text[4:7]
        expected = full.text[: full.text.find(stop)]
        stopped = plain_engine.generate(MESSAGES, replace(GREEDY16, stop=(stop, "never-there")), adapter="support_v2")
        assert stopped.text == expected
        assert stopped.finish_reason == "stop"
        assert stopped.completion_tokens < full.completion_tokens
        streamed = _stream(plain_engine, replace(GREEDY16, stop=(stop,)), adapter="support_v2")
        assert "".join(d.text for d in streamed) == expected
        assert streamed[-1].finish_reason == "stop"
    finally:
        plain_engine.delete_adapter("support_v2")


def test_engine_stops_at_eos_and_checks_context(plain_engine):
    eos = plain_engine.tokenizer.eos_token_id

    def force_eos(module, inputs, logits):  # the model's only wish: end the turn
        forced = torch.full_like(logits, -1e4)
        forced[..., eos] = 0.0
        return forced

    hook = plain_engine.model.get_output_embeddings().register_forward_hook(force_eos)
    try:
        out = plain_engine.generate(MESSAGES, GREEDY16)
    finally:
        hook.remove()
    assert (out.text, out.finish_reason, out.completion_tokens) == ("", "stop", 1)

    with pytest.raises(InvalidRequestError) as err:
        plain_engine.generate("word " * 600, GREEDY16)
    assert err.value.code == "context_length_exceeded"


def test_engine_stream_closed_early_stops_generating(plain_engine):
    calls = []
    hook = plain_engine.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    params = SamplingParams(max_tokens=200, temperature=0)

    async def read_one_then_leave():
        stream = plain_engine.astream("The parcel", params)
        first = await anext(stream)
        await stream.aclose()  # what Serve does when the HTTP client disconnects
        return first

    try:
        assert asyncio.run(read_one_then_leave()).text
        plain_engine.generate("x", SamplingParams(max_tokens=1, temperature=0))  # waits for the model to be free
    finally:
        hook.remove()
    assert len(calls) < 100  # the abandoned generation stopped long before max_tokens


def test_engine_defers_deleting_a_busy_adapter(plain_engine, tiny):
    plain_engine.load_adapter(tiny.a1, "busy")
    assert plain_engine.acquire_adapter("busy")
    plain_engine.delete_adapter("busy")  # Serve evicts it while a request still holds it
    assert plain_engine.adapters == [] and not plain_engine.acquire_adapter("busy")
    assert plain_engine.generate(MESSAGES, GREEDY16, adapter="busy").text  # the holder still gets its adapter
    plain_engine.release_adapter("busy")
    deadline = time.monotonic() + 10  # removed between decoding steps, by the plain_engine thread
    while "busy" in plain_engine.model.peft_config and time.monotonic() < deadline:
        time.sleep(0.01)
    assert "busy" not in plain_engine.model.peft_config
    plain_engine.delete_adapter("busy")  # idempotent


def test_engine_seeded_sampling_is_reproducible(plain_engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, top_p=0.9, seed=7)
    assert plain_engine.generate("The parcel", params).text == plain_engine.generate("The parcel", params).text
