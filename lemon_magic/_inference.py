"""The OpenAI-style wire format, shared by the async router and the blocking facade."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from lemon_magic.errors import InferenceError, InvalidOptions

__all__ = ("Accumulator", "check_payload", "error_text", "http_error", "parse_sse_line")

DONE = object()


def check_payload(payload: Mapping[str, Any]) -> None:
    """Refuse requests that cannot mean anything, before anything is loaded.

    :raises InvalidOptions: an empty prompt, or a chat without messages.
    """
    if "prompt" in payload and not str(payload["prompt"]).strip():
        raise InvalidOptions("the prompt is empty")
    if "messages" in payload and not payload["messages"]:
        raise InvalidOptions("chat needs at least one message")


def parse_sse_line(line: str) -> dict[str, Any] | object | None:
    """One line of an event stream: its JSON event, ``DONE``, or ``None`` for other lines."""
    if not line.startswith("data:"):
        return None
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    event: dict[str, Any] = json.loads(data)
    return event


def error_text(body: str) -> str:
    """The error message in a backend's error body, shortened to one line."""
    try:
        data = json.loads(body)
        err = data.get("error", data)
        text = str(err.get("message", err) if isinstance(err, dict) else err)
    except (ValueError, AttributeError):
        text = body
    return " ".join(text.split())[:300]


def http_error(model: str, status: int, body: str) -> InferenceError:
    """The error for a non-200 answer."""
    return InferenceError(f"backend of {model!r} answered HTTP {status}: {error_text(body)}",
                          model=model, status=status)


def _first_choice(data: dict[str, Any]) -> dict[str, Any]:
    choices = data.get("choices") or [{}]
    if not isinstance(choices, list) or not isinstance(choices[0], dict):
        raise ValueError(f"unexpected shape of 'choices': {str(choices)[:80]}")
    return choices[0]


def _text(choice: dict[str, Any], holder: str | None) -> str | None:
    """The text of a choice: ``choice[holder]["content"]`` (chat) or ``choice["text"]``."""
    part = choice.get(holder) or {} if holder else choice
    if not isinstance(part, dict):
        raise ValueError(f"unexpected shape of {holder!r}: {str(part)[:80]}")
    text = part.get("content" if holder else "text")
    if text is not None and not isinstance(text, str):
        raise ValueError(f"the text is a {type(text).__name__}, not a string")
    return text


class Accumulator:
    """Collects a streamed (or whole) response: text parts, finish reason, last event."""

    def __init__(self, chat: bool) -> None:
        self.chat = chat
        self.parts: list[str] = []
        self.finish: str | None = None
        self.last: dict[str, Any] = {}

    def add_event(self, event: dict[str, Any]) -> str | None:
        """Take one streamed event; return its text, if any.

        :raises ValueError: an event of another shape than OpenAI's.
        """
        self.last = event
        choice = _first_choice(event)
        text = _text(choice, "delta" if self.chat else None)
        self.finish = choice.get("finish_reason") or self.finish
        if text:
            self.parts.append(text)
        return text or None

    def add_body(self, body: dict[str, Any]) -> None:
        """Take a whole (non-streamed) response."""
        self.last = body
        choice = _first_choice(body)
        text = _text(choice, "message" if self.chat else None)
        self.finish = choice.get("finish_reason")
        self.parts = [text or ""]

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def usage(self) -> Mapping[str, Any]:
        usage: Mapping[str, Any] = self.last.get("usage") or {}
        return usage
