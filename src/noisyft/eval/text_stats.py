"""Length, n-gram repetition and log-diversity of generated texts (NEFTune paper, Table 4).

Per text of tokens ``t_1 .. t_T`` and order ``n`` in 2, 3, 4::

    rep_n         = 1 - |unique n-grams| / |n-grams|            (a fraction in [0, 1))
    diversity     = prod_{n=2..4} (1 - rep_n)
    log_diversity = -ln(max(1 - diversity, e^-20))              (so at most 20)

:func:`text_stats` reports the mean of each quantity over the texts it keeps, as fractions (not per cent).

The NEFTune paper took these numbers from the script of Kirchenbauer et al., "On the Reliability of
Watermarks for Large Language Models" (https://arxiv.org/abs/2306.04634), file
``watermark_reliability_release/metrics/repetition_diversity.py`` of ``jwkirchenbauer/lm-watermarking``,
itself adapted from SimCTG's ``measure_repetition_and_diversity`` (https://github.com/yxuansu/SimCTG,
``simctg/evaluation.py``). That script scores one text at a time (the dataset-level number is the mean of the
per-text values, texts whose scoring fails being NaN and left out of the mean) and has two quirks that
``paper_compat=True`` reproduces:

=========================================  ===================================  ==================================
                                           default                              ``paper_compat=True``
=========================================  ===================================  ==================================
n-grams counted in a text of T tokens      T - n + 1 (all of them)              T - n (``while end_idx < T`` skips
                                                                                the last one)
diversity                                  prod (1 - rep_n)                     prod (1 - rep_n / 100): SimCTG
                                                                                multiplied rep_n by 100 first;
                                                                                the watermark script removed
                                                                                that but kept the ``/ 100``
text with no n-gram of some order n        rep_n = 0 (nothing repeats); the     left out of every mean (the
(T < n by default, T <= n in compat)       text stays in the means              script divides by zero → NaN)
=========================================  ===================================  ==================================

Because of the ``/ 100``, ``diversity`` in compat mode is ``~ 1 - (rep_2 + rep_3 + rep_4) / 100`` and
``log_diversity`` about ``ln(100) = 4.6`` higher than the value by the formula above whenever the repetition
rates are small. SimCTG's original pooled the n-gram counts of all texts before dividing and rounded per-cent
values to two decimals; neither mode does that.

Tokens are whitespace-separated words (``str.split()``, as the script) unless a tokenizer is given; then they
are the token ids of ``tokenizer(text, add_special_tokens=False)``. Surrounding whitespace is stripped before
tokenizing in both cases (the script strips too). Empty strings are allowed: they count as 0 tokens in
``mean_length`` and, having no n-gram, are handled by the last table row (unless a cutoff drops them).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)

NGRAM_ORDERS = (2, 3, 4)
LOG_DIVERSITY_CAP = 20.0  # -ln(e^-20): the value for a text with no repetition at all


def ngram_repetition(tokens: Sequence[Any], n: int, *, skip_last: bool = False) -> float | None:
    """``1 - unique / total`` over the n-grams of `tokens`; None when there is no n-gram to count.

    With ``skip_last`` the last n-gram is not counted (the quirk of the paper's script), so a text of T tokens
    has ``T - n`` n-grams instead of ``T - n + 1``.
    """
    if n < 1:
        raise ValueError(f"n-gram order must be >= 1, got {n}")
    total = len(tokens) - n + (0 if skip_last else 1)
    if total <= 0:
        return None
    unique = {tuple(tokens[i : i + n]) for i in range(total)}
    return 1.0 - len(unique) / total


def sequence_stats(tokens: Sequence[Any], *, paper_compat: bool = False) -> dict[str, float] | None:
    """``rep_2, rep_3, rep_4, diversity, log_diversity`` of one token sequence (see the module docstring).

    Returns None only with ``paper_compat=True`` when some order has no n-gram (the script's NaN row).
    """
    reps: dict[str, float] = {}
    diversity = 1.0
    for n in NGRAM_ORDERS:
        rep = ngram_repetition(tokens, n, skip_last=paper_compat)
        if rep is None:
            if paper_compat:
                return None
            rep = 0.0  # no n-gram, so nothing repeats
        reps[f"rep_{n}"] = rep
        diversity *= 1.0 - (rep / 100.0 if paper_compat else rep)
    log_diversity = -math.log(max(1.0 - diversity, math.exp(-LOG_DIVERSITY_CAP)))
    return {**reps, "diversity": diversity, "log_diversity": log_diversity}


def auto_cutoff(lengths: Sequence[int]) -> int:
    """The largest ``c`` such that at least half of the texts have ``length >= c``.

    With the lengths sorted in decreasing order, that is the ``ceil(N / 2)``-th one (1-based): for an odd N the
    median, for an even N the upper of the two middle values. Raises ValueError when it is 0 (more than half
    of the texts are empty), as a cutoff of 0 tokens would measure nothing.
    """
    if not lengths:
        raise ValueError("cutoff='auto' needs at least one text")
    ordered = sorted(lengths, reverse=True)
    cutoff = ordered[math.ceil(len(ordered) / 2) - 1]
    if cutoff <= 0:
        raise ValueError(
            f"cutoff='auto' resolves to 0 tokens: {sum(1 for x in lengths if x == 0)} of {len(lengths)} texts "
            "are empty; pass an explicit cutoff or no cutoff"
        )
    return cutoff


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str) or not isinstance(texts, Sequence):
        raise TypeError(f"texts must be a list of strings, got {type(texts).__name__}")
    if len(texts) == 0:
        raise ValueError("texts is empty: text statistics need at least one text")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] must be a string, got {type(text).__name__}")
    return list(texts)


def _tokenize(texts: list[str], tokenizer: Any | None) -> tuple[list[list[Any]], str]:
    stripped = [t.strip() for t in texts]
    if tokenizer is None:
        return [t.split() for t in stripped], "whitespace"
    ids = tokenizer(stripped, add_special_tokens=False)["input_ids"]
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return [list(x) for x in ids], f"tokenizer:{name}"


def _resolve_cutoff(cutoff: int | str | None, lengths: list[int]) -> int | None:
    if cutoff is None:
        return None
    if cutoff == "auto":
        return auto_cutoff(lengths)
    if isinstance(cutoff, bool) or not isinstance(cutoff, int) or cutoff < 1:
        raise ValueError(f"cutoff must be None, 'auto' or a positive int, got {cutoff!r}")
    return cutoff


def text_stats(
    texts: Sequence[str],
    *,
    cutoff: int | str | None = None,
    tokenizer: Any | None = None,
    paper_compat: bool = False,
) -> dict[str, Any]:
    """Mean length, n-gram repetition and (log-)diversity of `texts` (formulas in the module docstring).

    Args:
        texts: the texts, e.g. generated answers. Must be non-empty; empty strings are allowed.
        cutoff: None (use whole texts); an int ``c >= 1`` (texts with fewer than ``c`` tokens are left out of
            every value but ``mean_length``, the others are cut to their first ``c`` tokens, so long and short
            answers are compared on equal footing); or ``"auto"`` (``c`` = :func:`auto_cutoff` of the lengths,
            the largest ``c`` that keeps at least half of the texts, as the NEFTune paper chose it).
        tokenizer: a Hugging Face tokenizer; tokens are then ids of ``tokenizer(text, add_special_tokens=False)``.
            Whitespace words otherwise.
        paper_compat: reproduce the paper script's quirks (module docstring).

    Returns a JSON-ready dict:
        ``n`` texts averaged over; ``mean_length`` mean tokens over all texts (before the cutoff);
        ``rep_2``, ``rep_3``, ``rep_4``, ``diversity``, ``log_diversity``: means over the ``n`` texts, fractions;
        ``median_length`` (all texts); ``n_total``; ``n_dropped_cutoff`` (shorter than the cutoff);
        ``n_no_4gram`` (texts past the cutoff without a counted 4-gram: in the means with rep_n = 0 for the
        missing orders by default, left out with ``paper_compat``); ``n_empty`` (texts with no token);
        ``cutoff`` (the resolved int, or None); ``cutoff_auto``; ``tokenization``; ``paper_compat``.

    Raises TypeError for a non-list or a non-string item (naming its index), ValueError for an empty list, a bad
    cutoff, or when no text is left to average over (all shorter than the cutoff, or without a 4-gram in
    compat mode).
    """
    texts = _check_texts(texts)
    tokens, tokenization = _tokenize(texts, tokenizer)
    lengths = [len(t) for t in tokens]
    resolved = _resolve_cutoff(cutoff, lengths)

    kept = tokens if resolved is None else [t[:resolved] for t in tokens if len(t) >= resolved]
    n_dropped = len(tokens) - len(kept)
    per_text = [sequence_stats(t, paper_compat=paper_compat) for t in kept]
    n_no_4gram = sum(1 for t in kept if ngram_repetition(t, 4, skip_last=paper_compat) is None)
    rows = [row for row in per_text if row is not None]

    if n_dropped:
        logger.info(
            "text_stats: %d of %d texts are shorter than cutoff=%d tokens and left out",
            n_dropped,
            len(texts),
            resolved,
        )
    if paper_compat and n_no_4gram:
        logger.info("text_stats (paper_compat): %d texts have no counted 4-gram and are left out", n_no_4gram)
    if not rows:
        why = (
            f"all {len(texts)} texts are shorter than cutoff={resolved} tokens (longest: {max(lengths)})"
            if not kept
            else f"none of the {len(kept)} texts has more than 4 tokens, which paper_compat needs"
        )
        raise ValueError(f"text_stats: no text left to average over: {why}")

    keys = [f"rep_{n}" for n in NGRAM_ORDERS] + ["diversity", "log_diversity"]
    means = {k: math.fsum(row[k] for row in rows) / len(rows) for k in keys}
    return {
        "n": len(rows),
        "mean_length": math.fsum(lengths) / len(lengths),
        **means,
        "median_length": float(statistics.median(lengths)),
        "n_total": len(texts),
        "n_dropped_cutoff": n_dropped,
        "n_no_4gram": n_no_4gram,
        "n_empty": sum(1 for x in lengths if x == 0),
        "cutoff": resolved,
        "cutoff_auto": cutoff == "auto",
        "tokenization": tokenization,
        "paper_compat": paper_compat,
    }
