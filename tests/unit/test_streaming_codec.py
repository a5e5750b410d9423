"""The pure parts of streaming: SSE framing (``gateway/sse.py``), the OpenAI request parsing and answers
(``gateway/openai_api.py``) and the generate extension's JSON-to-tensor mapping (``gateway/generate.py``)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inferencehub.errors import InvalidInput
from inferencehub.gateway import openai_api, schema, sse
from inferencehub.gateway.generate import final_fields, parse_generate_request
from inferencehub.gateway.openai_api import Answer, OpenAIError, chat_prompt, parse_chat, parse_completion
from inferencehub.protocol.inference import grpc_predict_v2_pb2 as pb
from inferencehub.tensors import deserialize_bytes


def dumps(doc) -> bytes:
    return json.dumps(doc).encode()


# --- SSE -----------------------------------------------------------------------------------------------------


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
        lambda kids: st.lists(kids) | st.dictionaries(st.text(), kids),
        max_leaves=10,
    )
)
def test_an_event_is_one_data_line_that_parses_back(value):
    framed = sse.event(value)
    assert framed.startswith(b"data: ") and framed.endswith(b"\n\n")
    assert framed.count(b"\n") == 2  # JSON never holds a raw newline: one data line, one blank line
    assert sse.parse(framed) == [value]


def test_parse_follows_the_format_rules():
    body = b': a comment\r\ndata: {"a": 1}\r\n\r\nevent: x\ndata: [1,\ndata: 2]\n\n' + sse.DONE
    assert sse.parse(body) == [{"a": 1}, [1, 2], "[DONE]"]


def test_headers_turn_off_proxy_buffering():
    assert sse.HEADERS["Content-Type"].startswith("text/event-stream")
    assert sse.HEADERS["X-Accel-Buffering"] == "no"


# --- OpenAI requests -----------------------------------------------------------------------------------------


def test_a_completion_request_maps_to_the_contract_inputs():
    completion = parse_completion(dumps({"model": "mock-llm", "prompt": "hello there", "max_tokens": 5, "stop": "."}))
    assert (completion.model, completion.prompt, completion.max_tokens, completion.stop) == (
        "mock-llm", "hello there", 5, ["."]
    )  # fmt: skip
    assert not completion.stream and not completion.chat
    message = openai_api.infer_request(completion, "req-1")
    assert message.model_name == "mock-llm" and message.id == "req-1"
    names = [(t.name, t.datatype, list(t.shape)) for t in message.inputs]
    assert names == [("text_input", "BYTES", [1]), ("max_tokens", "INT32", [1]), ("stop", "BYTES", [1])]
    assert list(deserialize_bytes(message.raw_input_contents[0], 1, "text_input")) == [b"hello there"]
    assert np.frombuffer(message.raw_input_contents[1], dtype=np.int32).tolist() == [5]
    assert list(deserialize_bytes(message.raw_input_contents[2], 1, "stop")) == [b"."]


def test_defaults_and_ignored_sampling_fields():
    completion = parse_completion(dumps({"model": "m", "prompt": ["one"], "temperature": 0.2, "n": 1, "seed": 3}))
    assert completion.prompt == "one" and completion.max_tokens == openai_api.DEFAULT_MAX_TOKENS
    message = openai_api.infer_request(completion, "r")
    assert [t.name for t in message.inputs] == ["text_input", "max_tokens"]  # no stop input without stops


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": ["a", "b"]}, "prompt"),
        ({"model": "m", "prompt": [1, 2, 3]}, "prompt"),
        ({"model": "m", "prompt": "x", "max_tokens": 0}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": "9"}, "max_tokens"),
        ({"model": "m", "prompt": "x", "max_tokens": True}, "max_tokens"),
        ({"model": "m", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"model": "m", "prompt": "x", "stop": [""]}, "stop"),
        ({"model": "m", "prompt": "x", "stream": "yes"}, "stream"),
        ({"model": "m", "prompt": "x", "stream_options": {"include_usage": True}}, "stream_options"),
        (
            {"model": "m", "prompt": "x", "stream": True, "stream_options": {"include_usage": 1}},
            "stream_options.include_usage",
        ),
        ({"model": "m", "prompt": "x", "n": 2}, "n"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
        ({"model": "m", "prompt": "x", "n": True}, "n"),  # equal to 1 in Python, but not OpenAI's default
        ({"model": "m", "prompt": "x", "echo": 0}, "echo"),
        ({"model": "m", "prompt": "x", "frobnicate": 1}, "frobnicate"),
        ({"model": "m", "messages": []}, "messages"),  # a chat field is not a completion's
    ],
)
def test_bad_completion_fields_are_named(doc, param):
    with pytest.raises(OpenAIError) as caught:
        parse_completion(dumps(doc))
    assert caught.value.param == param and caught.value.status == 400
    assert param.split(".")[0] in str(caught.value)


def test_the_fields_accepted_are_the_request_types_fields():
    """Every field the OpenAPI document lists for a route is accepted at its default (the sampling ones whatever
    their value), and a chat's max_tokens is checked even when max_completion_tokens wins."""
    for request, parse, base in (
        (schema.CompletionRequest, parse_completion, {"model": "m", "prompt": "x"}),
        (schema.ChatCompletionRequest, parse_chat, {"model": "m", "messages": [{"role": "user", "content": "x"}]}),
    ):
        fields = set(request.__struct_fields__)
        assert set(openai_api.REFUSED) <= fields
        for name in fields - set(base):
            parse(dumps({**base, name: None}))
        assert parse(dumps({**base, "temperature": "hot", "stream": True, "stream_options": {"include_usage": None}}))
    with pytest.raises(OpenAIError) as caught:
        parse_chat(dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0,
                          "max_completion_tokens": 3}))  # fmt: skip
    assert caught.value.param == "max_tokens"


