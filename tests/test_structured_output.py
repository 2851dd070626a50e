"""Structured output in the engine (no Ray, no Serve): ``response_format`` enforced by a per-row grammar mask.

On the tiny random model, whose free text is nowhere near JSON: every finished constrained row parses with
``json.loads`` (strict: no raw control characters) and validates against its schema with ``jsonschema``, under
sampling at temperature 1 over many seeds, with ``n`` choices, streamed, and mixed into batches with unconstrained
rows on other adapters, which stay token-identical to a run without any constrained row. The HTTP side (400s,
the ``openai`` client) is in ``tests/test_serve.py`` and ``tests/test_serve_security.py``.
"""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace

import jsonschema
import pytest
import torch
from helpers import make_tiny_adapter, make_tiny_model
from hypothesis import event, given, settings
from hypothesis import strategies as st

from aigc.errors import InvalidRequestError
from aigc.serve.engine import GenerationEngine, SamplingParams
from aigc.serve.engine import scheduler as scheduler_module
from aigc.serve.engine.grammar import Grammars, mask_rows, parse_response_format
from aigc.serve.engine.logprobs import FLOOR
from aigc.serve.engine.types import ResponseFormat

PROMPT = "Where is my parcel?"
MESSAGES = [{"role": "user", "content": "Give me the order as JSON."}]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},  # maxLength: the string rule xgrammar 0.2.8 left open
        "status": {"enum": ["shipped", "late", "lost"]},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "gift": {"type": "boolean"},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["name", "status", "count", "gift"],
    "additionalProperties": False,
}
AS_SCHEMA = parse_response_format({"type": "json_schema", "json_schema": {"name": "order", "schema": SCHEMA}})
AS_OBJECT = parse_response_format({"type": "json_object"})
SAMPLED = SamplingParams(max_tokens=96, temperature=1.0, response_format=AS_SCHEMA)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("json")
    base = make_tiny_model(tmp / "base")
    return SimpleNamespace(base=base, a1=make_tiny_adapter(base, tmp / "a1", seed=4),
                           a2=make_tiny_adapter(base, tmp / "a2", seed=5))  # fmt: skip


@pytest.fixture(scope="module")
def engine(tiny):
    eng = GenerationEngine(tiny.base, max_batch_size=32, admit_min_rows=32, admit_max_wait_s=0.2)
    eng.load_adapter(tiny.a1, "a1")
    eng.load_adapter(tiny.a2, "a2")
    yield eng
    eng.close()


def _gather(engine: GenerationEngine, jobs: list[tuple]) -> list:
    """Run ``(prompt, params, adapter)`` jobs concurrently: they share the running batch."""

    async def run() -> list:
        return await asyncio.gather(*(engine.agenerate(p, params, adapter=a) for p, params, a in jobs))

    return asyncio.run(run())


def _valid(text: str, schema: dict | None = SCHEMA) -> object:
    value = json.loads(text)  # strict: a raw control character in a string fails here
    if schema is not None:
        jsonschema.validate(value, schema)
    return value


# ====================================================================================== always valid JSON
def test_json_schema_output_parses_and_validates_over_many_seeds_at_temperature_1(engine):
    jobs = [(PROMPT if s % 2 else MESSAGES, SamplingParams(**{**SAMPLED.__dict__, "seed": s}), None) for s in range(24)]
    jobs += [(PROMPT, SamplingParams(max_tokens=96, temperature=1.0, top_p=0.9, top_k=40, seed=100 + s,
                                     response_format=AS_SCHEMA), "a1") for s in range(6)]  # fmt: skip
    outs = _gather(engine, jobs)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        _valid(out.text)
    assert len({o.text for o in outs}) > 20  # sampling really varies within the grammar


def test_json_object_output_is_an_object_whenever_it_finishes(engine):
    outs = _gather(engine, [(PROMPT, SamplingParams(max_tokens=96, temperature=1.0, seed=s,
                                                    response_format=AS_OBJECT), None) for s in range(16)])  # fmt: skip
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= 12  # free-form objects may run to max_tokens (then "length", cut short)
    for out in finished:
        assert isinstance(_valid(out.text, None), dict)
    for out in outs:
        assert out.text.startswith("{")


