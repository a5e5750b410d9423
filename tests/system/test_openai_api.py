"""The OpenAI-compatible routes (issue 21) driven by the ``openai`` SDK, unchanged, against real processes: a replica
serving the shipped ``mock-llm`` (and a model that is not generative) and a gateway in front of it, on loopback.

Sync and async clients, streamed and not; usage and finish reasons from the model's final response; chat messages
turned into the documented prompt; errors the SDK raises as its own exception classes (404, 400 naming the field,
401, 429); a failure after the first token raised by the SDK as ``APIError`` while iterating.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import openai
import pytest

from conftest import Gateway, Replica, llm_serving

MODEL = "mock-llm"
PROMPT = "the quick brown fox jumps"
DEADLINE_HEADER = "X-InferenceHub-Deadline-Ms"


@pytest.fixture(scope="module")
def llm_system(tmp_path_factory) -> Iterator[tuple[Replica, Gateway]]:
    # ``mock`` is served too, but is not a text generation model.
    folder = tmp_path_factory.mktemp("openai-models")
    with llm_serving(folder, "openai-replica", first_token_ms=5, token_ms=5, also=("mock",)) as system:
        yield system


@pytest.fixture(scope="module")
def llm_replica(llm_system) -> Replica:
    return llm_system[0]


@pytest.fixture(scope="module")
def llm_gateway(llm_system) -> Gateway:
    return llm_system[1]


def client(gateway: Gateway, api_key: str = "unused", **options) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://{gateway.url}/v1", api_key=api_key, max_retries=0, timeout=30, **options)


def test_models_lists_only_the_text_generation_models(llm_gateway):
    with client(llm_gateway) as sdk:
        assert [m.id for m in sdk.models.list()] == [MODEL]
        assert sdk.models.retrieve(MODEL).id == MODEL
        for name in ("mock", "no-such-model"):
            with pytest.raises(openai.NotFoundError) as caught:
                sdk.models.retrieve(name)
            assert caught.value.status_code == 404 and name in caught.value.message


def test_completion_whole_and_streamed_give_the_same_text_and_usage(llm_gateway):
    with client(llm_gateway) as sdk:
        whole = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7)
        assert whole.object == "text_completion" and whole.model == MODEL
        (choice,) = whole.choices
        assert len(choice.text.split()) == 7 and choice.finish_reason == "length"
        assert (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens) == (5, 7, 12)
        again = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=7)
        assert again.choices[0].text == choice.text  # the mock is deterministic: the same prompt, the same tokens

        chunks = list(
            sdk.completions.create(
                model=MODEL, prompt=PROMPT, max_tokens=7, stream=True, stream_options={"include_usage": True}
            )
        )
        text_chunks = [c for c in chunks if c.choices]
        assert "".join(c.choices[0].text for c in text_chunks) == choice.text
        assert len([c for c in text_chunks if c.choices[0].text]) == 7  # a chunk per token
        assert [c.choices[0].finish_reason for c in text_chunks][-1] == "length"
        assert all(c.usage is None for c in text_chunks)
        assert not chunks[-1].choices and chunks[-1].usage.completion_tokens == 7
        assert chunks[-1].usage.prompt_tokens == 5 and len({c.id for c in chunks}) == 1

        raw = sdk.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True)
        assert raw.headers["content-type"].startswith("text/event-stream") and raw.headers["x-request-id"]
        assert raw.headers["cache-control"] == "no-cache" and raw.headers["x-accel-buffering"] == "no"
        plain = list(raw.parse())
        assert all(c.choices for c in plain) and "".join(c.choices[0].text for c in plain) == " ".join(
            choice.text.split()[:3]
        )


def test_chat_messages_become_the_documented_prompt(llm_gateway):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    prompt = f"system: be brief\nuser: {PROMPT}\nassistant:"  # docs/streaming.md: a line per message, then assistant:
    with client(llm_gateway) as sdk:
        expected = sdk.completions.create(model=MODEL, prompt=prompt, max_tokens=6).choices[0].text
        chat = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
        assert chat.object == "chat.completion"
        (choice,) = chat.choices
        assert choice.message.role == "assistant" and choice.message.content == expected
        assert choice.finish_reason == "length" and chat.usage.completion_tokens == 6
        assert chat.usage.prompt_tokens == len(prompt.split())

        chunks = list(
            sdk.chat.completions.create(
                model=MODEL,
                messages=messages,
                max_completion_tokens=6,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant"
        assert "".join(d.content or "" for d in deltas) == expected
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
        assert chunks[-1].usage.total_tokens == len(prompt.split()) + 6


def test_every_answer_streamed_or_not_names_the_replica_that_served_it(llm_gateway):
    messages = [{"role": "user", "content": PROMPT}]
    with client(llm_gateway) as sdk:
        for stream in (False, True):
            answers = [
                sdk.completions.with_raw_response.create(model=MODEL, prompt=PROMPT, max_tokens=4, stream=stream),
                sdk.chat.completions.with_raw_response.create(
                    model=MODEL, messages=messages, max_tokens=4, stream=stream
                ),
            ]
            for raw in answers:
                assert raw.headers["x-inferencehub-replica"] == "openai-replica", (stream, dict(raw.headers))
                parsed = raw.parse()
                if stream:
                    assert len([c for c in parsed if c.choices]) == 5  # four tokens, then the finish reason
                else:
                    assert parsed.usage.completion_tokens == 4


def test_stop_ends_the_completion_with_finish_reason_stop(llm_gateway):
    with client(llm_gateway) as sdk:
        words = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8).choices[0].text.split()
        stop = words[3]
        assert stop not in words[:3], "pick a prompt whose fourth word is new"
        stopped = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=8, stop=[stop])
        (choice,) = stopped.choices
        assert choice.finish_reason == "stop"
        assert choice.text.split()[:3] == words[:3] and len(choice.text.split()) < 8
        assert stopped.usage.completion_tokens < 8


def test_the_async_client_streams_and_answers_concurrently(llm_gateway):
    async def run() -> None:
        async with openai.AsyncOpenAI(
            base_url=f"http://{llm_gateway.url}/v1", api_key="unused", max_retries=0, timeout=30
        ) as sdk:
            whole = await sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5)

            async def streamed(i: int) -> str:
                stream = await sdk.chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": f"{PROMPT} {i}"}], max_tokens=5, stream=True
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            async def completed() -> str:
                stream = await sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, stream=True)
                return "".join([c.choices[0].text async for c in stream])

            texts = await asyncio.gather(*(streamed(i) for i in range(8)), *(completed() for _ in range(8)))
            assert all(len(t.split()) == 5 for t in texts)
            assert set(texts[8:]) == {whole.choices[0].text}
            assert len(set(texts[:8])) > 1  # eight prompts, answered each on its own stream

    asyncio.run(run())


@pytest.mark.parametrize(
    ("call", "param"),
    [
        ({"prompt": PROMPT, "n": 2}, "n"),
        ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens"),
        ({"prompt": PROMPT, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": PROMPT, "extra_body": {"colour": "blue"}}, "colour"),
    ],
)
def test_bad_fields_are_400_naming_the_field(llm_gateway, call, param):
    with client(llm_gateway) as sdk, pytest.raises(openai.BadRequestError) as caught:
        sdk.completions.create(model=MODEL, **call)
    assert caught.value.status_code == 400
    assert caught.value.body["param"] == param and param in caught.value.message
    assert caught.value.body["type"] == "invalid_request_error"


def test_model_errors_keep_their_status(llm_gateway):
    with client(llm_gateway) as sdk:
        with pytest.raises(openai.NotFoundError) as missing:
            sdk.completions.create(model="no-such-model", prompt=PROMPT)
        assert missing.value.body["code"] == "model_not_found" and "no-such-model" in missing.value.message
        with pytest.raises(openai.BadRequestError) as too_many:  # the model's own limit, refused before a token
            sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5000)
        assert "max_tokens" in too_many.value.message
        with pytest.raises(openai.BadRequestError) as role:
            sdk.chat.completions.create(model=MODEL, messages=[{"role": "robot", "content": "hi"}])
        assert role.value.body["param"] == "messages[0].role"
        with pytest.raises(openai.BadRequestError) as not_text:
            sdk.completions.create(model="mock", prompt=PROMPT)
        assert "not a text generation model" in not_text.value.message


@pytest.mark.parametrize("chat", [False, True])
def test_a_failure_after_the_first_token_is_raised_by_the_sdk_while_iterating(llm_gateway, chat):
    received: list[str] = []
    with client(llm_gateway) as sdk:
        options = {"model": MODEL, "max_tokens": 4000, "stream": True, "extra_headers": {DEADLINE_HEADER: "300"}}
        with pytest.raises(openai.APIError) as caught:
            if chat:
                for chunk in sdk.chat.completions.create(messages=[{"role": "user", "content": PROMPT}], **options):
                    received.append(chunk.choices[0].delta.content or "")
            else:
                for chunk in sdk.completions.create(prompt=PROMPT, **options):
                    received.append(chunk.choices[0].text)
    assert "deadline" in caught.value.message
    assert caught.value.body["code"] == "deadline_exceeded"
    assert 10 < len(received) < 4000  # the stream had begun: the failure came as its last event, not a status


@pytest.fixture(scope="module")
def guarded(llm_replica, tmp_path_factory) -> Iterator[Gateway]:
    keys = tmp_path_factory.mktemp("openai-keys") / "api-keys"
    keys.write_text("ih_openai_0123456789abcdef0123456789abcdef sdk-user\n")
    server = Gateway(
        f"ipv4:{llm_replica.target}", "--api-keys-file", str(keys), "--rate-limit", "0.5", "--rate-limit-burst", "2"
    )
    try:
        yield server
    finally:
        server.stop()


def test_api_keys_and_rate_limits_as_the_sdk_sees_them(guarded):
    with (
        client(guarded, "ih_wrong_0000000000000000000000000000000000") as sdk,
        pytest.raises(openai.AuthenticationError) as denied,
    ):
        sdk.models.list()
    assert denied.value.status_code == 401 and denied.value.body["type"] == "authentication_error"

    with client(guarded, "ih_openai_0123456789abcdef0123456789abcdef") as sdk:
        stream = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, stream=True)
        assert len("".join(c.choices[0].text for c in stream).split()) == 3
        with pytest.raises(openai.RateLimitError) as limited:  # a burst of 2, then 0.5 a second
            for _ in range(3):
                sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
        assert limited.value.status_code == 429 and limited.value.body["type"] == "rate_limit_error"
        assert int(limited.value.response.headers["retry-after"]) >= 1
