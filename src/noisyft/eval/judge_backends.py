"""One judge request, end to end: the prompt, the two backends, retries and the request cap, the cache,
and the strict parsing of the reply. Pairing, scoring and the public entry points are in
:mod:`noisyft.eval.judge`.

A backend (an OpenAI-compatible chat endpoint, or a local Hugging Face causal LM) makes exactly one attempt
per :meth:`complete` call and returns a :class:`Completion`; it raises :class:`JudgeRequestError` for
transport failures (HTTP errors, timeouts, lost connections). :func:`send_with_retries` retries those with
backoff, taking every attempt from a :class:`RequestBudget` (``max_requests``), so attempts are counted.
:class:`RequestRunner` puts the cache in front of that and parses the reply with :func:`parse_verdict`.

Why the ``openai`` SDK: it speaks every OpenAI-compatible server (OpenAI, vLLM, TGI, llama.cpp, Ollama,
LiteLLM) and already maps HTTP statuses to typed exceptions that keep the response headers (for
``Retry-After``). Its own retry loop is switched off (``max_retries=0``) so that retries are ours and
countable, and so that the request cap also bounds retries.

The API key is read from an environment variable by the caller and handed to the SDK client only; it is
never logged, and every text that leaves this module (error texts, and replies, which a server may use to
echo the key) passes through the backend's :class:`~noisyft.eval.redaction.Redactor`. Replies are kept
up to :data:`MAX_REPLY_CHARS` characters (longer ones are cut and flagged ``reply_truncated``). An HTTP 200
whose body carries an ``error`` object is a transport failure (retried, never cached), not a reply.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noisyft import _io
from noisyft.eval.redaction import Redactor, redact

logger = logging.getLogger(__name__)

__all__ = [
    "JUDGE_SYSTEM_PROMPT",
    "JUDGE_USER_TEMPLATE",
    "PROMPT_VERSION",
    "STATUSES",
    "Completion",
    "HFJudgeBackend",
    "JudgeRequestError",
    "JudgmentCache",
    "OpenAIJudgeBackend",
    "RequestBudget",
    "RequestRunner",
    "RetryPolicy",
    "judge_messages",
    "parse_verdict",
    "redact",
    "send_with_retries",
]

PROMPT_VERSION = "noisyft-pairwise-v1"
JUDGE_SYSTEM_PROMPT = (
    "You are an impartial judge of AI assistants. You will see one instruction and two outputs written for "
    "it. Decide which output a careful human expert would prefer: the one that follows the instruction more "
    "helpfully, accurately and completely. Judge substance, not length or the order of presentation. "
    'Answer with exactly "Output (a)" or "Output (b)" and nothing else.'
)
JUDGE_USER_TEMPLATE = (
    "<instruction>\n{instruction}\n</instruction>\n\n"
    "<output_a>\n{first}\n</output_a>\n\n"
    "<output_b>\n{second}\n</output_b>\n\n"
    'Which output is better? Reply with exactly "Output (a)" or "Output (b)".'
)
STATUSES = ("ok", "malformed", "refused", "http_error", "timeout", "capped")
_LABEL = re.compile(r"output \(([ab])\)")
_WRAPPERS = " \t\r\n*`\"'"
_REFUSAL = re.compile(
    r"^(i'm sorry|i am sorry|sorry|i can't|i cannot|i can not|i won't|i will not|as an ai)\b"
)
DEFAULT_OPENAI_BASE_URL = "https://api.openai.com/v1"
RETRYABLE_STATUSES = frozenset({408, 409, 429})  # plus every 5xx
_ERROR_TEXT_LIMIT = 300
MAX_REPLY_CHARS = 4096  # a judge reply is kept up to this many characters in the cache and judgments


# --- prompt and reply -----------------------------------------------------------------------------------


def judge_messages(instruction: str, first: str, second: str) -> list[dict[str, str]]:
    """The chat messages of one request: `first` is shown as "Output (a)", `second` as "Output (b)"."""
    user = JUDGE_USER_TEMPLATE.format(instruction=instruction, first=first, second=second)
    return [{"role": "system", "content": JUDGE_SYSTEM_PROMPT}, {"role": "user", "content": user}]


def parse_verdict(
    text: str | None, *, finish_reason: str | None = None, refusal: str | None = None
) -> tuple[str, str | None]:
    """``(status, choice)`` for one reply; `choice` is ``"first"``/``"second"`` when status is ``"ok"``.

    Strict: after stripping whitespace, quotes, backticks, asterisks and one final period, the reply must
    be exactly "Output (a)" or "Output (b)" (any case). A set refusal field, a ``content_filter`` stop or a
    reply opening with an apology ("I'm sorry", "I cannot", "As an AI") is ``refused``; anything else,
    the empty reply included, is ``malformed``.
    """
    if refusal or finish_reason == "content_filter":
        return "refused", None
    if text is None:
        return "malformed", None
    core = text.strip(_WRAPPERS).removesuffix(".").strip(_WRAPPERS).lower()
    label = _LABEL.fullmatch(core)
    if label:
        return "ok", "first" if label.group(1) == "a" else "second"
    if _REFUSAL.match(text.strip(_WRAPPERS).lower().replace("\u2019", "'")):
        return "refused", None
    return "malformed", None


# --- backends ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Completion:
    """One reply of the judge: its text, why generation stopped, and the API's refusal field when set."""

    text: str | None
    finish_reason: str | None = None
    refusal: str | None = None


