"""The engine under faults (no Ray, no Serve): a row's failure ends that row alone, hostile values decode,
failed adapter loads leave no trace, a wedged or failing engine reports itself unhealthy, deadlines hold.

Faults are real where they can be on a CPU: hostile sampling values through the public API, an adapter whose
weights overflow, corrupt and mis-shaped adapter files, a chat template that raises. Device faults (a prefill
out of memory, a hung GPU, a failing device) are raised or blocked inside the model's own ``forward``, where a
real device raises them.
"""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import make_tiny_adapter, make_tiny_model
from safetensors.torch import load_file, save_file

from aigc.errors import (
    AdapterLoadError,
    GenerationError,
    InvalidRequestError,
    RequestTimeoutError,
    ServiceUnavailableError,
)
from aigc.serve.engine import GenerationEngine, SamplingParams

GREEDY = SamplingParams(max_tokens=20, temperature=0)
ORDINARY = ["Where is my parcel?", "Hello", "The coffee grinder", "Returns are free", "Please send us", "Our team"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    base = make_tiny_model(tmp / "base")
    return tmp, base


@pytest.fixture
def engine(built):
    """A fresh engine per test: several tests break it on purpose."""
    _, base = built
    eng = GenerationEngine(base, max_batch_size=16, admit_min_rows=4, stall_timeout_s=1.0)
    yield eng
    eng.close()


def _alone(engine: GenerationEngine) -> dict[str, str]:
    return {p: engine.generate(p, GREEDY).text for p in ORDINARY}


def _together(engine: GenerationEngine, extra: list[tuple]) -> tuple[dict[str, object], list[object]]:
    """The ordinary prompts and ``extra`` jobs sent at once (they share decoding steps); errors are returned."""

    def run(job):
        try:
            return engine.generate(*job)
        except Exception as exc:
            return exc

    jobs = [(p, GREEDY) for p in ORDINARY] + extra
    barrier = threading.Barrier(len(jobs))

    def go(job):
        barrier.wait(timeout=30)
        return run(job)

    before = engine.max_rows_seen
    with ThreadPoolExecutor(len(jobs)) as pool:
        out = list(pool.map(go, jobs))
    assert engine.max_rows_seen > max(before, 1) or engine.max_rows_seen >= len(jobs) // 2  # they shared steps
    return {p: o for p, o in zip(ORDINARY, out, strict=False)}, out[len(ORDINARY) :]


# ----------------------------------------------------------------------------- hostile values, one row at a time
@pytest.mark.parametrize("temperature", [1e-38, 5e-324, 1e-30, 1e-6])
def test_a_tiny_temperature_decodes_greedily_and_harms_no_neighbour(engine, temperature):
    expected = _alone(engine)
    hostile = SamplingParams(max_tokens=20, temperature=temperature, top_p=0.5)
    ordinary, (odd,) = _together(engine, [("Hello", hostile)])
    assert {p: c.text for p, c in ordinary.items()} == expected  # token-identical to running alone
    assert odd.text == expected["Hello"]  # below the floor the row is greedy


def test_an_adapter_whose_scores_overflow_fails_its_rows_alone(engine, built):
    tmp, base = built
    path = Path(make_tiny_adapter(base, tmp / "overflow", seed=2))
    weights = load_file(path / "adapter_model.safetensors")
    save_file({k: v * 1e30 for k, v in weights.items()}, path / "adapter_model.safetensors")  # finite, but inf in use
    engine.load_adapter(str(path), "overflow")
    expected = _alone(engine)
    ordinary, bad = _together(engine, [("Hello", GREEDY, "overflow"), ("Returns?", GREEDY, "overflow")])
    assert {p: c.text for p, c in ordinary.items()} == expected
    assert all(isinstance(e, GenerationError) and e.code == "non_finite" for e in bad), bad
    assert engine.health() is None  # a bad adapter never takes the replica down


def _greedy_ids(engine: GenerationEngine, prompt: str, n: int) -> list[int]:
    """The token ids the engine generates greedily for ``prompt`` (transformers' own greedy decoding)."""
    ids = torch.tensor([engine._prompts.encode(prompt)])
    out = engine.model.get_base_model().generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, ids.shape[1] :].tolist()


