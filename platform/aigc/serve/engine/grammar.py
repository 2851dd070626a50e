"""Structured output: ``response_format`` (a JSON object, or JSON matching a schema) enforced while decoding.

Built on xgrammar (imported on first use: an engine that never sees a format never loads it). Per engine and
tokenizer, one :class:`Grammars` builds xgrammar's tokenizer info once and compiles each distinct format once
(a bounded LRU: :data:`CACHE_SIZE` formats). Each constrained row gets its own ``GrammarMatcher``, which
advances with every token the row accepts; before sampling, :func:`mask_rows` fills the constrained rows' token
bitmasks and sets every token the grammar forbids to ``-inf`` in those rows' logits, so greedy, sampled (any
temperature, top-k, top-p) and logged figures all come from the masked distribution. Rows without a format are
never touched: a batch with none does no mask work at all.

What is enforced:

1. ``json_object``: any JSON object. ``json_schema``: JSON valid under the schema, with xgrammar's strict mode
   (no properties or items the schema does not name). Keywords xgrammar cannot express refuse the request up
   front (:func:`parse_response_format`), as do schemas that are not valid JSON Schema.
2. Whitespace is fixed (``{"a": 1, "b": [2, 3]}``): a grammar that allowed any whitespace lets a weak model
   spend its tokens on blank lines.
3. Strings never hold raw control characters (``json.loads`` rejects them). xgrammar 0.2.8 forbids them in
   free strings but lets a string with ``maxLength``/``minLength`` hold any character but ``"``, ``\\``, CR and
   LF; so each schema's grammar goes through its EBNF text, where every negated character class also
   excludes U+0000-U+001F (:func:`_no_raw_control`), and ``tests/test_structured_output.py`` checks the mask.
4. The row ends with ``stop`` when the grammar is complete and the model emits its end token (the mask allows
   nothing else then); at ``max_tokens`` it ends with ``length`` (the JSON is then cut short). Stop strings
   still cut the text where they appear.
"""

from __future__ import annotations

import json
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch

from aigc.errors import InvalidRequestError
from aigc.serve.engine.types import ResponseFormat

__all__ = [
    "CACHE_SIZE",
    "MAX_SCHEMA_CHARS",
    "Grammars",
    "ResponseFormat",
    "grammar",
    "mask_rows",
    "parse_response_format",
]

CACHE_SIZE = 64  # compiled formats kept per engine (least recently used dropped beyond)
MAX_SCHEMA_CHARS = 32_768  # a schema's JSON text at most: compiling is linear in it, and runs per new schema
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name
_XGR_PREFIX = re.compile(r"^\[[^\]]*\]\s*\S+:\d+:\s*")  # "[17:21:45] /project/cpp/x.cc:12: " before the reason


def parse_response_format(value: Any) -> ResponseFormat | None:
    """OpenAI's ``response_format`` as a :class:`ResponseFormat` (None for ``text``), checked up front.

    Raises:
        ValueError: the value is malformed, the schema is not valid JSON Schema, or xgrammar cannot enforce it
            (the reason is in the message).
    """
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("type") not in ("text", "json_object", "json_schema"):
        raise ValueError('must be {"type": "text"}, {"type": "json_object"} or {"type": "json_schema", ...}')
    if value["type"] == "text":
        return None
    if value["type"] == "json_object":
        return ResponseFormat("json_object")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError('json_schema must be an object: {"name": ..., "schema": {...}, "strict": true}')
    name = spec.get("name")
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ValueError("json_schema.name must be 1 to 64 letters, digits, '_' or '-'")
    if not isinstance(spec.get("strict", False), bool | None):
        raise ValueError("json_schema.strict must be a boolean")
    schema = spec.get("schema")
    if schema is None:  # OpenAI's schema is optional: any JSON object then
        return ResponseFormat("json_object")
    if not isinstance(schema, dict | bool):
        raise ValueError("json_schema.schema must be a JSON Schema (an object)")
    text = json.dumps(schema, ensure_ascii=False)  # keys in order: properties are written in the schema's order
    if len(text) > MAX_SCHEMA_CHARS:
        raise ValueError(f"json_schema.schema is {len(text)} characters of JSON; this server takes at most "
                         f"{MAX_SCHEMA_CHARS}")  # fmt: skip
    _check_json_schema(schema)
    fmt = ResponseFormat("json_schema", text)
    try:
        grammar(fmt)
    except Exception as exc:
        raise ValueError(f"json_schema.schema cannot be enforced: {_reason(exc)}") from None
    return fmt


def grammar(fmt: ResponseFormat) -> Any:
    """xgrammar's grammar for ``fmt`` (no tokenizer needed), strings free of raw control characters.

    Raises:
        RuntimeError: xgrammar cannot express the schema (the reason is in the message).
    """
    xgr = _xgr()
    converted = xgr.Grammar.from_json_schema(fmt.schema_text, **_GRAMMAR_OPTIONS)
    return xgr.Grammar.from_ebnf(_no_raw_control(str(converted)))


_CONTROL = "\\0-\\x1f"  # U+0000-U+001F as an EBNF class range