def test_greedy_and_n_choices_each_follow_the_schema(engine):
    greedy = engine.generate(PROMPT, SamplingParams(max_tokens=96, temperature=0, response_format=AS_SCHEMA))
    _valid(greedy.text)
    out = engine.generate(MESSAGES, SamplingParams(max_tokens=96, temperature=1.0, seed=7, n=4,
                                                   response_format=AS_SCHEMA))  # fmt: skip
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    for c in out.choices:
        assert c.finish_reason == "stop"
        _valid(c.text)
    assert len({c.text for c in out.choices}) > 1  # each choice has its own matcher and RNG


def test_a_row_reaching_max_tokens_ends_with_length(engine):
    out = engine.generate(PROMPT, SamplingParams(max_tokens=5, temperature=1.0, seed=3, response_format=AS_SCHEMA))
    assert (out.finish_reason, out.completion_tokens) == ("length", 5)
    assert '{"name": "'.startswith(out.text) or out.text.startswith('{"name": "')  # the schema's order, fixed spaces


def test_streamed_deltas_reassemble_to_the_same_json(engine):
    params = SamplingParams(max_tokens=96, temperature=1.0, seed=21, n=2, response_format=AS_SCHEMA)

    async def run() -> list:
        return [d async for d in engine.astream(PROMPT, params)]

    deltas = asyncio.run(run())
    whole = engine.generate(PROMPT, params)
    for c in whole.choices:
        text = "".join(d.text for d in deltas if d.index == c.index)
        assert text == c.text
        _valid(text)
        assert [d.finish_reason for d in deltas if d.index == c.index and d.finish_reason] == ["stop"]


# ============================================================================ sharing the batch, paying nothing
def test_mixed_batch_unconstrained_rows_are_token_identical_to_a_run_without_constrained_rows(engine):
    free = [
        (PROMPT, SamplingParams(max_tokens=24, temperature=0, logprobs=0), None),
        (PROMPT, SamplingParams(max_tokens=24, temperature=0, logprobs=0), "a1"),
        (MESSAGES, SamplingParams(max_tokens=24, temperature=1.0, seed=5, logprobs=0), "a2"),
        (PROMPT, SamplingParams(max_tokens=24, temperature=0.8, seed=9, n=2, logprobs=0), "a1"),
    ]
    constrained = [
        (PROMPT, SamplingParams(max_tokens=96, temperature=1.0, seed=1, response_format=AS_SCHEMA), "a2"),
        (MESSAGES, SamplingParams(max_tokens=96, temperature=0, response_format=AS_SCHEMA), None),
        (PROMPT, SamplingParams(max_tokens=96, temperature=1.0, seed=2, n=2, response_format=AS_SCHEMA), "a1"),
        (PROMPT, SamplingParams(max_tokens=48, temperature=1.0, seed=3, response_format=AS_OBJECT), None),
    ]
    alone = _gather(engine, free)
    before = engine.max_rows_seen
    mixed = _gather(engine, [*constrained[:2], *free[:2], *constrained[2:], *free[2:]])
    assert engine.max_rows_seen >= 10 or before >= 10  # all rows shared steps
    for a, m in zip(alone, [*mixed[2:4], *mixed[6:]], strict=True):
        for ca, cm in zip(a.choices, m.choices, strict=True):
            assert [t.token_id for t in cm.logprobs] == [t.token_id for t in ca.logprobs]
            assert cm.text == ca.text and cm.finish_reason == ca.finish_reason
    for out in [*mixed[:2], mixed[4]]:
        for c in out.choices:
            _valid(c.text)


