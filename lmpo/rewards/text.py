"""Prompts and completions in either of TRL's two forms: plain strings or chat messages.

TRL passes a conversational dataset's prompts as message lists (``[{"role": ..., "content": ...}]``)
and its completions as ``[{"role": "assistant", "content": text}]``; a standard dataset's as
strings. Built-in reward functions accept both by reading them through :func:`as_text`.
"""

from __future__ import annotations


def as_text(x) -> str:
    """The text of a prompt or completion: a string as is; a message list (or one message) as the
    content of its last message, which for a TRL completion is the assistant's reply."""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        return _content(x)
    if isinstance(x, (list, tuple)):
        if not x:
            return ""
        if all(isinstance(m, dict) for m in x):
            return _content(x[-1])
    raise TypeError("expected a string or a list of chat messages ({'role', 'content'} dicts), got %s"
                    % type(x).__name__)


def _content(message: dict) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal parts: keep the text ones
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    raise TypeError("message content must be a string, got %s" % type(content).__name__)
