"""Pairwise preference by an LLM judge, AlpacaEval-style (NEFTune paper, Sec. 4 and its human study).

Two answer lists to the same instructions, A (the model under test) and B (a baseline model or reference
answers), are compared pair by pair. Each pair is asked twice, once with A shown as "Output (a)" and once
with B shown first, to cancel the judge's position bias. The judge must answer with exactly one label
(:data:`JUDGE_SYSTEM_PROMPT`, :data:`JUDGE_USER_TEMPLATE`, version :data:`PROMPT_VERSION`); there is no tie
label, as in AlpacaEval: ties come only from the two orders disagreeing.

Per request, a status: ``ok``, ``malformed`` (empty or not exactly one label), ``refused`` (the API's
refusal field, a content filter, or an apology instead of a label), ``http_error`` and ``timeout`` (after
retries), ``capped`` (not sent: ``max_requests`` reached). Per pair: ``win`` (both orders prefer A),
``loss`` (both prefer B), ``tie`` (they disagree), ``invalid`` (an order failed), ``capped`` (an order was
never sent). Only ``ok`` replies count; a malformed or refused reply is never a win.

Scores over the ``n = wins + losses + ties`` valid pairs (invalid and capped pairs are excluded from `n`):

* ``win_rate = wins / (n - ties)``, the paper's human-study scoring: 88 / (140 - 22) = 74.6%;
* ``win_rate_ties_half = (wins + ties / 2) / n``;

each with a seeded percentile-bootstrap confidence interval, resampling pairs with replacement.

Caching: one JSON file per request under `cache_dir`, keyed by SHA-256 of (backend, model, base_url,
prompt version, instruction, first answer, second answer, temperature, max_tokens). Judge replies (``ok``,
and by default ``malformed``/``refused``, which a temperature-0 judge would most likely repeat) are cached;
transport failures and capped requests are not, so a rerun retries exactly those. Retries: transport
failures that may pass (timeouts, lost connections, HTTP 408/409/429/5xx) are retried up to
``max_retries`` times after ``min(max_backoff_s, backoff_s * 2**k) * U(0.5, 1)`` seconds, or the
``Retry-After`` the server asked for if longer; replies are never retried. Every attempt counts
against ``max_requests``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from noisyft import _io
from noisyft.eval.answers import load_answers, pair_answers
from noisyft.eval.judge_backends import (
    JUDGE_SYSTEM_PROMPT,
    JUDGE_USER_TEMPLATE,
    PROMPT_VERSION,
    STATUSES,
    HFJudgeBackend,
    JudgmentCache,
    OpenAIJudgeBackend,
    RequestBudget,
    RequestRunner,
    RetryPolicy,
    judge_messages,
    parse_verdict,
)
from noisyft.eval.redaction import Redactor

logger = logging.getLogger(__name__)

__all__ = [
    "JUDGE_SYSTEM_PROMPT",
    "JUDGE_USER_TEMPLATE",
    "PROMPT_VERSION",
    "JudgeConfig",
    "JudgeNoResultError",
    "judge_answer_files",
    "judge_messages",
    "judge_pairwise",
    "load_answers",
    "pair_answers",
    "parse_verdict",
    "win_rates",
]

OUTCOMES = ("win", "loss", "tie", "invalid", "capped")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class JudgeNoResultError(ValueError):
    """No pair could be judged (every request failed or was capped); ``summary`` is the written summary."""

    def __init__(self, message: str, summary: dict[str, Any]) -> None:
        super().__init__(message)
        self.summary = summary


@dataclass
class JudgeConfig:
    """Settings of the pairwise judge. The API key is never a field: it is read from `api_key_env` per run.

    Args:
        model: model name served by the endpoint (``"openai"``), or a local model path / ``"smollm2"``
            (``"hf"``; with a model object passed to :func:`judge_pairwise`, the name it is cached under).
        backend: ``"openai"`` (any OpenAI-compatible chat endpoint) or ``"hf"`` (local causal LM, greedy).
        base_url: endpoint such as ``"http://localhost:8000/v1"``; None = ``$OPENAI_BASE_URL`` or OpenAI's.
        api_key_env: name of the environment variable holding the key (default ``OPENAI_API_KEY``).
        max_concurrency: requests in flight at most (the ``hf`` backend runs one at a time).
        max_retries: extra attempts after a transport failure that may pass (0 = no retry).
        backoff_s, max_backoff_s: first backoff delay and its ceiling, in seconds (doubling, with jitter).
        timeout_s: per-attempt timeout in seconds (``openai`` only).
        max_requests: hard cap on attempts sent in one run, retries included; None = no cap; 0 = cache only.
        temperature: sampling temperature sent to the endpoint; the ``hf`` backend needs 0 (greedy).
        max_tokens: reply length limit; the label needs a handful of tokens.
        n_bootstrap: bootstrap resamples for the confidence intervals (0 = no intervals).
        ci_level: two-sided confidence level of the percentile intervals.
        seed: seeds the bootstrap (and the retry jitter).
        cache_invalid_replies: also cache ``malformed``/``refused`` replies (a rerun then reuses them).
    """

    model: str
    backend: str = "openai"
    base_url: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrency: int = 4
    max_retries: int = 3
    backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    timeout_s: float = 60.0
    max_requests: int | None = None
    temperature: float = 0.0
    max_tokens: int = 16
    n_bootstrap: int = 2000
    ci_level: float = 0.95
    seed: int = 0
    cache_invalid_replies: bool = True

    def __post_init__(self) -> None:
        if self.backend not in ("openai", "hf"):
            raise ValueError(f"JudgeConfig.backend must be 'openai' or 'hf', got {self.backend!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError("JudgeConfig.model must name the judge model (a non-empty string)")
        if not isinstance(self.api_key_env, str) or not _ENV_NAME.match(self.api_key_env):
            # never echo the value: a user may have pasted the key itself here
            raise ValueError(
                "JudgeConfig.api_key_env must be the NAME of an environment variable (letters, digits, "
                "underscores), e.g. 'OPENAI_API_KEY'; put the key itself in that variable"
            )
        if self.base_url is not None:
            parts = urlsplit(self.base_url)
            if self.backend != "openai":
                raise ValueError("JudgeConfig.base_url applies to the 'openai' backend only")
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise ValueError(f"JudgeConfig.base_url must be an http(s) URL, got {self.base_url!r}")
            if parts.username or parts.password:
                raise ValueError("JudgeConfig.base_url must not carry credentials; use api_key_env")
        ints = {"max_concurrency": 1, "max_retries": 0, "max_tokens": 1, "n_bootstrap": 0}
        for name, low in ints.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"JudgeConfig.{name} must be an integer >= {low}, got {value!r}")
        if self.max_requests is not None and (
            not isinstance(self.max_requests, int) or self.max_requests < 0
        ):
            raise ValueError(
                f"JudgeConfig.max_requests must be None or an integer >= 0, got {self.max_requests!r}"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"JudgeConfig.timeout_s must be > 0, got {self.timeout_s}")
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("JudgeConfig needs 0 <= backoff_s <= max_backoff_s")
        if self.temperature < 0:
            raise ValueError(f"JudgeConfig.temperature must be >= 0, got {self.temperature}")
        if self.backend == "hf" and self.temperature != 0:
            raise ValueError("the 'hf' judge decodes greedily: JudgeConfig.temperature must be 0")
        if not 0 < self.ci_level < 1:
            raise ValueError(f"JudgeConfig.ci_level must be in (0, 1), got {self.ci_level}")

    def to_dict(self) -> dict[str, Any]:
        """Every field, for results files (there is no key to leave out: it is never stored)."""
        return asdict(self)


# --- answers files --------------------------------------------------------------------------------------


def _interval(samples: np.ndarray, level: float) -> tuple[float | None, float | None]:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None, None
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(samples, [tail, 100 - tail])
    return float(low), float(high)


def win_rates(
    outcomes: Sequence[str], *, n_bootstrap: int = 2000, ci_level: float = 0.95, seed: int = 0
) -> dict[str, Any]:
    """Win rates of side A over the valid pairs (outcomes ``win``/``loss``/``tie``; others are ignored).

    ``win_rate = wins / (n - ties)`` (None when every valid pair is a tie) and
    ``win_rate_ties_half = (wins + ties / 2) / n``, with percentile-bootstrap intervals from `n_bootstrap`
    resamples of the n valid pairs drawn with replacement by ``numpy.random.default_rng(seed)``
    (resamples that are all ties are dropped for `win_rate`).
    """
    counts = Counter(outcomes)
    wins, losses, ties = counts["win"], counts["loss"], counts["tie"]
    n = wins + losses + ties
    result: dict[str, Any] = {"n": n, "wins": wins, "losses": losses, "ties": ties}
    strict = wins / (n - ties) if n - ties > 0 else None
    half = (wins + ties / 2) / n if n > 0 else None
    low_s = high_s = low_h = high_h = None
    if n > 0 and n_bootstrap > 0:
        win = np.array(
            [o == "win" for o in outcomes if o in ("win", "loss", "tie")], dtype=np.float64
        )  # (n,)
        tie = np.array(
            [o == "tie" for o in outcomes if o in ("win", "loss", "tie")], dtype=np.float64
        )  # (n,)
        rng = np.random.default_rng(seed)
        strict_s, half_s = [], []
        for start in range(0, n_bootstrap, 256):  # chunks keep memory at 256 x n
            idx = rng.integers(0, n, size=(min(256, n_bootstrap - start), n))  # (b, n)
            w, t = win[idx].sum(axis=1), tie[idx].sum(axis=1)  # (b,), (b,)
            decided = n - t  # (b,)
            strict_s.append(np.where(decided > 0, w / np.maximum(decided, 1), np.nan))
            half_s.append((w + t / 2) / n)
        low_s, high_s = _interval(np.concatenate(strict_s), ci_level)
        low_h, high_h = _interval(np.concatenate(half_s), ci_level)
    result["win_rate"] = {"value": strict, "ci_low": low_s, "ci_high": high_s, "formula": "wins / (n - ties)"}
    result["win_rate_ties_half"] = {
        "value": half,
        "ci_low": low_h,
        "ci_high": high_h,
        "formula": "(wins + ties / 2) / n",
    }
    return result


def _pair_outcome(first: dict, second: dict) -> str:
    statuses = (first["status"], second["status"])
    if any(s not in ("ok", "capped") for s in statuses):
        return "invalid"
    if "capped" in statuses:
        return "capped"
    if first["preferred"] != second["preferred"]:
        return "tie"
    return "win" if first["preferred"] == "a" else "loss"


# --- running --------------------------------------------------------------------------------------------


def _make_backend(config: JudgeConfig, judge_model: tuple[Any, Any] | None) -> tuple[Any, str | None]:
    """The backend, and the API key it was given (only to redact it from what gets written)."""
    if config.backend == "hf":
        model, tokenizer = judge_model if judge_model is not None else (None, None)
        backend = HFJudgeBackend(
            model_id=config.model, max_tokens=config.max_tokens, model=model, tokenizer=tokenizer
        )
        return backend, None
    if judge_model is not None:
        raise ValueError("judge_model is for the 'hf' backend only")
    value = os.environ.get(config.api_key_env, "")
    if not value.strip():
        raise ValueError(
            f"the judge's API key is read from the environment variable {config.api_key_env}, which is not "
            "set; set it (any non-empty value works for a local server that does not check keys)"
        )
    backend = OpenAIJudgeBackend(
        model=config.model,
        base_url=config.base_url,
        api_key=value,
        timeout_s=config.timeout_s,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
    )
    return backend, value


def _run_requests(
    run: RequestRunner, jobs: list[tuple[int, str, str, str, str]], workers: int, progress: bool
) -> list[dict]:
    """Every job through a pool of `workers` threads; rows come back in job order."""
    from tqdm.auto import tqdm

    rows: list[dict | None] = [None] * len(jobs)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {pool.submit(run.judge, *job): k for k, job in enumerate(jobs)}
        try:
            for fut in tqdm(as_completed(futures), total=len(futures), disable=not progress, desc="judge"):
                rows[futures[fut]] = fut.result()
        except BaseException:
            for fut in futures:
                fut.cancel()
            raise
    return rows  # type: ignore[return-value]


def judge_pairwise(
    instructions: Sequence[str],
    answers_a: Sequence[str],
    answers_b: Sequence[str],
    config: JudgeConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    judge_model: tuple[Any, Any] | None = None,
    sources: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Judge A against B on every instruction, both orders; return (and write) the summary.

    The requests run in a thread pool of ``max_concurrency`` workers (1 for ``hf``), pairs in order, both
    orders of a pair next to each other, so under ``max_requests`` the first pairs are the judged ones.

    Args:
        instructions, answers_a, answers_b: paired by position; "win" means the judge preferred A.
        config: the judge (see :class:`JudgeConfig`); the key is read from ``config.api_key_env`` now.
        cache_dir: judgment cache folder; None = ``<noisyft cache>/judge``.
        output_dir: when given, ``judgments.jsonl`` (one row per request) and ``summary.json`` are written
            there atomically.
        progress: show a progress bar.
        judge_model: ``(model, tokenizer)`` for the ``hf`` backend instead of loading ``config.model``.
        sources: where the answers came from (e.g. ``{"a": path, "b": path}``), recorded as ``"answers"``.

    Returns:
        The summary: counts of pair outcomes, ``n`` (valid pairs), both win rates with intervals, request
        counts by status, and the judge config (which holds no key).
    """
    n_pairs = len(instructions)
    if not (len(answers_a) == len(answers_b) == n_pairs):
        raise ValueError(
            f"need one answer per instruction: {n_pairs} instructions, {len(answers_a)} answers A, {len(answers_b)} answers B"
        )
    for name, seq in (("instructions", instructions), ("answers_a", answers_a), ("answers_b", answers_b)):
        for i, value in enumerate(seq):
            if not isinstance(value, str):
                raise ValueError(f"{name}[{i}] must be a string, got {type(value).__name__}")
    backend, secret = _make_backend(config, judge_model)
    cache = JudgmentCache(cache_dir if cache_dir is not None else _io.cache_dir() / "judge")
    policy = RetryPolicy(config.max_retries, config.backoff_s, config.max_backoff_s, seed=config.seed)
    run = RequestRunner(
        backend,
        cache,
        RequestBudget(config.max_requests),
        policy,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
        cache_invalid_replies=config.cache_invalid_replies,
    )
    sides = {"a": answers_a, "b": answers_b}
    jobs = [
        (i, order, instructions[i], sides[order[0]][i], sides[order[1]][i])
        for i in range(n_pairs)
        for order in ("ab", "ba")
    ]
    workers = config.max_concurrency if config.backend == "openai" else 1
    start = time.perf_counter()
    ordered = _run_requests(run, jobs, workers, progress)
    rows = {(r["pair"], r["order"]): r for r in ordered}
    outcomes = []
    for i in range(n_pairs):
        outcome = _pair_outcome(rows[(i, "ab")], rows[(i, "ba")])
        outcomes.append(outcome)
        rows[(i, "ab")]["outcome"] = rows[(i, "ba")]["outcome"] = outcome
    scores = win_rates(outcomes, n_bootstrap=config.n_bootstrap, ci_level=config.ci_level, seed=config.seed)
    by_status = Counter(r["status"] for r in ordered)
    ok = [r for r in ordered if r["status"] == "ok"]
    errors = Counter(r["error"] for r in ordered if r["status"] in ("http_error", "timeout"))
    summary = {
        "analysis": "pairwise_judge",
        **({"answers": sources} if sources else {}),
        "prompt_version": PROMPT_VERSION,
        "judge": config.to_dict(),
        "backend": backend.identity(),
        "n_pairs": n_pairs,
        "n": scores["n"],
        "n_note": "n counts valid pairs (win + loss + tie); invalid and capped pairs are left out",
        "counts": {o: outcomes.count(o) for o in OUTCOMES},
        "win_rate": scores["win_rate"],
        "win_rate_ties_half": scores["win_rate_ties_half"],
        "ci_level": config.ci_level,
        "n_bootstrap": config.n_bootstrap,
        "seed": config.seed,
        "requests": {
            "total": len(ordered),
            "sent": run.budget.sent,
            "retries": sum(max(r["attempts"] - 1, 0) for r in ordered),
            "cache_hits": sum(r["cached"] for r in ordered),
            "by_status": {s: by_status.get(s, 0) for s in STATUSES},
            "top_errors": dict(errors.most_common(5)),
        },
        "first_position_preferred": (sum(r["choice"] == "first" for r in ok) / len(ok)) if ok else None,
        "elapsed_s": round(time.perf_counter() - start, 3),
    }
    for status in ("malformed", "refused", "http_error", "timeout", "capped"):
        if by_status.get(status):
            logger.warning("judge: %d of %d requests ended as %s", by_status[status], len(ordered), status)
    for error, count in errors.most_common(3):
        logger.warning("judge: %d x %s", count, error)
    wr = scores["win_rate"]["value"]
    logger.info(
        "judge: %d pairs, %d valid: %d wins, %d losses, %d ties, %d invalid, %d capped; win rate %s; "
        "%d requests sent, %d cache hits",
        n_pairs,
        scores["n"],
        *(summary["counts"][o] for o in OUTCOMES),
        "n/a" if wr is None else f"{100 * wr:.1f}%",
        run.budget.sent,
        summary["requests"]["cache_hits"],
    )
    if output_dir is not None:  # every reply and error was redacted already; this pass guards the files
        out, redact = Path(output_dir), Redactor(secret)
        lines = [redact(json.dumps(r, ensure_ascii=False)) for r in ordered]
        _io.atomic_write_text(out / "judgments.jsonl", "".join(line + "\n" for line in lines))
        _io.atomic_write_text(out / "summary.json", redact(json.dumps(summary, indent=2, default=str)) + "\n")
    return summary


