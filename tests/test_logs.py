"""Log lines carry the ids of the work they concern, as text or as JSON."""

from __future__ import annotations

import json
import logging

import pytest

from newsmon.logs import JsonFormatter, TextFormatter, _ContextFilter, log_context


def render(formatter: logging.Formatter, message: str, **ids: str) -> str:
    record = logging.LogRecord("newsmon.test", logging.WARNING, __file__, 1, message, (), None)
    with log_context(**ids):
        _ContextFilter().filter(record)
    return formatter.format(record)


def test_json_lines_carry_context_ids() -> None:
    entry = json.loads(
        render(JsonFormatter(), "delivery failed", delivery_id="msg_1", article_id="a1")
    )
    assert entry["message"] == "delivery failed"
    assert entry["level"] == "WARNING" and entry["logger"] == "newsmon.test"
    assert entry["delivery_id"] == "msg_1" and entry["article_id"] == "a1"


def test_text_lines_end_with_context_ids() -> None:
    line = render(TextFormatter(), "scored", article_id="a1")
    assert line.endswith("newsmon.test: scored [article_id=a1]")
    assert render(TextFormatter(), "plain").endswith("newsmon.test: plain")


def test_contexts_nest_and_unwind(caplog: pytest.LogCaptureFixture) -> None:
    with log_context(feed="f1"), log_context(article_id="a1"):
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
        _ContextFilter().filter(record)
        assert record.context == {"feed": "f1", "article_id": "a1"}  # type: ignore[attr-defined]
    record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", (), None)
    _ContextFilter().filter(record)
    assert record.context == {}  # type: ignore[attr-defined]