class JudgeRequestError(Exception):
    """A request that produced no reply. `status` is ``"http_error"`` or ``"timeout"``; the text is redacted."""

    def __init__(
        self,
        status: str,
        detail: str,
        *,
        retryable: bool,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.retryable = retryable
        self.http_status = http_status
        self.retry_after = retry_after


def _retry_after(headers: Any) -> float | None:
    """Seconds asked for by ``retry-after-ms`` or a numeric ``retry-after`` header; None if absent or a date."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 1e-3), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if seconds >= 0 and seconds != float("inf"):
            return seconds
    return None


class OpenAIJudgeBackend:
    """Chat completions on an OpenAI-compatible endpoint, one attempt per call (the SDK's retries are off).

    Args:
        model: the model name the endpoint serves.
        base_url: the endpoint, e.g. ``"http://localhost:8000/v1"``; None means ``$OPENAI_BASE_URL`` or
            ``https://api.openai.com/v1``.
        api_key: the key itself (the caller reads it from the environment); kept only inside the client.
        timeout_s: per-attempt timeout (connect + read).
        temperature, max_tokens: decoding settings sent with every request.
    """

    name = "openai"

    def __init__(
        self,
        *,
        model: str,
        base_url: str | None,
        api_key: str,
        timeout_s: float,
        temperature: float,
        max_tokens: int,
    ) -> None:
        import openai

        self._openai = openai
        self.model = model
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_OPENAI_BASE_URL).rstrip("/")
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.redact = Redactor(api_key)
        self._client = openai.OpenAI(
            base_url=self.base_url, api_key=api_key, timeout=timeout_s, max_retries=0
        )

    def __repr__(self) -> str:  # the key must not appear in a repr
        return f"OpenAIJudgeBackend(model={self.model!r}, base_url={self.base_url!r})"

    def identity(self) -> dict[str, Any]:
        """What decides the judge's answer, for the cache key (never the key)."""
        return {"backend": self.name, "model": self.model, "base_url": self.base_url}

    def complete(self, messages: list[dict[str, str]]) -> Completion:
        openai = self._openai
        try:
            response = self._client.chat.completions.create(
                model=self.model,
                messages=messages,  # type: ignore[arg-type]
                temperature=self.temperature,
                max_tokens=self.max_tokens,
            )
        except openai.APITimeoutError:
            raise JudgeRequestError("timeout", "request timed out", retryable=True) from None
        except openai.APIStatusError as exc:
            code = exc.status_code
            detail = self.redact(f"HTTP {code}: {exc.message}")[:_ERROR_TEXT_LIMIT]
            raise JudgeRequestError(
                "http_error",
                detail,
                retryable=code in RETRYABLE_STATUSES or code >= 500,
                http_status=code,
                retry_after=_retry_after(getattr(exc.response, "headers", None)),
            ) from None
        except openai.APIConnectionError as exc:
            detail = self.redact(f"connection error: {exc.message}")[:_ERROR_TEXT_LIMIT]
            raise JudgeRequestError("http_error", detail, retryable=True) from None
        except (openai.OpenAIError, ValueError) as exc:  # other SDK errors, a reply it could not decode
            detail = self.redact(f"{type(exc).__name__}: {exc}")[:_ERROR_TEXT_LIMIT]
            raise JudgeRequestError("http_error", detail, retryable=False) from None
        error = (getattr(response, "model_extra", None) or {}).get("error")
        if error is not None:  # an HTTP 200 that is an error report, not a reply
            message = error.get("message", error) if isinstance(error, dict) else error
            detail = self.redact(f"HTTP 200 with an error object: {message}")[:_ERROR_TEXT_LIMIT]
            raise JudgeRequestError("http_error", detail, retryable=True, http_status=200)
        choices = getattr(response, "choices", None)
        if not choices:  # a 200 without choices: a reply, but not one we can read
            return Completion(text=None, finish_reason="no_choices")
        choice = choices[0]
        message = choice.message
        return Completion(
            text=message.content,
            finish_reason=choice.finish_reason,
            refusal=getattr(message, "refusal", None),
        )


class HFJudgeBackend:
    """A local causal LM as the judge: chat template (if any), greedy decoding, the new tokens decoded.

    Calls are serialized with a lock (one generation at a time); ``timeout_s`` does not apply locally.
    With a model object passed in, `model_id` names it in the cache key: two different objects under the
    same id share cached judgments.
    """

    name = "hf"

    def __init__(self, *, model_id: str, max_tokens: int, model: Any = None, tokenizer: Any = None) -> None:
        if (model is None) != (tokenizer is None):
            raise ValueError("pass both the judge model and its tokenizer, or neither (to load `model_id`)")
        if model is None:
            from noisyft.models import load_model_and_tokenizer

            model, tokenizer = load_model_and_tokenizer(model_id)
        self.model_id = model_id
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"HFJudgeBackend(model_id={self.model_id!r})"

    redact = Redactor(None)  # no key; masks key-shaped tokens only

    def identity(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self.model_id, "base_url": None}

    def render(self, messages: list[dict[str, str]]) -> str:
        """The prompt text: the tokenizer's chat template when it has one (system turn folded into the
        user turn if the template rejects it), else the turns joined by blank lines."""
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            try:
                return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception:  # templates without a system role raise from jinja
                merged = "\n\n".join(m["content"] for m in messages)
                return tok.apply_chat_template(
                    [{"role": "user", "content": merged}], tokenize=False, add_generation_prompt=True
                )
        return "\n\n".join(m["content"] for m in messages) + "\n\n"

    def complete(self, messages: list[dict[str, str]]) -> Completion:
        import torch

        tok = self.tokenizer
        text = self.render(messages)
        enc = tok(text, return_tensors="pt", add_special_tokens=not getattr(tok, "chat_template", None))
        device = next(self.model.parameters()).device
        input_ids = enc["input_ids"].to(device)  # (1, T)
        attention_mask = enc["attention_mask"].to(device)  # (1, T)
        from noisyft.models import pad_token_id

        pad_id = pad_token_id(tok)
        with self._lock, torch.inference_mode():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=self.max_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )  # (1, T + new)
        new = out[0, input_ids.shape[1] :]  # (new,)
        eos = tok.eos_token_id
        finish = "stop" if eos is not None and bool((new == eos).any()) else "length"
        return Completion(text=tok.decode(new, skip_special_tokens=True), finish_reason=finish)


# --- retries, the cap, the cache ------------------------------------------------------------------------


class RequestBudget:
    """Thread-safe count of attempts sent, refusing more once `limit` (None = no limit) is reached."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.sent, self._lock = limit, 0, threading.Lock()

    def take(self) -> bool:
        with self._lock:
            if self.limit is not None and self.sent >= self.limit:
                return False
            self.sent += 1
            return True


class RetryPolicy:
    """Retry delays: ``min(max_backoff_s, backoff_s * 2**(k-1)) * U(0.5, 1)`` after the k-th failed attempt,
    or the server's ``Retry-After`` (capped at `max_backoff_s`) when that is longer."""

    def __init__(self, max_retries: int, backoff_s: float, max_backoff_s: float, seed: int = 0) -> None:
        self.max_retries, self.backoff_s, self.max_backoff_s = max_retries, backoff_s, max_backoff_s
        self._rng = random.Random(seed)  # jitter only
        self._lock = threading.Lock()

    def delay(self, attempt: int, retry_after: float | None) -> float:
        with self._lock:
            jitter = self._rng.uniform(0.5, 1.0)
        delay = min(self.max_backoff_s, self.backoff_s * 2 ** (attempt - 1)) * jitter
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_backoff_s))
        return delay