def judge_answer_files(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    config: JudgeConfig,
    *,
    cache_dir: str | os.PathLike | None = None,
    output_dir: str | os.PathLike | None = None,
    progress: bool = True,
    judge_model: tuple[Any, Any] | None = None,
) -> dict[str, Any]:
    """:func:`load_answers` both files, :func:`pair_answers` them, then :func:`judge_pairwise` (A = `path_a`).

    The summary also records the two source files under ``"answers"``. Raises :class:`JudgeNoResultError`
    (a ValueError carrying the summary) when no pair could be judged (every request failed or was capped),
    after the results files were written, so a command can exit non-zero.
    """
    instructions, a, b = pair_answers(
        load_answers(path_a), load_answers(path_b), name_a=str(path_a), name_b=str(path_b)
    )
    summary = judge_pairwise(
        instructions,
        a,
        b,
        config,
        cache_dir=cache_dir,
        output_dir=output_dir,
        progress=progress,
        judge_model=judge_model,
        sources={"a": str(path_a), "b": str(path_b)},
    )
    if summary["n"] == 0:
        counts = ", ".join(f"{k}: {v}" for k, v in summary["requests"]["by_status"].items() if v)
        written = f"; results in {output_dir}" if output_dir is not None else ""
        raise JudgeNoResultError(
            f"the judge could not judge any of the {summary['n_pairs']} pairs (requests {counts}){written}",
            summary,
        )
    return summary
