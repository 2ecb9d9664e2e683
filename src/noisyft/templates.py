"""Prompt templates: turn a conversation into text segments, each marked as prompt or response.

A conversation is a list of turns ``{"role": "system" | "user" | "assistant", "content": str}``. A user turn
that came from an Alpaca record also carries an ``"input"`` key (possibly empty) next to the instruction in
``"content"``. :func:`render_segments` returns ``[(text, is_response), ...]``; the concatenated texts are the
training text and the response segments are the tokens the loss is computed on.

Templates:

* ``"alpaca"``: the Stanford Alpaca prompt (the NEFTune paper's default), single-turn only.
* ``"vicuna"``: Vicuna v1.1 (``"{system} USER: {u} ASSISTANT: {a}</s>USER: ..."``), the ShareGPT format.
* ``"chat"``: the tokenizer's own chat template; assistant spans are found by rendering prefixes.
* ``"auto"``: alpaca for Alpaca records, else the tokenizer's chat template if it has one, else vicuna.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

TEMPLATES = ("auto", "alpaca", "vicuna", "chat")

ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)

Segments = list[tuple[str, bool]]


class TemplateError(ValueError):
    """The template cannot render this conversation (wrong template for the data, or a broken chat template)."""


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def is_alpaca_conversation(conversation: Sequence[dict]) -> bool:
    """True for a conversation built from an Alpaca record (its user turn carries the ``input`` key)."""
    return any(turn.get("role") == "user" and "input" in turn for turn in conversation)


def resolve_template(template: str, tokenizer: Any, *, alpaca: bool) -> str:
    """Turn ``"auto"`` into a concrete template name; ``alpaca`` says whether the data is Alpaca-format."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template != "auto":
        return template
    if alpaca:
        return "alpaca"
    return "chat" if has_chat_template(tokenizer) else "vicuna"


def user_text(turn: dict) -> str:
    """The text of a user turn, with an Alpaca ``input`` folded in (for templates that have no input slot)."""
    extra = turn.get("input") or ""
    return f"{turn['content']}\n\n{extra}" if extra.strip() else turn["content"]


def plain_messages(conversation: Sequence[dict]) -> list[dict[str, str]]:
    """``{"role", "content"}`` messages as chat templates expect them (Alpaca inputs folded in)."""
    return [
        {"role": t["role"], "content": user_text(t) if t["role"] == "user" else t["content"]}
        for t in conversation
    ]


def _eos(tokenizer: Any, template: str) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    if not eos:
        raise ValueError(
            f"the {template} template ends every response with the tokenizer's eos token, but this tokenizer "
            "has none; set tokenizer.eos_token (the model must learn to stop)"
        )
    return eos


def _merge(segments: Segments) -> Segments:
    """Join neighbouring segments of the same kind and drop empty ones."""
    merged: Segments = []
    for text, is_response in segments:
        if not text:
            continue
        if merged and merged[-1][1] == is_response:
            merged[-1] = (merged[-1][0] + text, is_response)
        else:
            merged.append((text, is_response))
    return merged


def _render_alpaca(conversation: Sequence[dict], tokenizer: Any) -> Segments:
    roles = [t["role"] for t in conversation]
    if roles != ["user", "assistant"]:
        raise TemplateError(
            "the alpaca template takes single-turn conversations (one user turn, then one assistant turn, no "
            f"system turn) but this one has roles {roles}; use the vicuna or chat template for multi-turn data"
        )
    user, reply = conversation
    extra = user.get("input") or ""
    if extra.strip():
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=user["content"], input=extra)
    else:
        prompt = ALPACA_PROMPT_NO_INPUT.format(instruction=user["content"])
    return [(prompt, False), (reply["content"] + _eos(tokenizer, "alpaca"), True)]


def _render_vicuna(conversation: Sequence[dict], tokenizer: Any) -> Segments:
    eos = _eos(tokenizer, "vicuna")
    turns = list(conversation)
    system = VICUNA_SYSTEM
    if turns and turns[0]["role"] == "system":
        system = turns.pop(0)["content"]
    segments: Segments = [(system + " ", False)]
    for turn in turns:
        role = turn["role"]
        if role == "user":
            segments.append(("USER: " + user_text(turn) + " ", False))
        elif role == "assistant":
            segments.append(("ASSISTANT: ", False))
            segments.append((turn["content"] + eos, True))
        else:
            raise TemplateError(
                f"the vicuna template only takes a system turn first, found a {role!r} turn later"
            )
    return _merge(segments)


def _render_chat(conversation: Sequence[dict], tokenizer: Any) -> Segments:
    if not has_chat_template(tokenizer):
        raise ValueError(
            "template 'chat' needs a tokenizer with a chat template, and this one has none; "
            "use template='vicuna' or 'alpaca', or set tokenizer.chat_template"
        )
    messages = plain_messages(conversation)

    def render(msgs: list[dict], generation_prompt: bool) -> str:
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=generation_prompt)
        if not isinstance(text, str):
            raise ValueError(f"apply_chat_template(tokenize=False) returned {type(text).__name__}, not str")
        return text

    full = render(messages, False)
    segments: Segments = []
    done = 0  # characters of `full` already assigned to a segment
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        if i == 0:
            raise TemplateError(
                "the chat template cannot mark a reply that opens the conversation (nothing to prompt it)"
            )
        prefix = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        for name, part in (("generation prompt before", prefix), ("rendering up to", upto)):
            if not full.startswith(part):
                raise ValueError(
                    f"the tokenizer's chat template is not prefix-stable: its {name} assistant turn {i} is not "
                    "a prefix of the whole conversation's rendering, so reply spans cannot be located (the "
                    "template rewrites earlier turns depending on what follows, e.g. drops past reasoning); "
                    "use template='vicuna' or a chat template without that behaviour"
                )
        if len(prefix) < done or len(upto) < len(prefix):
            raise ValueError(
                f"the tokenizer's chat template renders assistant turn {i} in an unexpected order "
                "(its generation prompt overlaps the previous reply); use template='vicuna'"
            )
        segments.append((full[done : len(prefix)], False))
        segments.append((full[len(prefix) : len(upto)], True))
        done = len(upto)
    segments.append((full[done:], False))
    return _merge(segments)


def render_segments(conversation: Sequence[dict], tokenizer: Any, template: str = "auto") -> Segments:
    """Render ``conversation`` with ``template`` into ``[(text, is_response), ...]``.

    Response segments include what ends a reply (the eos token for alpaca/vicuna, the chat template's
    end-of-turn marker for ``"chat"``) so the model learns to stop. Raises :class:`TemplateError` when the
    template does not fit this conversation and ``ValueError`` when the tokenizer cannot serve the template.
    """
    name = resolve_template(template, tokenizer, alpaca=is_alpaca_conversation(conversation))
    if name == "alpaca":
        return _render_alpaca(conversation, tokenizer)
    if name == "vicuna":
        return _render_vicuna(conversation, tokenizer)
    return _render_chat(conversation, tokenizer)
