"""Tool calls on the OpenAI endpoint: requests checked, rendered as training renders them, answers parsed back.

Unit tests cover the parser (Hermes/Qwen ``<tool_call>`` and Llama-3 JSON, streamed and whole) and the
rendering; the served tests use a tiny model fine-tuned in the fixture (a few dozen full-model steps, seconds)
to answer two fixed conversations with tool calls, so the round trip through the official ``openai`` client is
deterministic (greedy).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
from helpers import free_port, last_prompt_ids, make_tiny_model, tiny_tokenizer_with_template

from aigc.config import DataConfig, ModelConfig, PlatformConfig
from aigc.data.templates import encode_chat, render_prompt
from aigc.data.tokenizing import Tokenize
from aigc.models.chat_template import DEFAULT_CHAT_TEMPLATE
from aigc.models.loading import load_tokenizer
from aigc.serve.api_errors import ApiError
from aigc.serve.engine.prompts import PromptEncoder
from aigc.serve.engine.tool_prompts import ToolPrompt, ToolSyntax, tool_syntax
from aigc.serve.schemas import ChatCompletionRequest
from aigc.serve.tool_calls import ToolCalls, ToolCallStream, answer_choice, parse_calls, plan_tools

TIMEOUT_S = 60
TRACK = {"type": "function", "function": {"name": "track", "description": "Track an order",
         "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}}  # fmt: skip
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
TOOLS = [TRACK, WEATHER]

# A Hermes/Qwen-style template (Qwen 2.5's tool layout): tools in the system turn, calls as
# <tool_call>\n{json}\n</tool_call>, results in <tool_response> inside a user turn.
QWEN_TOOLS = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% else %}You are a helpful assistant.{% endif %}\n\n# Tools\n\n<tools>{% for tool in tools %}\n"
    "{{ tool | tojson }}{% endfor %}\n</tools>\n\nFor each function call, return a json object within "
    "<tool_call></tool_call> XML tags.<|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'user' or (m.role == 'assistant' and not m.tool_calls) %}"
    "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
    "{%- elif m.role == 'assistant' %}<|im_start|>assistant{% if m.content %}\n{{ m.content }}{% endif %}"
    "{%- for c in m.tool_calls %}{% set f = c.function if c.function is defined else c %}\n<tool_call>\n"
    '{"name": "{{ f.name }}", "arguments": {{ f.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n'
    "{%- elif m.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>\n"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"
)
CHATML_NO_TOOLS = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The conversation as a client sends it (OpenAI shapes: arguments as a JSON string, content null)...
API_CONVO = [
    {"role": "system", "content": "You are the shop's support agent."},
    {"role": "user", "content": [{"type": "text", "text": "Where is order "}, {"type": "text", "text": "#4821?"}]},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "track", "arguments": '{"order": "4821"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "at the depot"},
    {"role": "user", "content": "And when will it arrive?"},
]  # fmt: skip
# ... and as a training row (the data layer's messages format), with the answer that follows.
TRAIN_CONVO = [
    {"role": "system", "content": "You are the shop's support agent."},
    {"role": "user", "content": "Where is order #4821?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "track", "arguments": {"order": "4821"}}}]},
    {"role": "tool", "content": "at the depot", "tool_call_id": "call_1"},
    {"role": "user", "content": "And when will it arrive?"},
    {"role": "assistant", "content": "Tomorrow before noon."},
]  # fmt: skip


# ================================================================================================ rendering
@pytest.mark.parametrize("template", [QWEN_TOOLS, None], ids=["qwen-hermes", "default"])
def test_served_prompt_with_tools_is_the_training_prompt(tmp_path, template):
    path = tiny_tokenizer_with_template(tmp_path, template)
    tok = load_tokenizer(path)
    tk = Tokenize(ModelConfig(name_or_path=path), DataConfig(format="messages"))
    (row,) = tk({"raw": np.array([json.dumps({"messages": TRAIN_CONVO, "tools": TOOLS})])}).to_pylist()
    assert row["ok"], row

    body = ChatCompletionRequest.model_validate({"model": "m", "messages": API_CONVO, "tools": TOOLS})
    messages = [m.as_template_dict() for m in body.messages]
    prompt, calls = plan_tools(messages, body.tools, body.tool_choice, tool_syntax(tok))
    assert isinstance(prompt, ToolPrompt) and calls is not None and calls.opening == ""
    served = PromptEncoder(tok).encode(prompt)  # what the engine encodes for this chat request
    assert served == last_prompt_ids(row)
    text = render_prompt(tok, TRAIN_CONVO[:-1], TOOLS)
    assert tok.decode(served) == text  # byte for byte
    assert json.dumps(TRACK["function"]) in text and '"order": "4821"' in text and "at the depot" in text


def test_tool_syntax_is_read_from_the_template(tmp_path):
    qwen = load_tokenizer(tiny_tokenizer_with_template(tmp_path / "q", QWEN_TOOLS))
    assert tool_syntax(qwen) == ToolSyntax(renders_tools=True, format="hermes", marker_newline=True)
    assert tool_syntax(qwen).opening("track") == '<tool_call>\n{"name": "track", "arguments": '
    default = load_tokenizer(tiny_tokenizer_with_template(tmp_path / "d", None))
    assert default.chat_template == DEFAULT_CHAT_TEMPLATE
    assert tool_syntax(default) == ToolSyntax(renders_tools=True, format="hermes", marker_newline=False)
    assert tool_syntax(default).opening(None) == "<tool_call>"
    plain = load_tokenizer(tiny_tokenizer_with_template(tmp_path / "p", CHATML_NO_TOOLS))
    assert tool_syntax(plain) == ToolSyntax(renders_tools=False)
    llama_template = (  # Llama 3.1's wording, cut down: tools as JSON in the user turn, calls as bare JSON
        "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{% if tools and loop.last %}"
        'Respond with {"name": function name, "parameters": dictionary of argument name and its value}.\n'
        "{% for t in tools %}{{ t | tojson }}\n{% endfor %}{% endif %}{{ m['content'] }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
    )
    llama_tok = load_tokenizer(tiny_tokenizer_with_template(tmp_path / "l", llama_template))
    assert tool_syntax(llama_tok) == ToolSyntax(renders_tools=True, format="llama3")
    llama = ToolSyntax(renders_tools=True, format="llama3")
    assert llama.opening("track") == '{"name": "track", "parameters": ' and llama.opening(None) == '{"name": '


def test_forced_call_ends_the_prompt_with_the_opening(tmp_path):
    tok = load_tokenizer(tiny_tokenizer_with_template(tmp_path, QWEN_TOOLS))
    msgs = [{"role": "user", "content": "Where is order 7?"}]
    choice = ("function", "track")
    prompt, calls = plan_tools(msgs, TOOLS, choice, tool_syntax(tok))
    assert calls == ToolCalls("hermes", frozenset({"track"}), '<tool_call>\n{"name": "track", "arguments": ')
    ids = PromptEncoder(tok).encode(prompt)
    assert ids[: len(encode_chat(tok, msgs, TOOLS))] == encode_chat(tok, msgs, TOOLS)
    assert tok.decode(ids) == render_prompt(tok, msgs, TOOLS) + calls.opening
    _, required = plan_tools(msgs, TOOLS, ("required", None), tool_syntax(tok))
    assert required == ToolCalls("hermes", frozenset({"track", "weather"}), "<tool_call>\n")
    plain, none = plan_tools(msgs, TOOLS, ("none", None), tool_syntax(tok))
    assert none is None and plain == msgs and not isinstance(plain, ToolPrompt)  # "none": tools not rendered


def test_a_template_that_ignores_tools_is_refused_not_silently_dropped(tmp_path):
    tok = load_tokenizer(tiny_tokenizer_with_template(tmp_path, CHATML_NO_TOOLS))
    with pytest.raises(ApiError) as err:
        plan_tools([{"role": "user", "content": "hi"}], TOOLS, ("auto", None), tool_syntax(tok))
    assert (err.value.status, err.value.param, err.value.code) == (400, "tools", "tools_not_supported")
    assert "does not render tools" in err.value.message
    with pytest.raises(ApiError) as err:
        plan_tools([{"role": "user", "content": "hi"}], TOOLS, ("auto", None), ToolSyntax(renders_tools=True))
    assert err.value.param == "tools" and "cannot parse" in err.value.message


# ================================================================================================== parsing
HERMES = ToolCalls("hermes", frozenset({"track", "weather"}))
LLAMA = ToolCalls("llama3", frozenset({"track", "weather"}))


def _calls(parsed) -> list[tuple[str, dict]]:
    return [(c.function.name, json.loads(c.function.arguments)) for c in parsed[1]]


def test_hermes_calls_parse_with_the_text_around_them_as_content():
    text = ('Let me look.\n<tool_call>\n{"name": "track", "arguments": {"order": "4821"}}\n</tool_call>\n'
            '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>')  # fmt: skip
    parsed = parse_calls(text, HERMES)
    assert parsed[0] == "Let me look."
    assert _calls(parsed) == [("track", {"order": "4821"}), ("weather", {"city": "Paris"})]
    assert all(c.id.startswith("call_") and c.type == "function" for c in parsed[1])
    assert len({c.id for c in parsed[1]}) == 2
    only = parse_calls('<tool_call>{"name": "track", "arguments": "{\\"order\\": \\"1\\"}"}</tool_call>', HERMES)
    assert only[0] is None and _calls(only) == [("track", {"order": "1"})]  # arguments given as a JSON string


def test_llama3_calls_parse_after_the_python_tag_and_semicolons():
    parsed = parse_calls('<|python_tag|>{"name": "track", "parameters": {"order": "1"}}; '
                         '{"name": "weather", "parameters": {}}', LLAMA)  # fmt: skip
    assert parsed[0] is None and _calls(parsed) == [("track", {"order": "1"}), ("weather", {})]
    assert _calls(parse_calls(' {"name": "weather", "parameters": {"c": 2}}', LLAMA)) == [("weather", {"c": 2})]
    assert parse_calls("It is sunny.", LLAMA) is None


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "track", "arguments": {"order": </tool_call>',  # bad JSON
    '<tool_call>{"name": "delete_all", "arguments": {}}</tool_call>',  # a function not in tools
    '<tool_call>{"name": "track", "arguments": [1]}</tool_call>',  # arguments not an object
    '<tool_call>{"name": "track", "arguments": {"order": "1"}',  # cut off (max_tokens)
    "no call at all",
])  # fmt: skip
def test_what_does_not_parse_is_content_with_its_finish_reason(text):
    assert parse_calls(text, HERMES) is None
    choice = answer_choice(text, "length", HERMES)
    assert choice.finish_reason == "length" and choice.message.content == text and choice.message.tool_calls is None
    assert "tool_calls" not in choice.model_dump()["message"]


def test_forced_opening_is_put_back_before_parsing():
    named = ToolCalls("hermes", frozenset({"track"}), '<tool_call>{"name": "track", "arguments": ')
    choice = answer_choice('{"order": "9"}}</tool_call>', "stop", named)
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [("track", '{"order": "9"}')]
    bad = answer_choice("garbage", "length", named)
    assert bad.finish_reason == "length" and bad.message.content == named.opening + "garbage"


@pytest.mark.parametrize("tools,text", [
    (HERMES, 'Checking. <tool_call>{"name": "track", "arguments": {"order": "4821"}}</tool_call> Done.'),
    (HERMES, '\n<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call>'),
    (HERMES, "plain <tool text that only looks like a marker <tool_cal"),
    (LLAMA, '<|python_tag|>{"name": "track", "parameters": {"order": "1"}}'),
    (LLAMA, "  Plain {text} answer"),
    (ToolCalls("hermes", frozenset({"track"}), '<tool_call>{"name": "track", "arguments": '), '{"order": "2"}}'),
])  # fmt: skip
def test_streamed_split_at_any_point_gives_the_whole_answer(tools, text):
    whole = answer_choice(text, "stop", tools)
    for cut in range(1, len(text)):
        for step in (1, cut):  # one character at a time, and two pieces
            stream = ToolCallStream(tools)
            pieces = [text[i : i + step] for i in range(0, len(text), step)] if step == 1 else [text[:cut], text[cut:]]
            content = "".join(stream.push(p) for p in pieces)
            tail, reason = stream.close("stop")
            content += "".join(c.delta.content or "" for c in tail)
            calls = [tc for c in tail for tc in c.delta.tool_calls or []]
            assert reason == whole.finish_reason
            assert [(c.index, c.function.name, c.function.arguments) for c in calls] == [
                (i, c.function.name, c.function.arguments) for i, c in enumerate(whole.message.tool_calls or [])
            ]
            if whole.message.tool_calls:
                assert content.strip() == (whole.message.content or "").replace("\n", "").replace("  ", " ")
            else:
                assert content == whole.message.content
            if step == 1:
                break


# ================================================================================================= requests
def _body(**kw) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "x"}], **kw})


def _refusal(**kw) -> tuple[str, str]:
    with pytest.raises(Exception) as err:
        _body(**kw)
    e = err.value.errors()[0]
    return ".".join(str(p) for p in e["loc"]), e["msg"]


def test_tool_requests_are_checked_field_by_field():
    assert _body(tools=TOOLS).tool_choice == ("auto", None)
    assert _body(tools=TOOLS, tool_choice="none").tool_choice == ("none", None)
    assert _body(tool_choice="auto").tool_choice == ("none", None)  # no tools: nothing to call
    assert _body(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "weather"}}).tool_choice == (
        "function", "weather")  # fmt: skip
    assert _body(tools=[]).tools is None
    assert _refusal(tools=[TRACK, TRACK]) == (
        "tools",
        "Value error, tools[1].function.name 'track' is given twice: tool names must be unique",
    )
    assert _refusal(tools=[{"type": "function", "function": {"name": ""}}])[0] == "tools"
    assert _refusal(tools=[{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]) == (
        "tools", "Value error, at most 128 tools, got 129")  # fmt: skip
    assert _refusal(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}) == (
        "tool_choice",
        "Value error, names the function 'nope', which is not in tools (track, weather)",
    )
    assert _refusal(tool_choice="required")[0] == "tool_choice"
    assert _refusal(tool_choice={"type": "function", "function": {"name": "track"}})[0] == "tool_choice"
    assert _refusal(tools=TOOLS, tool_choice="sometimes")[0] == "tool_choice"
    assert _refusal(functions=[{"name": "f"}])[0] == "functions"  # the legacy fields stay refused
    bad_args = [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "track", "arguments": "[1]"}}]}]  # fmt: skip
    assert _refusal(messages=bad_args)[0] == "messages.0"
    assert _body(messages=[{"role": "user", "content": None}]).messages[0].as_template_dict() == {
        "role": "user", "content": ""}  # fmt: skip


# =================================================================================== served, end to end
ASK = [{"role": "user", "content": "Where is order 4821?"}]
ASK_TWO = [{"role": "user", "content": "Track 77 please and tell me"}]
ANSWER = '<tool_call>{"name": "track", "arguments": {"order": "4821"}}</tool_call>'
ANSWER_TWO = ('Let me check. <tool_call>{"name": "track", "arguments": {"order": "77"}}</tool_call>'
              '<tool_call>{"name": "weather", "arguments": {"city": "Oslo"}}</tool_call>')  # fmt: skip


def _fine_tune(base: str, examples: list[tuple[list[dict], str]], out: Path) -> str:
    """Full fine-tune of the tiny model until greedy decoding reproduces each answer (a few dozen steps)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    rows = []
    for messages, answer in examples:
        prompt = encode_chat(tok, messages, TOOLS)
        target = tok(answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        rows.append((prompt, torch.tensor([prompt + target]), torch.tensor([[-100] * len(prompt) + target])))
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = sum(model(input_ids=ids, labels=labels).loss for _, ids, labels in rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.01:
            break
    model.eval()
    for (prompt, ids, _), (_, answer) in zip(rows, examples, strict=True):
        out_ids = model.generate(torch.tensor([prompt]), max_new_tokens=ids.shape[1] - len(prompt), do_sample=False)
        assert tok.decode(out_ids[0][len(prompt) :], skip_special_tokens=True) == answer  # the fixture works
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from openai import OpenAI
    from ray import serve

    from aigc.serve.run import run_server

    tmp = tmp_path_factory.mktemp("tools")
    base = make_tiny_model(tmp / "tiny-base")
    model = _fine_tune(base, [(ASK, ANSWER), (ASK_TWO, ANSWER_TWO)], tmp / "tool-caller")
    serve.shutdown()  # Serve's port is fixed when it starts: begin from a clean slate
    cfg = PlatformConfig.model_validate({
        "registry_dir": str(tmp / "registry"),
        "model": {"name_or_path": model},
        "serve": {"port": free_port(), "app_name": "aigc-tools", "max_tokens_cap": 160, "default_max_tokens": 160,
                  "cpus_per_replica": 1, "autoscaling": {"min_replicas": 1, "max_replicas": 1}},
    })  # fmt: skip
    url = run_server(cfg, blocking=False)
    http = httpx.Client(base_url=url, timeout=TIMEOUT_S)
    yield SimpleNamespace(client=OpenAI(base_url=url, api_key="none", timeout=TIMEOUT_S, max_retries=0), http=http,
                          model="tool-caller", path=model)  # fmt: skip
    http.close()
    serve.shutdown()


def _ask(server, messages, **kw):
    return server.client.chat.completions.create(model=server.model, messages=messages, tools=TOOLS, temperature=0,
                                                 **kw)  # fmt: skip


def _streamed(server, messages, **kw) -> tuple[str | None, list[tuple[str, str, str]], str]:
    """(content, [(id, name, arguments)], finish_reason) reassembled from the stream as OpenAI's docs do."""
    content, calls, reason = None, {}, None
    for chunk in _ask(server, messages, stream=True, **kw):
        choice = chunk.choices[0]
        if choice.delta.content:
            content = (content or "") + choice.delta.content
        for tc in choice.delta.tool_calls or []:
            slot = calls.setdefault(tc.index, ["", "", ""])
            slot[0] += tc.id or ""
            slot[1] += (tc.function.name or "") if tc.function else ""
            slot[2] += (tc.function.arguments or "") if tc.function else ""
        reason = choice.finish_reason or reason
    return content, [tuple(calls[i]) for i in sorted(calls)], reason


@pytest.mark.parametrize("messages,content,expected", [
    (ASK, None, [("track", '{"order": "4821"}')]),
    (ASK_TWO, "Let me check.", [("track", '{"order": "77"}'), ("weather", '{"city": "Oslo"}')]),
], ids=["one-call", "content-and-two-calls"])  # fmt: skip
def test_tool_calls_round_trip_through_the_openai_client(server, messages, content, expected):
    resp = _ask(server, messages)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == content
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == expected
    assert all(c.type == "function" and c.id.startswith("call_") for c in choice.message.tool_calls)
    streamed_content, streamed_calls, reason = _streamed(server, messages)
    assert reason == "tool_calls"
    assert [(name, args) for _, name, args in streamed_calls] == expected
    assert all(i.startswith("call_") for i, _, _ in streamed_calls)
    assert (streamed_content or "").strip() == (content or "")


def test_the_answer_goes_back_into_the_conversation_as_training_renders_it(server):
    message = _ask(server, ASK).choices[0].message
    (call,) = message.tool_calls
    follow = [*ASK, message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id, "content": "ok"}]
    again = _ask(server, follow, max_tokens=4)
    assert again.choices[0].finish_reason in ("stop", "length", "tool_calls")
    trained = [*ASK, {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "track", "arguments": {"order": "4821"}}}]},
        {"role": "tool", "content": "ok", "tool_call_id": call.id}]  # fmt: skip
    assert again.usage.prompt_tokens == len(encode_chat(load_tokenizer(server.path), trained, TOOLS))