def send_with_retries(
    backend: Any, messages: list[dict[str, str]], *, budget: RequestBudget, policy: RetryPolicy
) -> tuple[Completion | None, dict[str, Any] | None, int]:
    """``(completion, failure, attempts)``: one of `completion` / `failure` is None.

    `failure` is ``{"status": "http_error" | "timeout" | "capped", "error": str, "http_status": int | None}``;
    ``capped`` only when nothing was sent. A failure that cannot pass (e.g. HTTP 401) is not retried; one
    that could is retried at most ``policy.max_retries`` times, budget permitting.
    """
    attempts, failure = 0, None
    while True:
        if not budget.take():
            if failure is None:
                return (
                    None,
                    {"status": "capped", "error": "not sent: max_requests reached", "http_status": None},
                    0,
                )
            failure["error"] += " (no retry: max_requests reached)"
            return None, failure, attempts
        attempts += 1
        try:
            return backend.complete(messages), None, attempts
        except JudgeRequestError as exc:
            failure = {"status": exc.status, "error": exc.detail, "http_status": exc.http_status}
            if not exc.retryable or attempts > policy.max_retries:
                return None, failure, attempts
            logger.debug("judge request failed (%s), retry %d", exc.detail, attempts)
            time.sleep(policy.delay(attempts, exc.retry_after))


