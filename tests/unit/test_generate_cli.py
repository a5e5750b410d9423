"""The pure parts of ``inferencehub generate``: reading an event stream's data lines, and the closing summary."""

from __future__ import annotations

from inferencehub.generate_cli import event_data, summary


def test_only_data_lines_carry_events():
    assert event_data(b'data: {"text_output": " word"}\n') == {"text_output": " word"}
    assert event_data(b'data:{"error": "late"}\r\n') == {"error": "late"}
    for line in (b"\n", b": a comment\n", b"event: token\n", b"id: 3\n"):
        assert event_data(line) is None


def test_the_summary_names_what_the_final_event_reported():
    final = {"finish_reason": "stop", "usage": {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}}
    assert summary(final, 2, 0.0421) == (
        "finish_reason=stop prompt_tokens=4 completion_tokens=2 tokens_received=2 first_token_ms=42.1"
    )
    assert summary({}, 0, None) == "finish_reason=? tokens_received=0"
