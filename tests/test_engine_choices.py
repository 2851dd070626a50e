"""Log-probabilities and ``n`` choices in the engine (no Ray, no Serve): figures equal a reference forward pass,
the prompt of ``n`` choices is prefilled once, seeds per choice reproduce, stop strings cut the reported tokens,
and a row asking for log-probabilities never changes or fails its batch neighbours.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from helpers import make_tiny_model

from aigc.errors import InvalidRequestError
from aigc.serve.engine import GenerationEngine, SamplingParams
from aigc.serve.engine.logprobs import FLOOR, step_logprobs, token_bytes

PROMPT = "Where is my parcel?"
GREEDY = SamplingParams(max_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    base = make_tiny_model(tmp_path_factory.mktemp("choices") / "base")
    eng = GenerationEngine(base, max_batch_size=16, admit_min_rows=4)
    yield eng
    eng.close()


def _reference(engine: GenerationEngine, prompt: str, token_ids: list[int]) -> torch.Tensor:
    """log_softmax of one plain forward pass over prompt + generated tokens: row j = the distribution token j
    was drawn from."""
    prompt_ids = engine._prompts.encode(prompt)
    ids = torch.tensor([prompt_ids + token_ids])
    with torch.inference_mode():
        logits = engine.model.get_base_model()(input_ids=ids).logits[0].float()
    return torch.log_softmax(logits, -1)[len(prompt_ids) - 1 : len(prompt_ids) - 1 + len(token_ids)]


def test_logprobs_equal_a_reference_forward_and_greedy_top_holds_the_chosen_token(engine):
    out = engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, logprobs=5))
    lps = out.logprobs
    assert len(lps) == out.completion_tokens - (out.finish_reason == "stop")  # the eos token has no text
    assert "".join(t.token for t in lps) == out.text  # this reply's tokens each decode alone to their text
    # the raw bytes are the reply's (where the model emitted invalid UTF-8, the text holds U+FFFD for it)
    assert b"".join(t.raw for t in lps).decode("utf-8", errors="replace") == out.text
    ref = _reference(engine, PROMPT, [t.token_id for t in lps])
    for j, t in enumerate(lps):
        assert t.logprob == pytest.approx(float(ref[j, t.token_id]), abs=1e-4)
        assert len(t.top) == 5
        assert [a.logprob for a in t.top] == sorted((a.logprob for a in t.top), reverse=True)
        assert t.top[0].token_id == t.token_id  # greedy: the chosen token is the most likely one
        want = torch.topk(ref[j], 5)
        assert [a.token_id for a in t.top] == want.indices.tolist()
        assert [a.logprob for a in t.top] == pytest.approx(want.values.tolist(), abs=1e-4)
    assert [t.offset for t in lps] == [len("".join(x.token for x in lps[:j])) for j in range(len(lps))]


def test_sampled_tokens_report_the_raw_distribution_not_the_tempered_one(engine):
    params = SamplingParams(max_tokens=10, temperature=1.7, top_k=3, seed=11, logprobs=0)
    out = engine.generate(PROMPT, params)
    ref = _reference(engine, PROMPT, [t.token_id for t in out.logprobs])
    assert [t.logprob for t in out.logprobs] == pytest.approx(
        [float(ref[j, t.token_id]) for j, t in enumerate(out.logprobs)], abs=1e-4
    )
    assert all(t.top == () for t in out.logprobs)  # k = 0: the chosen token only


def test_tokens_after_a_stop_string_are_not_reported(engine):
    full = engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, logprobs=0))
    cut_at = full.logprobs[4].offset + 1  # the stop string starts inside the fifth token's text
    stop = full.text[cut_at : cut_at + 2]
    assert full.text.find(stop) == cut_at, "pick a stop string that occurs first where it is cut"
    out = engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, logprobs=0, stop=(stop,)))
    assert out.text == full.text[:cut_at]
    assert [t.token_id for t in out.logprobs] == [t.token_id for t in full.logprobs[:5]]


def test_streamed_logprobs_arrive_with_their_text(engine):
    async def run() -> list:
        return [d async for d in engine.astream(PROMPT, SamplingParams(max_tokens=12, temperature=0, logprobs=2))]

    deltas = asyncio.run(run())
    whole = engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0, logprobs=2))
    assert [t for d in deltas for t in d.logprobs] == whole.logprobs
    sent = 0
    for d in deltas:
        sent += len(d.text)
        assert all(t.offset < sent for t in d.logprobs)


def test_a_token_inside_a_multibyte_character_reports_its_own_bytes():
    assert token_bytes("<0xE2>", "\ufffd") == b"\xe2"  # sentencepiece byte fallback
    assert token_bytes("Ã©", "é") == "é".encode()  # byte-level BPE: é is the two bytes C3 A9
    assert token_bytes("âĢ", "\ufffd") == "…".encode()[:2]  # the first two of the three bytes of …
    assert token_bytes("▁word", "\ufffd") == "\ufffd".encode()  # neither: what the tokenizer decoded


def test_rows_that_do_not_ask_pay_nothing_and_figures_stay_finite():
    logits = torch.tensor([[0.0, 1.0, 2.0], [float("-inf")] * 3, [1.0, float("-inf"), 0.0]])
    assert step_logprobs(logits, [None, None, None], [2, 0, 0]) == [None, None, None]
    got = step_logprobs(logits, [None, 1, 2], [2, 0, 1])
    assert got[0] is None
    assert got[1] == (FLOOR, [(0, FLOOR)])  # no distribution at all: the floor, never nan
    chosen, top = got[2]
    assert chosen == FLOOR and [t for t, _ in top] == [0, 2]
    assert step_logprobs(logits, [3], [ValueError("row failed")]) == [None]


def test_n_choices_share_one_prefill_and_greedy_choices_are_identical(engine):
    before = engine._scheduler.batch.prefilled_rows
    out = engine.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, n=4, logprobs=1))
    assert engine._scheduler.batch.prefilled_rows - before == 1
    alone = engine.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, logprobs=1))
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert {c.text for c in out.choices} == {alone.text}
    for c in out.choices:  # a batch of 4 rows rounds differently from 1: equal within float tolerance
        assert [t.token_id for t in c.logprobs] == [t.token_id for t in alone.logprobs]
        assert [t.logprob for t in c.logprobs] == pytest.approx([t.logprob for t in alone.logprobs], abs=1e-4)
    assert out.completion_tokens == 4 * alone.completion_tokens
    assert out.prompt_tokens == alone.prompt_tokens


def test_seeded_choices_are_distinct_and_reproducible(engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, seed=42, n=3)
    first, again = engine.generate(PROMPT, params), engine.generate(PROMPT, params)
    texts = [c.text for c in first.choices]
    assert texts == [c.text for c in again.choices]
    assert len(set(texts)) == 3
    # choice i samples as a single request with seed + i would
    assert engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=1.0, seed=43)).text == texts[1]


def test_streamed_choices_carry_their_index_and_finish_each(engine):
    async def run() -> list:
        return [d async for d in engine.astream(PROMPT, SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=3))]

    deltas = asyncio.run(run())
    whole = engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=1.0, seed=5, n=3))
    for c in whole.choices:
        mine = [d for d in deltas if d.index == c.index]
        assert "".join(d.text for d in mine) == c.text
        assert [d.finish_reason for d in mine if d.finish_reason] == [c.finish_reason]


def test_bad_n_and_top_logprobs_are_refused_by_name(engine):
    for params, param in [(SamplingParams(n=9), "n"), (SamplingParams(n=0), "n"),
                          (SamplingParams(logprobs=21), "top_logprobs")]:  # fmt: skip
        with pytest.raises(InvalidRequestError) as err:
            engine.generate(PROMPT, params)
        assert err.value.param == param


def test_a_row_with_logprobs_and_hostile_settings_leaves_its_neighbours_alone(engine):
    prompts = ["Hello", "The coffee grinder", "Returns are free", "Our team"]
    alone = {p: engine.generate(p, GREEDY).text for p in prompts}
    hostile = SamplingParams(max_tokens=12, temperature=1e-38, top_p=1e-9, top_k=10**9, logprobs=20, n=8)
    jobs = [(p, GREEDY) for p in prompts] + [(PROMPT, hostile)] * 2
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda job: engine.generate(*job), jobs))
    assert {p: o.text for (p, _), o in zip(jobs, outs, strict=False) if p in alone} == alone
    assert all(len(t.top) == 20 for t in outs[-1].logprobs)
    assert len(outs[-1].choices) == 8
    assert engine.max_rows_seen <= engine.max_batch_size  # choices count as rows: 20 rows never share a step


def test_a_failing_logprobs_computation_ends_only_the_rows_that_asked(engine, monkeypatch):
    import aigc.serve.engine.scheduler as scheduler

    def broken(logits, wants, tokens):
        if any(k is not None for k in wants):
            raise RuntimeError("log_softmax failed")
        return [None] * len(wants)

    monkeypatch.setattr(scheduler, "step_logprobs", broken)
    alone = engine.generate("Hello", GREEDY).text
    jobs = [("Hello", GREEDY), (PROMPT, SamplingParams(max_tokens=12, temperature=0, logprobs=3))]

    def run(job):
        try:
            return engine.generate(*job)
        except Exception as exc:
            return exc

    with ThreadPoolExecutor(2) as pool:
        plain, asked = pool.map(run, jobs)
    assert plain.text == alone
    assert isinstance(asked, RuntimeError) and str(asked) == "log_softmax failed"