def test_bad_bodies_are_400():
    for body in (b"{", b"[1]", b'"x"'):
        with pytest.raises(OpenAIError):
            parse_completion(body)


def test_chat_messages_become_one_prompt():
    prompt = chat_prompt(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
        ]
    )
    assert prompt == "system: Be brief.\nuser: Hi there\nassistant:"
    chat = parse_chat(dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 3}))
    assert chat.chat and chat.max_tokens == 3 and chat.prompt == "user: x\nassistant:"


@pytest.mark.parametrize(
    ("messages", "param"),
    [
        ([], "messages"),
        ("hello", "messages"),
        ([{"role": "wizard", "content": "x"}], "messages[0].role"),
        ([{"role": {}, "content": "x"}], "messages[0].role"),  # not hashable: once a 500
        ([{"role": ["user"], "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": 3}], "messages[0].content"),
        (
            [{"role": "user", "content": "ok"}, {"role": "user", "content": [{"type": "image_url"}]}],
            "messages[1].content",
        ),
    ],
)
def test_bad_messages_are_named(messages, param):
    with pytest.raises(OpenAIError) as caught:
        parse_chat(dumps({"model": "m", "messages": messages}))
    assert caught.value.param == param


def test_answers_have_openai_shapes():
    completion = parse_chat(dumps({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": True,
                                   "stream_options": {"include_usage": True}}))  # fmt: skip
    answer = Answer(completion, "abc")
    first, second = answer.chunk("Hello", None), answer.chunk(" world", None)
    assert first["object"] == "chat.completion.chunk" and first["id"] == "chatcmpl-abc"
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "Hello"}  # the role once, first
    assert second["choices"][0]["delta"] == {"content": " world"} and second["usage"] is None
    used = openai_api.usage({"prompt_tokens": 2, "completion_tokens": 2, "finish_reason": "length"}, 2)
    assert used == {"prompt_tokens": 2, "completion_tokens": 2, "total_tokens": 4}
    assert answer.usage_chunk(used) == {
        **{k: first[k] for k in ("id", "object", "created", "model")},
        "choices": [],
        "usage": used,
    }
    whole = Answer(parse_completion(dumps({"model": "m", "prompt": "p"})), "q").whole("text", "length", used)
    assert whole["object"] == "text_completion" and whole["choices"][0]["text"] == "text"
    assert whole["choices"][0]["finish_reason"] == "length" and whole["usage"] == used


def test_error_body_has_openai_shape():
    assert openai_api.error_body("no such model", 404, "model", "model_not_found") == {
        "error": {"message": "no such model", "type": "not_found_error", "param": "model", "code": "model_not_found"}
    }
    assert openai_api.error_body("boom", 503)["error"]["type"] == "server_error"


# --- the generate extension ----------------------------------------------------------------------------------


def llm_metadata() -> pb.ModelMetadataResponse:
    return pb.ModelMetadataResponse(
        name="mock-llm",
        inputs=[
            pb.ModelMetadataResponse.TensorMetadata(name="text_input", datatype="BYTES", shape=[1]),
            pb.ModelMetadataResponse.TensorMetadata(name="max_tokens", datatype="INT32", shape=[1]),
            pb.ModelMetadataResponse.TensorMetadata(name="stop", datatype="BYTES", shape=[-1]),
        ],
    )


def test_generate_fields_map_to_inputs_by_name_and_parameters_to_parameters():
    body = dumps(
        {"text_input": "hi", "max_tokens": 4, "stop": ["a", "b"], "parameters": {"temperature": 0.5, "x": "y"}}
    )
    message = parse_generate_request(body, llm_metadata(), "mock-llm", "")
    assert [(t.name, t.datatype, list(t.shape)) for t in message.inputs] == [
        ("text_input", "BYTES", [1]), ("max_tokens", "INT32", [1]), ("stop", "BYTES", [2])
    ]  # fmt: skip
    assert np.frombuffer(message.raw_input_contents[1], dtype=np.int32).tolist() == [4]
    assert message.parameters["temperature"].double_param == 0.5 and message.parameters["x"].string_param == "y"


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"prompt": "hi"}, "'prompt' is not an input of model 'mock-llm'"),
        ({"text_input": "hi", "max_tokens": "four"}, "input 'max_tokens'"),
        ({"text_input": "hi", "max_tokens": 2**40}, "input 'max_tokens'"),
        ({"text_input": 3}, "input 'text_input'"),
        ({"text_input": "hi", "parameters": [1]}, "'parameters' must be an object"),
        ({"text_input": "hi", "parameters": {"p": {"deep": 1}}}, "parameter 'p'"),
    ],
)
def test_bad_generate_bodies_name_the_field(doc, words):
    with pytest.raises(InvalidInput, match=words.replace("(", r"\(")):
        parse_generate_request(dumps(doc), llm_metadata(), "mock-llm", "")


def test_final_fields():
    assert final_fields({"finish_reason": "stop", "prompt_tokens": 3, "completion_tokens": 2}) == {
        "finish_reason": "stop",
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    assert final_fields({}) == {}