def test_a_batch_without_a_format_does_no_mask_work(engine, monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("mask work for a batch without a response format")

    monkeypatch.setattr(scheduler_module, "mask_rows", boom)
    outs = _gather(engine, [(PROMPT, SamplingParams(max_tokens=8, temperature=1.0, seed=s), "a1") for s in range(4)])
    assert all(o.completion_tokens > 0 for o in outs)


def test_each_distinct_format_compiles_once_and_the_cache_is_bounded(engine):
    before = engine.grammars.compiled
    _gather(engine, [(PROMPT, SamplingParams(max_tokens=4, temperature=0, response_format=AS_SCHEMA), None)] * 3)
    assert engine.grammars.compiled == before  # compiled by an earlier test: reused
    grammars = Grammars(engine.tokenizer, engine.grammars.vocab_size, [engine.tokenizer.eos_token_id], cache_size=2)
    formats = [ResponseFormat("json_schema", json.dumps({"enum": [i]})) for i in range(3)]
    for fmt in [formats[0], formats[0], formats[1], formats[2], formats[2]]:
        grammars.compile(fmt)
    assert grammars.compiled == 3
    grammars.compile(formats[0])  # dropped as the least recently used: compiled again
    assert grammars.compiled == 4


# ======================================================================================= the mask and figures
def test_the_mask_forbids_raw_control_characters_inside_strings(engine):
    """xgrammar 0.2.8 lets a maxLength string hold U+0000-U+001F (but CR and LF); json.loads rejects them."""
    tok = engine.tokenizer
    vocab = engine.grammars.vocab_size
    control = [i for i in range(len(tok)) if any(ord(c) < 0x20 for c in tok.decode([i]))]
    assert control, "the tokenizer should have tokens that decode to control characters"
    bounded = parse_response_format({"type": "json_schema", "json_schema": {"name": "s", "schema": {
        "type": "object", "properties": {"s": {"type": "string", "maxLength": 5}, "t": {"type": "string"}},
        "required": ["s", "t"]}}})  # fmt: skip
    for fmt, prefix in [(bounded, '{"s": "'), (bounded, '{"s": "a", "t": "'), (AS_OBJECT, '{"k": "')]:
        matcher = Grammars.matcher(engine.grammars.compile(fmt))
        assert matcher.accept_string(prefix)
        logits = torch.zeros(1, vocab)
        assert mask_rows(logits, [(0, matcher)]) == {}
        allowed = torch.isfinite(logits[0])
        assert allowed.any() and not allowed[control].any(), prefix


def test_a_matcher_that_fails_ends_its_row_alone():
    tok_logits = torch.randn(3, 64)
    before = tok_logits.clone()

    class Broken:
        def fill_next_token_bitmask(self, bitmask, j):
            raise RuntimeError("matcher already terminated")

    class AllowsNothing:
        def fill_next_token_bitmask(self, bitmask, j):
            bitmask[j] = 0

    errors = mask_rows(tok_logits, [(0, Broken()), (2, AllowsNothing())])
    assert isinstance(errors[0], RuntimeError)
    assert isinstance(errors[2], InvalidRequestError) and errors[2].param == "response_format"
    assert torch.equal(tok_logits[1], before[1])  # an unconstrained row is never touched


def test_logprobs_of_a_constrained_row_come_from_the_masked_distribution(engine):
    out = engine.generate(PROMPT, SamplingParams(max_tokens=96, temperature=1.0, seed=4, logprobs=3,
                                                 response_format=AS_SCHEMA))  # fmt: skip
    ids = [t.token_id for t in out.logprobs]
    prompt_ids = engine._prompts.encode(PROMPT)
    with torch.inference_mode():
        logits = engine.model.get_base_model()(input_ids=torch.tensor([prompt_ids + ids])).logits[0].float()
    matcher = Grammars.matcher(engine.grammars.compile(AS_SCHEMA))
    for j, t in enumerate(out.logprobs):
        row = logits[len(prompt_ids) - 1 + j].clone().unsqueeze(0)
        mask_rows(row, [(0, matcher)])
        ref = torch.log_softmax(row[0], -1)
        assert t.logprob == pytest.approx(float(ref[t.token_id]), abs=1e-4)
        for alt in t.top:  # forbidden tokens are -inf: reported at the floor, never above an allowed one
            assert alt.logprob == pytest.approx(max(float(ref[alt.token_id]), FLOOR), abs=1e-4)
        assert matcher.accept_token(t.token_id)
    assert out.logprobs[0].logprob == pytest.approx(0.0, abs=1e-6)  # '{' is the only token the grammar allows


# ========================================================================================= refused up front
@pytest.mark.parametrize(
    "value,reason",
    [
        ({"type": "xml"}, "must be"),
        ("json_object", "must be"),
        ({"type": "json_schema"}, "json_schema must be an object"),
        ({"type": "json_schema", "json_schema": {"schema": {}}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "name"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "JSON Schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}, "not a valid JSON Schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}, "not a valid JSON Schema"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nope"}}}, "cannot be enforced"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": []}}}, "cannot be enforced"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": False}}, "cannot be enforced"),
        ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": ["x" * 40_000]}}}, "at most"),
    ],
)
def test_invalid_or_unsupported_formats_are_refused_with_the_reason(value, reason):
    with pytest.raises(ValueError, match=reason):
        parse_response_format(value)