def test_a_row_whose_detokenizer_raises_ends_alone(engine):
    expected = _alone(engine)
    seen = {t for p in ORDINARY for t in _greedy_ids(engine, p, GREEDY.max_tokens)}
    poisoned_prompt = next(p for p in ("Hello there", "Thank you", "Your password", "If the app") if
                           set(_greedy_ids(engine, p, GREEDY.max_tokens)) - seen)  # fmt: skip
    poison = next(iter(set(_greedy_ids(engine, poisoned_prompt, GREEDY.max_tokens)) - seen))
    real_decode = engine.tokenizer.decode

    def decode(ids, **kw):  # a detokenizer bug on one token id that only the poisoned row produces
        if poison in ids:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "simulated detokenizer bug")
        return real_decode(ids, **kw)

    engine.tokenizer.decode = decode
    try:
        ordinary, (bad,) = _together(engine, [(poisoned_prompt, GREEDY)])
    finally:
        engine.tokenizer.decode = real_decode
    assert {p: c.text for p, c in ordinary.items()} == expected
    assert isinstance(bad, UnicodeDecodeError)
    assert engine.health() is None


def test_a_chat_template_that_raises_is_an_invalid_request(engine):
    saved = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation roles must start with user') }}"
        "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    try:
        with pytest.raises(InvalidRequestError) as err:
            engine.generate([{"role": "assistant", "content": "hi"}], GREEDY)
    finally:
        engine.tokenizer.chat_template = saved
    assert err.value.param == "messages" and err.value.code == "invalid_messages"
    assert "roles must start with user" in str(err.value)


# ----------------------------------------------------------------------------- device faults in the forward pass
def _patch_forward(engine: GenerationEngine, hook):
    """Wrap the base model's forward (where a device raises or hangs); returns a restore function."""
    model = engine.model.get_base_model()
    real = model.forward

    def forward(*args, **kw):
        hook(kw)
        return real(*args, **kw)

    model.forward = forward
    return lambda: setattr(model, "forward", real)


def test_a_prefill_out_of_memory_fails_only_the_row_at_fault(engine):
    expected = _alone(engine)
    huge = " ".join(["word"] * 120)

    def oom_on_long_rows(kw):
        ids = kw["input_ids"]
        if ids.shape[1] > 100 and (kw["attention_mask"].sum(-1) > 100).any():
            raise torch.OutOfMemoryError("simulated: out of memory prefilling a long prompt")

    restore = _patch_forward(engine, oom_on_long_rows)
    try:
        ordinary, (bad,) = _together(engine, [(huge, GREEDY)])
    finally:
        restore()
    assert {p: c.text for p, c in ordinary.items()} == expected
    assert isinstance(bad, torch.OutOfMemoryError)
    assert engine.health() is None


def test_every_pass_failing_makes_the_engine_unhealthy_and_refuse_work(engine):
    def broken_device(kw):
        raise RuntimeError("simulated: CUDA error: an illegal memory access was encountered")

    restore = _patch_forward(engine, broken_device)
    try:
        for _ in range(3):  # each request's prefill fails: the request fails, and the failure is counted
            with pytest.raises(RuntimeError, match="illegal memory access"):
                engine.generate("Hello", GREEDY)
        problem = engine.health()
        assert problem and "3 forward passes failed in a row" in problem and "illegal memory access" in problem
        with pytest.raises(RuntimeError, match="generation engine unhealthy"):
            engine.check_health()
        t0 = time.monotonic()
        with pytest.raises(ServiceUnavailableError) as err:
            engine.generate("Hello", GREEDY)  # refused at once: another replica should take it
        assert err.value.code == "replica_unhealthy" and time.monotonic() - t0 < 0.5
    finally:
        restore()


def test_a_wedged_engine_fails_its_health_check_and_requests_meet_their_deadline(engine):
    release = threading.Event()
    restore = _patch_forward(engine, lambda kw: release.wait(60))  # a hung device: the pass never returns
    try:
        waiting = ThreadPoolExecutor(1).submit(engine.generate, "Hi", GREEDY, None, 5.0)
        time.sleep(0.5)
        assert engine.health() is None  # not yet: stall_timeout_s is 1 s
        t0 = time.monotonic()
        with pytest.raises(RequestTimeoutError) as err:
            engine.generate("Hello", GREEDY, timeout_s=2.0)
        waited = time.monotonic() - t0
        assert 2.0 <= waited < 4.0 and err.value.code == "request_timeout"  # the caller is never stuck past it
        assert "a forward pass has run for" in (engine.health() or "")
        with pytest.raises(RuntimeError, match="generation engine unhealthy"):
            engine.check_health()
        with pytest.raises(RequestTimeoutError):
            waiting.result(10)
    finally:
        release.set()
        restore()


