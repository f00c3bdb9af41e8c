"""TRL's conversational preference rows -> text pairs, rendered with the tokenizer's chat template.

Two row shapes (TRL's "conversational" preference format; the messages are ``{"role": str, "content": str}``):

* implicit prompt: ``{"chosen": [messages], "rejected": [messages]}``, two whole conversations;
* explicit prompt: ``{"prompt": [messages], "chosen": [messages], "rejected": [messages]}``, the conversation
  being ``prompt + chosen`` (resp. ``prompt + rejected``).

Optional columns, as in TRL: ``margin``, ``tools`` (a list, or its JSON string) and ``chat_template_kwargs`` (a
dict), both passed to ``apply_chat_template``.

The split (so shared-prompt packing works on conversations): the prompt is every message before the *last
assistant turn*, which must be the same in chosen and rejected. Its text is the template applied to those messages
with ``add_generation_prompt=True``; each response is the rest of the rendered full conversation, which must start
with that prompt text (templates that render a turn differently once a reply follows fail this check, by name)::

    messages   [user: "Hi"] [assistant: "Hello!"]
    rendered   <|user|>Hi\\n<|assistant|>Hello!\\n
    prompt     <|user|>Hi\\n<|assistant|>          (template([user: "Hi"], add_generation_prompt=True))
    response                          Hello!\\n

:mod:`fastrm.data` calls :func:`parse_chat_row` for rows whose ``prompt``/``chosen``/``rejected`` are lists, and
the TRL drop-in (:mod:`fastrm.integrations.trl_data`) uses the validation and template helpers.
"""

from __future__ import annotations

import json
from typing import Any

from fastrm.rows import DataError, RowError, type_name

CHAT_KEYS = ("prompt", "chosen", "rejected")


def is_chat_row(row: dict) -> bool:
    """True when any of prompt/chosen/rejected holds a list (a message list, or a malformed one to report)."""
    return any(isinstance(row.get(k), list) for k in CHAT_KEYS)


def check_messages(value: Any, key: str, *, allow_empty: bool = False) -> list[dict]:
    """Validate a message list; errors name the message, e.g. ``field 'chosen[1].content': expected a string``."""
    if not isinstance(value, list):
        got = "a string" if isinstance(value, str) else type_name(value)
        raise RowError(key, f"expected a list of {{'role', 'content'}} messages (a conversational row), got {got}")
    if not value and not allow_empty:
        raise RowError(key, "expected a non-empty list of messages, got an empty list")
    for i, m in enumerate(value):
        where = f"{key}[{i}]"
        if not isinstance(m, dict):
            raise RowError(where, f"expected a message object with 'role' and 'content', got {type_name(m)}")
        for part in ("role", "content"):
            if part not in m:
                raise RowError(f"{where}.{part}", "missing")
        if not isinstance(m["role"], str) or not m["role"]:
            raise RowError(f"{where}.role", f"expected a non-empty string, got {type_name(m['role'])}")
        if not isinstance(m["content"], str):
            # Multimodal content (a list of parts) renders to text only through a processor, not a tokenizer.
            raise RowError(f"{where}.content", f"expected a string, got {type_name(m['content'])}")
    return value


def conversations(row: dict) -> tuple[list[dict], list[dict]]:
    """The full chosen and rejected conversations of a validated row (``prompt`` prepended when present)."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RowError(key, "missing")
    if not isinstance(row["chosen"], list):  # `chosen` says which format the row is in; blame the odd field out
        odd = next(k for k in CHAT_KEYS if isinstance(row.get(k), list))
        raise RowError(
            odd,
            "a message list in a row whose 'chosen' is not: use one format per row, strings everywhere or message "
            "lists everywhere (rendered with the tokenizer's chat template)",
        )
    prompt = check_messages(row["prompt"], "prompt", allow_empty=True) if "prompt" in row else []
    return prompt + check_messages(row["chosen"], "chosen"), prompt + check_messages(row["rejected"], "rejected")


def split_at_last_assistant(chosen: list[dict], rejected: list[dict]) -> int:
    """Index of the last assistant turn, shared by both conversations: ``chosen[:k] == rejected[:k]`` is the prompt."""
    cuts = []
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        k = next((i for i in range(len(conv) - 1, -1, -1) if conv[i]["role"] == "assistant"), None)
        if k is None:
            raise RowError(key, "no assistant turn: the response to score is the last message with role 'assistant'")
        cuts.append(k)
    if cuts[0] != cuts[1] or chosen[: cuts[0]] != rejected[: cuts[1]]:
        raise RowError(
            "rejected",
            "the chosen and rejected conversations differ before their last assistant turn; a preference pair "
            "compares two replies to the same conversation",
        )
    return cuts[0]


def template_kwargs(row: dict) -> dict:
    """``tools`` and ``chat_template_kwargs`` of a row, as TRL passes them to ``apply_chat_template``."""
    kwargs: dict[str, Any] = {}
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise RowError("tools", f"not valid JSON: {e}") from None
    if tools is not None:
        kwargs["tools"] = tools
    extra = row.get("chat_template_kwargs")
    if extra is not None:
        if not isinstance(extra, dict):
            raise RowError("chat_template_kwargs", f"expected an object, got {type_name(extra)}")
        kwargs.update(extra)
    return kwargs


def require_chat_template(tokenizer: Any) -> None:
    """A conversational dataset needs a tokenizer with a chat template: a clear error otherwise (not a row error,
    so ``on_bad_row="skip"`` does not silently skip the whole dataset)."""
    if tokenizer is None:
        raise DataError(
            "conversational rows (message lists) are rendered with a tokenizer's chat template: pass tokenizer=..."
        )
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"conversational rows need a tokenizer with a chat template, and this {type(tokenizer).__name__} has "
            "none: set tokenizer.chat_template (a Jinja string) or use a tokenizer that ships one"
        )


def render(tokenizer: Any, messages: list[dict], key: str, **kwargs: Any) -> str:
    """The chat template applied to ``messages`` as text (template errors become row errors naming ``key``)."""
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)
    except Exception as e:  # jinja2 raises TemplateError and plain Python errors from inside templates
        raise RowError(key, f"the chat template failed on these messages: {type(e).__name__}: {e}") from None
    if not isinstance(text, str):
        raise RowError(key, f"the chat template returned {type_name(text)}, expected text")
    return text


def parse_chat_row(row: dict, tokenizer: Any) -> tuple[str, str, str]:
    """One conversational row -> (prompt, chosen, rejected) texts, split at the last assistant turn (module
    docstring); :mod:`fastrm.data` makes the pair."""
    chosen, rejected = conversations(row)
    k = split_at_last_assistant(chosen, rejected)
    require_chat_template(tokenizer)
    kwargs = template_kwargs(row)
    prompt = render(tokenizer, chosen[:k], "prompt", add_generation_prompt=True, **kwargs)
    responses = []
    for key, conv in (("chosen", chosen), ("rejected", rejected)):
        full = render(tokenizer, conv, key, **kwargs)
        if not full.startswith(prompt):
            raise RowError(
                key,
                "the chat template renders the conversation with a different beginning than its prompt rendered "
                f"with add_generation_prompt=True ({prompt[-40:]!r} vs {full[: len(prompt)][-40:]!r}), so there is "
                "no shared prompt to split at",
            )
        if len(full) == len(prompt):
            raise RowError(key, "the last assistant turn renders to no text after the prompt")
        responses.append(full[len(prompt) :])
    return prompt, responses[0], responses[1]