def _no_raw_control(ebnf: str) -> str:
    """``ebnf`` with U+0000-U+001F excluded from every negated character class (``[^...]``) outside string
    literals: in JSON they can only stand inside strings, where they must be escaped."""
    out, i = [], 0
    while i < len(ebnf):
        c = ebnf[i]
        if c == '"':  # a literal (or a Regex's pattern): copied as is, escapes included
            j = i + 1
            while ebnf[j] != '"':
                j += 2 if ebnf[j] == "\\" else 1
            out.append(ebnf[i : j + 1])
            i = j + 1
        elif c == "[":
            j = i + 1
            while ebnf[j] != "]":
                j += 2 if ebnf[j] == "\\" else 1
            cls = ebnf[i : j + 1]
            if cls.startswith("[^") and not cls.startswith("[^" + _CONTROL):
                cls = "[^" + _CONTROL + cls[2:]
            out.append(cls)
            i = j + 1
        else:
            out.append(c)
            i += 1
    return "".join(out)


def _check_json_schema(schema: Any) -> None:
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise ValueError(f"json_schema.schema is not a valid JSON Schema{f' at {where}' if where else ''}: "
                         f"{exc.message}"[:500]) from None  # fmt: skip
    except Exception as exc:  # a $schema naming an unknown draft, a recursion too deep...
        raise ValueError(f"json_schema.schema cannot be read as a JSON Schema: {exc}"[:500]) from None


_GRAMMAR_OPTIONS: dict[str, Any] = {"any_whitespace": False, "strict_mode": True}  # see the module doc, 1-2


def _xgr() -> Any:
    import xgrammar

    return xgrammar


def _reason(exc: BaseException) -> str:
    return _XGR_PREFIX.sub("", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)[:300]


class Grammars:
    """One engine's compiled formats (a bounded LRU) and the tokenizer info they are compiled for.

    Safe from many threads: requests compile on their callers' threads (:func:`aigc.serve.engine.requests.prepare`),
    never on the engine thread.

    Args:
        tokenizer: the engine's Hugging Face tokenizer.
        vocab_size: the width of the model's logits (may exceed the tokenizer's vocabulary: padded rows).
        stop_ids: the token ids that end a row (the grammar allows them once the JSON is complete).
        cache_size: compiled formats kept.
    """

    def __init__(self, tokenizer: Any, vocab_size: int, stop_ids: Iterable[int], cache_size: int = CACHE_SIZE):
        self._tokenizer, self.vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self.cache_size = cache_size
        self._compiler: Any = None
        self._cache: OrderedDict[ResponseFormat, Any] = OrderedDict()
        self._lock = threading.Lock()
        self.compiled = 0  # grammars compiled so far (a cache miss each)

    def compile(self, fmt: ResponseFormat) -> Any:
        """The compiled grammar for ``fmt`` (from the cache when it was compiled before).

        Raises:
            InvalidRequestError: xgrammar cannot compile it (``param``: ``response_format``).
        """
        with self._lock:  # compiles one at a time: a new schema costs milliseconds, once
            hit = self._cache.get(fmt)
            if hit is not None:
                self._cache.move_to_end(fmt)
                return hit
            if self._compiler is None:  # the tokenizer's info is built once per engine
                xgr = _xgr()
                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_ids)  # fmt: skip
                self._compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
            try:
                compiled = self._compiler.compile_grammar(grammar(fmt))
            except Exception as exc:
                raise InvalidRequestError(f"response_format cannot be enforced: {_reason(exc)}",
                                          param="response_format") from None  # fmt: skip
            self.compiled += 1
            self._cache[fmt] = compiled
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
            return compiled

    @staticmethod
    def matcher(grammar: Any) -> Any:
        """A fresh matcher for one row (cheap: the compiled grammar holds the work)."""
        return _xgr().GrammarMatcher(grammar)


def mask_rows(logits: torch.Tensor, matchers: list[tuple[int, Any]]) -> dict[int, BaseException]:
    """Set the tokens each constrained row's grammar forbids now to ``-inf``, in place.

    Args:
        logits: ``[rows, vocab]`` scores of the step (an inference tensor: masked in inference mode).
        matchers: ``(row index, its matcher)`` for the constrained rows only.

    Returns:
        Per row index, the error that ends that row (its grammar allows no token: a 400); the others are masked.
    """
    xgr = _xgr()
    vocab = logits.shape[-1]
    bitmask = xgr.allocate_token_bitmask(len(matchers), vocab)
    errors: dict[int, BaseException] = {}
    for j, (i, m) in enumerate(matchers):
        try:
            m.fill_next_token_bitmask(bitmask, j)
        except Exception as exc:  # one row's matcher: that row ends, its neighbours are masked
            errors[i] = exc
    index = torch.tensor([i for i, _ in matchers], device=logits.device)
    with torch.inference_mode():
        rows = logits.index_select(0, index)
        xgr.apply_token_bitmask_inplace(rows, bitmask.to(logits.device), vocab_size=vocab)
        logits.index_copy_(0, index, rows)
        dead = rows.isneginf().all(-1).tolist()  # the grammar allows no token at all
    # Only a schema no JSON satisfies gets here (xgrammar compiles some, e.g. a contradictory allOf): the client's.
    for (i, _), d in zip(matchers, dead, strict=True):
        if d and i not in errors:
            errors[i] = InvalidRequestError("the response format's schema admits no JSON continuing this output",
                                            param="response_format", code="response_format_unsatisfiable")  # fmt: skip
    return errors