def test_text_is_no_format_and_a_format_the_engine_cannot_compile_is_an_invalid_request(engine):
    assert parse_response_format({"type": "text"}) is None and parse_response_format(None) is None
    with pytest.raises(InvalidRequestError) as info:
        engine.generate(PROMPT, SamplingParams(response_format=ResponseFormat("json_schema", '{"type": "foo"}')))
    assert info.value.param == "response_format"


def test_an_int8_engine_enforces_the_format_too(tiny):
    """The mask's width is the logits' (the head's out_features), whatever the base model's weights hold."""
    eng = GenerationEngine(tiny.base, quantization="int8", max_batch_size=4)
    try:
        assert eng.grammars.vocab_size == eng.model.get_base_model().get_output_embeddings().out_features
        out = eng.generate(PROMPT, SamplingParams(max_tokens=96, temperature=1.0, seed=8, response_format=AS_SCHEMA))
        assert out.finish_reason == "stop"
        _valid(out.text)
    finally:
        eng.close()


# Schemas, mostly real (nested objects, arrays, bounds, enums, patterns, refs), some contradictory or malformed.
_SCALAR = st.none() | st.booleans() | st.integers(-5, 5) | st.sampled_from(["a", "b", "[^x", "\\u0000"])
_LEAF = st.one_of(
    st.fixed_dictionaries({"type": st.sampled_from(["string", "integer", "number", "boolean", "null", "nope"])}),
    st.fixed_dictionaries({"enum": st.lists(_SCALAR, max_size=3)}),
    st.fixed_dictionaries({"const": _SCALAR}),
    st.fixed_dictionaries({"type": st.just("string")}, optional={"maxLength": st.integers(-1, 4),
                          "minLength": st.integers(0, 4), "pattern": st.sampled_from(["a+", "[0-9]{2}", "((", "x|y"]),
                          "format": st.sampled_from(["email", "date", "uuid", "nope"])}),
    st.fixed_dictionaries({"type": st.just("integer")}, optional={"minimum": st.integers(-3, 3),
                          "maximum": st.integers(-3, 3)}),
    st.fixed_dictionaries({"$ref": st.sampled_from(["#", "#/nope", "#/$defs/a"])}),
    st.fixed_dictionaries({"not": st.just({})}),
)  # fmt: skip
_SCHEMA = st.recursive(
    _LEAF,
    lambda inner: st.one_of(
        st.fixed_dictionaries({"type": st.just("object"), "properties": st.dictionaries(st.sampled_from("abc"), inner,
                               max_size=3)}, optional={"required": st.lists(st.sampled_from("abcd"), max_size=3),
                               "additionalProperties": st.booleans()}),
        st.fixed_dictionaries({"type": st.just("array"), "items": inner},
                              optional={"minItems": st.integers(0, 3), "maxItems": st.integers(0, 3)}),
        st.fixed_dictionaries({"anyOf": st.lists(inner, max_size=3)}),
        st.fixed_dictionaries({"allOf": st.lists(inner, max_size=2)}),
    ),
    max_leaves=8,
)  # fmt: skip


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(schema=_SCHEMA)
def test_a_schema_is_refused_up_front_or_served_never_a_server_error(engine, schema):
    """What the ingress accepts the replica compiles and decodes: a bad schema is a 400 before admission; later,
    only one no JSON satisfies may end the request, as a 400 naming response_format."""
    try:
        fmt = parse_response_format({"type": "json_schema", "json_schema": {"name": "f", "schema": schema}})
    except ValueError:
        event("refused up front")
        return
    event("accepted")
    try:
        out = engine.generate(PROMPT, SamplingParams(max_tokens=8, temperature=1.0, seed=0, response_format=fmt))
    except InvalidRequestError as exc:
        assert exc.param == "response_format" and exc.code == "response_format_unsatisfiable"
        return
    if out.finish_reason == "stop":
        json.loads(out.text)