class JudgmentCache:
    """Judgments on disk, one small JSON file per key (``<root>/<key[:2]>/<key>.json``), written atomically,
    so concurrent writers and killed runs never leave a torn entry."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    @staticmethod
    def make_key(fields: dict[str, Any]) -> str:
        """SHA-256 of the fields as canonical JSON (sorted keys)."""
        return hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            logger.warning("ignoring unreadable judge cache entry %s", path)
            return None
        if not isinstance(entry, dict) or entry.get("status") not in ("ok", "malformed", "refused"):
            logger.warning("ignoring judge cache entry %s: not a cached reply", path)
            return None
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        _io.atomic_write_json(self._path(key), entry)


@dataclass
class RequestRunner:
    """Judges one request at a time (thread-safe): cache lookup, else send with retries, parse, cache.

    Replies (`ok`, and `malformed`/`refused` when `cache_invalid_replies`) are cached; failures never are.
    """

    backend: Any
    cache: JudgmentCache
    budget: RequestBudget
    policy: RetryPolicy
    temperature: float
    max_tokens: int
    cache_invalid_replies: bool = True

    def _stored_reply(self, reply: Completion) -> dict[str, Any]:
        """The reply as cached and written: redacted, then cut to :data:`MAX_REPLY_CHARS` characters."""
        redactor = getattr(self.backend, "redact", None) or Redactor(None)
        text = reply.text if reply.text is not None else reply.refusal
        text = None if text is None else redactor(text)
        finish = None if reply.finish_reason is None else redactor(reply.finish_reason)
        cut = text is not None and len(text) > MAX_REPLY_CHARS
        return {
            "reply": text[:MAX_REPLY_CHARS] if cut else text,
            "reply_truncated": cut,
            "finish_reason": finish,
        }

    def judge(self, pair: int, order: str, instruction: str, first: str, second: str) -> dict[str, Any]:
        """One request (answer `order[0]` shown first): from the cache, or sent; returns its judgments row."""
        key = JudgmentCache.make_key(
            {
                **self.backend.identity(),
                "prompt_version": PROMPT_VERSION,
                "instruction": instruction,
                "first": first,
                "second": second,
                "temperature": self.temperature,
                "max_tokens": self.max_tokens,
            }
        )
        entry = self.cache.get(key)
        if entry is not None and entry["status"] != "ok" and not self.cache_invalid_replies:
            entry = None
        cached, attempts = entry is not None, 0
        if entry is None:
            messages = judge_messages(instruction, first, second)
            reply, failure, attempts = send_with_retries(
                self.backend, messages, budget=self.budget, policy=self.policy
            )
            if reply is None:
                entry = failure
            else:
                status, choice = parse_verdict(
                    reply.text, finish_reason=reply.finish_reason, refusal=reply.refusal
                )
                entry = {"status": status, "choice": choice, **self._stored_reply(reply)}
                if status == "ok" or self.cache_invalid_replies:
                    self.cache.put(key, entry)
        choice = entry.get("choice")
        return {
            "pair": pair,
            "order": order,
            "first": order[0],
            "status": entry["status"],
            "choice": choice,
            "preferred": None if choice is None else order[0] if choice == "first" else order[1],
            "reply": entry.get("reply"),
            "reply_truncated": entry.get("reply_truncated", False),
            "finish_reason": entry.get("finish_reason"),
            "error": entry.get("error"),
            "http_status": entry.get("http_status"),
            "attempts": attempts,
            "cached": cached,
            "cache_key": key,
        }