def test_a_deadline_ends_the_request_and_frees_its_row_while_neighbours_finish(engine):
    long = SamplingParams(max_tokens=400, temperature=0)
    expected = engine.generate("Hello", SamplingParams(max_tokens=40, temperature=0)).text

    async def run():
        slow = asyncio.create_task(_collect(engine, "Where is my parcel?", long, timeout_s=0.3))
        normal = asyncio.create_task(_collect(engine, "Hello", SamplingParams(max_tokens=40, temperature=0)))
        return await asyncio.gather(slow, normal, return_exceptions=True)

    slow_out, normal_out = asyncio.run(_slowed(engine, run))
    assert isinstance(slow_out, RequestTimeoutError)
    assert "".join(d.text for d in normal_out) == expected
    deadline = time.monotonic() + 5
    while engine.active_rows and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.active_rows == 0


async def _collect(engine, prompt, params, timeout_s=None):
    return [d async for d in engine.astream(prompt, params, timeout_s=timeout_s)]


async def _slowed(engine, run):
    """Each forward pass takes >= 20 ms, so 400 tokens cannot finish within the 0.3 s deadline on any machine."""
    restore = _patch_forward(engine, lambda kw: time.sleep(0.02))
    try:
        return await run()
    finally:
        restore()


# ----------------------------------------------------------------------------- adapters that fail leave no trace
def _footprint(engine: GenerationEngine) -> tuple[int, list[str]]:
    return sum(p.numel() for p in engine.model.parameters()), sorted(engine.model.peft_config)


def test_failed_adapter_loads_leave_the_model_unchanged(engine, built):
    tmp, base = built
    good = Path(make_tiny_adapter(base, tmp / "good-for-faults", seed=3))
    # 1. mis-shaped weights: peft injects the modules, then copying the weights fails
    misshaped = tmp / "misshaped"
    misshaped.mkdir(exist_ok=True)
    (misshaped / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    weights = load_file(good / "adapter_model.safetensors")
    save_file({k: torch.zeros(v.shape[0] + 1, *v.shape[1:]) for k, v in weights.items()},
              misshaped / "adapter_model.safetensors")  # fmt: skip
    # 2. a corrupt file: fails while reading, before the model is touched
    corrupt = tmp / "corrupt"
    corrupt.mkdir(exist_ok=True)
    (corrupt / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    (corrupt / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    # 3. non-finite weights: refused before the model is touched
    nan = tmp / "nan"
    nan.mkdir(exist_ok=True)
    (nan / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    save_file({k: torch.full_like(v, float("nan")) for k, v in weights.items()}, nan / "adapter_model.safetensors")

    before = _footprint(engine)
    for i in range(5):
        for path in (misshaped, corrupt, nan):
            with pytest.raises(AdapterLoadError):
                engine.load_adapter(str(path), f"bad_{path.name}_{i}")
    assert _footprint(engine) == before
    assert engine.adapters == [] and engine.health() is None
    engine.load_adapter(str(good), "good")  # and a good one still loads and changes the answer
    assert engine.generate("Hello", GREEDY, "good").text != engine.generate("Hello", GREEDY).text


def test_a_delete_that_peft_cannot_do_marks_the_engine_unhealthy_without_spinning(engine, built):
    tmp, base = built
    engine.load_adapter(make_tiny_adapter(base, tmp / "undeletable", seed=7), "undeletable")
    real = engine.model.delete_adapter

    def refuse(name):
        raise RuntimeError("simulated: peft failed to delete the adapter")

    engine.model.delete_adapter = refuse
    try:
        engine.delete_adapter("undeletable")
        assert "could not delete adapter 'undeletable'" in (engine.health() or "")
        cpu = time.process_time()
        time.sleep(1.0)
        assert time.process_time() - cpu < 0.3  # the engine thread is not looping on the failed delete
    finally:
        engine.model.delete_adapter = real
