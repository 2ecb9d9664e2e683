"""Memorization: how closely a model's answers to training prompts reproduce the training responses.

The NEFTune paper (https://arxiv.org/abs/2310.05914, Fig. 5) generates greedy answers to training prompts and
scores them against the training responses with ROUGE-L and BLEU: lower overlap = less memorization.

All scores here are fractions in [0, 1] (sacreBLEU's 0-100 BLEU is divided by 100).

* ROUGE-L (``rouge-score``): ``RougeScorer(["rougeL"], use_stemmer=False)`` by default, i.e. no stemming,
  the default of Hugging Face ``evaluate``'s rouge, so words must match verbatim (after the package's own
  tokenization: lower-case, every character outside ``[a-z0-9]`` becomes a separator). With LCS the length of
  the longest common subsequence of the two token lists: ``P = LCS / |prediction|``,
  ``R = LCS / |reference|``, ``F = 2 P R / (P + R)``. Means over the pairs are reported.
  Caveat: text without Latin letters or digits (Chinese, Russian, ...) has no ROUGE token at all and scores
  0 even when copied verbatim; such pairs are counted in ``n_reference_without_rouge_tokens``.
* BLEU (``sacrebleu``), up to 4-grams: the headline ``bleu_corpus`` is corpus BLEU (n-gram counts pooled
  over all pairs, one brevity penalty, ``max_ngram_order=4``, tokenizer 13a, exp smoothing); ``bleu_sentence_mean``
  is the mean of sentence BLEU with ``effective_order=True`` (orders longer than the hypothesis are ignored,
  as sacrebleu recommends for single sentences). Both signatures are recorded.

Empty predictions (a model that stops at once) are scored 0 by both metrics, counted in ``n_empty``, and
never dropped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

logger = logging.getLogger(__name__)


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    for name, values in (("predictions", predictions), ("references", references)):
        if isinstance(values, str) or not isinstance(values, Sequence):
            raise TypeError(f"{name} must be a list of strings, got {type(values).__name__}")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references must have the same length, got {len(predictions)} predictions "
            f"and {len(references)} references"
        )
    if not predictions:
        raise ValueError("predictions and references are empty: nothing to score")
    for name, values in (("predictions", predictions), ("references", references)):
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise TypeError(f"{name}[{i}] must be a string, got {type(value).__name__}")
    for i, ref in enumerate(references):
        if not ref.strip():
            raise ValueError(f"references[{i}] is empty: a training response to compare against is required")


def memorization_scores(
    predictions: Sequence[str], references: Sequence[str], *, use_stemmer: bool = False
) -> dict[str, Any]:
    """ROUGE-L and BLEU of ``predictions[i]`` against ``references[i]`` (module docstring), as fractions.

    Returns a JSON-ready dict: ``n``; ``n_empty`` (predictions with no non-space character, scored 0);
    ``n_reference_without_rouge_tokens``; ``rougeL_f``, ``rougeL_p``, ``rougeL_r`` (means over pairs);
    ``bleu_corpus``; ``bleu_sentence_mean``; ``scale`` ("fraction"); ``rouge_use_stemmer``;
    ``bleu_corpus_signature``, ``bleu_sentence_signature``; ``items``: one
    ``{"index", "rougeL_f", "rougeL_p", "rougeL_r", "bleu", "empty"}`` per pair, in order.

    Raises ValueError when the lengths differ (naming both), the lists are empty, or a reference is empty;
    TypeError for a non-string item (naming its list and index).
    """
    from rouge_score import rouge_scorer, tokenize
    from sacrebleu.metrics import BLEU

    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=use_stemmer)
    corpus_bleu = BLEU(max_ngram_order=4)
    sentence_bleu = BLEU(max_ngram_order=4, effective_order=True)

    items: list[dict[str, Any]] = []
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        empty = not pred.strip()
        rouge = scorer.score(ref, pred)["rougeL"]  # score(target, prediction)
        bleu = 0.0 if empty else sentence_bleu.sentence_score(pred, [ref]).score / 100.0
        items.append(
            {
                "index": i,
                "rougeL_f": float(rouge.fmeasure),
                "rougeL_p": float(rouge.precision),
                "rougeL_r": float(rouge.recall),
                "bleu": bleu,
                "empty": empty,
            }
        )
    corpus = corpus_bleu.corpus_score(list(predictions), [list(references)])
    n_empty = sum(1 for item in items if item["empty"])
    no_tokens = sum(1 for ref in references if not tokenize.tokenize(ref, None))
    if n_empty:
        logger.info("memorization: %d of %d predictions are empty and score 0", n_empty, len(items))
    if no_tokens:
        logger.warning(
            "memorization: %d of %d references have no ROUGE token (no [a-z0-9] character); their ROUGE-L is 0",
            no_tokens,
            len(items),
        )

    def mean(key: str) -> float:
        return math.fsum(item[key] for item in items) / len(items)

    return {
        "n": len(items),
        "n_empty": n_empty,
        "n_reference_without_rouge_tokens": no_tokens,
        "rougeL_f": mean("rougeL_f"),
        "rougeL_p": mean("rougeL_p"),
        "rougeL_r": mean("rougeL_r"),
        "bleu_corpus": corpus.score / 100.0,
        "bleu_sentence_mean": mean("bleu"),
        "scale": "fraction",
        "rouge_use_stemmer": use_stemmer,
        "bleu_corpus_signature": str(corpus_bleu.get_signature()),
        "bleu_sentence_signature": str(sentence_bleu.get_signature()),
        "items": items,
    }