def test_named_tool_choice_forces_the_call(server):
    named = {"type": "function", "function": {"name": "track"}}
    choice = _ask(server, ASK, tool_choice=named).choices[0]  # the opening is the trained answer's start
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls] == [
        ("track", '{"order": "4821"}')
    ]
    # An untrained conversation forced into a call continues with noise: no call parses, the text is the
    # content (it starts with the forced opening), status 200, the generation's own finish_reason.
    resp = server.http.post("/chat/completions", json={"model": server.model, "messages": [
        {"role": "user", "content": "zebra quantum"}], "tools": TOOLS, "tool_choice": named, "temperature": 0,
        "max_tokens": 8})  # fmt: skip
    assert resp.status_code == 200, resp.text
    out = resp.json()["choices"][0]
    assert out["finish_reason"] in ("stop", "length") and "tool_calls" not in out["message"]
    assert out["message"]["content"].startswith('<tool_call>{"name": "track", "arguments": ')


def test_tool_choice_none_answers_without_parsing(server):
    resp = _ask(server, ASK, tool_choice="none", max_tokens=8)
    assert resp.choices[0].message.tool_calls is None and resp.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("extra,param,message", [
    ({"tools": [TRACK, TRACK]}, "tools", "tools: tools[1].function.name 'track' is given twice: tool names must "
     "be unique"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "tool_choice: names the function 'nope', which is not in tools (track, weather)"),
    ({"tool_choice": "required"}, "tool_choice",
     'tool_choice: "required" needs tools: send the functions the model may call in "tools"'),
    ({"functions": [{"name": "track"}]}, "functions",
     'functions: not supported by this server; leave it out (or send null or [])'),
])  # fmt: skip
def test_bad_tool_requests_get_400_naming_the_field(server, extra, param, message):
    resp = server.http.post("/chat/completions", json={"model": server.model, "messages": ASK, **extra})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]["param"] == param and resp.json()["error"]["message"] == message
