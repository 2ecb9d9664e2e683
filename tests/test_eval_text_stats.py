"""text_stats: repetition, diversity and log-diversity against values worked out by hand, in both modes."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from noisyft.eval.text_stats import auto_cutoff, ngram_repetition, sequence_stats, text_stats

from conftest import tiny_tokenizer

ABABA = "a b a b a"  # 2-grams ab ba ab ba; 3-grams aba bab aba; 4-grams abab baba
NO_REPEAT = "a b c d e f"  # every n-gram distinct


def test_ngram_repetition_counts_by_hand():
    t = ABABA.split()
    assert ngram_repetition(t, 2) == pytest.approx(1 - 2 / 4)  # {ab, ba} of 4
    assert ngram_repetition(t, 3) == pytest.approx(1 - 2 / 3)  # {aba, bab} of 3
    assert ngram_repetition(t, 4) == 0.0  # {abab, baba} of 2
    # the script's loop stops one n-gram early: ab ba ab | aba bab | abab
    assert ngram_repetition(t, 2, skip_last=True) == pytest.approx(1 - 2 / 3)
    assert ngram_repetition(t, 3, skip_last=True) == 0.0
    assert ngram_repetition(t, 4, skip_last=True) == 0.0
    assert ngram_repetition(t, 5) == 0.0  # one 5-gram
    assert ngram_repetition(t, 5, skip_last=True) is None  # ... which the script skips
    assert ngram_repetition(t, 6) is None


def test_default_mode_by_hand():
    out = text_stats([ABABA, NO_REPEAT])
    # ABABA: rep = (1/2, 1/3, 0), diversity = 1/2 * 2/3 * 1 = 1/3, log-div = -ln(2/3)
    # NO_REPEAT: rep = 0, diversity = 1, log-div = -ln(max(0, e^-20)) = 20
    assert out["n"] == 2
    assert out["mean_length"] == pytest.approx((5 + 6) / 2)
    assert out["rep_2"] == pytest.approx((1 / 2 + 0) / 2)
    assert out["rep_3"] == pytest.approx((1 / 3 + 0) / 2)
    assert out["rep_4"] == 0.0
    assert out["diversity"] == pytest.approx((1 / 3 + 1) / 2)
    assert out["log_diversity"] == pytest.approx((math.log(3 / 2) + 20) / 2)
    assert out["paper_compat"] is False and out["tokenization"] == "whitespace"
    json.dumps(out, allow_nan=False)  # results go to JSON files


def test_paper_compat_by_hand():
    out = text_stats([ABABA, NO_REPEAT], paper_compat=True)
    # ABABA, last n-gram skipped: rep_2 = 1 - 2/3 = 1/3 (ab ba ab), rep_3 = 0 (aba bab), rep_4 = 0 (abab)
    # diversity divides the fractions by 100 again: (1 - (1/3)/100) = 299/300; log-div = -ln(1/300) = ln 300
    assert out["n"] == 2
    assert out["rep_2"] == pytest.approx((1 / 3 + 0) / 2)
    assert out["rep_3"] == 0.0
    assert out["rep_4"] == 0.0
    assert out["diversity"] == pytest.approx((299 / 300 + 1) / 2)
    assert out["log_diversity"] == pytest.approx((math.log(300) + 20) / 2)
    assert out["mean_length"] == pytest.approx(5.5)


def test_paper_compat_skips_the_last_ngram():
    # the only repeated 2-gram is the last one ("a b" again)
    text = "a b c a b"
    assert text_stats([text])["rep_2"] == pytest.approx(1 - 3 / 4)  # ab bc ca ab
    assert text_stats([text], paper_compat=True)["rep_2"] == 0.0  # ab bc ca


def test_texts_without_a_4gram():
    texts = ["a b c", "a a a a a"]
    # "a a a a a": rep = 1 - 1/4, 1 - 1/3, 1 - 1/2 -> diversity = 1/4 * 1/3 * 1/2 = 1/24
    # default: "a b c" keeps rep_n = 0 (rep_4 has no 4-gram), diversity 1, log-div 20
    out = text_stats(texts)
    assert (out["n"], out["n_no_4gram"]) == (2, 1)
    assert out["rep_2"] == pytest.approx(3 / 4 / 2)
    assert out["rep_4"] == pytest.approx(1 / 2 / 2)
    assert out["diversity"] == pytest.approx((1 + 1 / 24) / 2)
    assert out["log_diversity"] == pytest.approx((20 - math.log(23 / 24)) / 2)
    # compat: "a b c" has no counted 4-gram -> the script divides by zero -> NaN -> left out of the mean.
    # "a a a a a", counting T - n n-grams: rep = 1 - 1/3, 1 - 1/2, 1 - 1/1
    compat = text_stats(texts, paper_compat=True)
    assert (compat["n"], compat["n_no_4gram"], compat["n_total"]) == (1, 1, 2)
    assert compat["rep_2"] == pytest.approx(2 / 3)
    assert compat["rep_3"] == pytest.approx(1 / 2)
    assert compat["rep_4"] == 0.0
    assert compat["diversity"] == pytest.approx((1 - 2 / 300) * (1 - 1 / 200))
    assert compat["mean_length"] == pytest.approx(4.0)  # over all texts, excluded ones too
    # a 4-token text has one 4-gram by default but none in compat mode
    assert text_stats(["a b c d"])["n_no_4gram"] == 0
    with pytest.raises(ValueError, match="more than 4 tokens"):
        text_stats(["a b c d"], paper_compat=True)


def test_empty_strings_are_counted_not_dropped():
    out = text_stats(["", "  ", ABABA])
    # empty texts: 0 tokens, nothing repeats -> diversity 1, log-div 20
    assert (out["n"], out["n_empty"]) == (3, 2)
    assert out["mean_length"] == pytest.approx(5 / 3)
    assert out["rep_2"] == pytest.approx(1 / 2 / 3)
    assert out["log_diversity"] == pytest.approx((20 + 20 + math.log(3 / 2)) / 3)


def test_cutoff_drops_short_texts_and_truncates_the_rest():
    texts = ["a b a b", "a b", "c d c d e f g"]
    out = text_stats(texts, cutoff=4)
    # "a b" is dropped; "c d c d e f g" is cut to "c d c d", which scores like "a b a b":
    # rep_2 = 1 - 2/3 (ab ba ab), rep_3 = 0 (aba bab), rep_4 = 0; uncut it would have rep_2 = 1 - 5/6
    assert (out["n"], out["n_dropped_cutoff"], out["cutoff"], out["cutoff_auto"]) == (2, 1, 4, False)
    assert out["rep_2"] == pytest.approx(1 / 3)
    assert out["rep_3"] == 0.0
    assert out["diversity"] == pytest.approx(2 / 3)
    assert out["mean_length"] == pytest.approx((4 + 2 + 7) / 3)  # before the cutoff
    with pytest.raises(ValueError, match=r"all 3 texts are shorter than cutoff=8 tokens \(longest: 7\)"):
        text_stats(texts, cutoff=8)


def test_auto_cutoff_by_hand_and_brute_force():
    assert auto_cutoff([1, 2, 3, 4]) == 3  # 3 and 4: half of the texts are >= 3
    assert auto_cutoff([5, 1, 3]) == 3  # the median for odd N
    assert auto_cutoff([7]) == 7
    rng = random.Random(0)
    for _ in range(200):
        lengths = [rng.randint(1, 12) for _ in range(rng.randint(1, 9))]
        best = max(c for c in range(1, 13) if sum(x >= c for x in lengths) >= len(lengths) / 2)
        assert auto_cutoff(lengths) == best, lengths
    with pytest.raises(ValueError, match="resolves to 0 tokens: 2 of 3 texts are empty"):
        auto_cutoff([0, 0, 4])

    out = text_stats(["a b a b a b", "a b", "x y z w"], cutoff="auto")  # lengths 6, 2, 4 -> cutoff 4
    assert (out["cutoff"], out["cutoff_auto"], out["n"], out["n_dropped_cutoff"]) == (4, True, 2, 1)
    # "a b a b" (cut) rep_2 = 1/3; "x y z w" rep_2 = 0
    assert out["rep_2"] == pytest.approx(1 / 6)


def _script_reference(token_lists):
    """The paper script's semantics restated independently: per text, `while end < len` n-gram loop, repetition
    as a fraction, `/ 100` inside the diversity product, a NaN row when an order has no n-gram, NaN-skipping
    mean."""
    rows = []
    for tokens in token_lists:
        row = []
        for n in (2, 3, 4):
            grams, start, end = [], 0, n
            while end < len(tokens):
                grams.append(" ".join(tokens[start:end]))
                start, end = start + 1, end + 1
            row.append(1 - len(set(grams)) / len(grams) if grams else float("nan"))
        if any(math.isnan(r) for r in row):  # the script's ZeroDivisionError: the whole row becomes NaN
            rows.append([float("nan")] * 5)
            continue
        div = (1 - row[0] / 100) * (1 - row[1] / 100) * (1 - row[2] / 100)
        rows.append([*row, div, -math.log(max(1 - div, math.exp(-20)))])
    return np.nanmean(np.array(rows), axis=0)


def test_paper_compat_matches_the_script_semantics_on_random_texts():
    rng = random.Random(1)
    for _ in range(20):
        texts = [" ".join(rng.choice("abc") for _ in range(rng.randint(0, 15))) for _ in range(8)]
        if all(len(t.split()) <= 4 for t in texts):
            continue
        out = text_stats(texts, paper_compat=True)
        ref = _script_reference([t.split() for t in texts])
        got = [out[k] for k in ("rep_2", "rep_3", "rep_4", "diversity", "log_diversity")]
        np.testing.assert_allclose(got, ref, rtol=1e-12, atol=1e-12)
        assert out["n"] == sum(len(t.split()) > 4 for t in texts)


def test_tokenizer_tokens_without_special_tokens():
    from tokenizers.processors import TemplateProcessing

    tok = tiny_tokenizer()
    # make the tokenizer add <s> by default, so that leaving special tokens out is observable
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok("hello world")["input_ids"][0] == tok.bos_token_id
    # unknown words all map to <unk>: "foo bar baz qux" is 4 distinct words but 4 equal tokens
    texts = ["foo bar baz qux", "hello world hello"]
    out = text_stats(texts, tokenizer=tok)
    # token ids: (unk unk unk unk) rep = (1 - 1/3, 1 - 1/2, 0); (hello world hello) rep = (0, 0, 0)
    assert out["mean_length"] == pytest.approx((4 + 3) / 2)  # no <s> counted
    assert out["rep_2"] == pytest.approx(2 / 3 / 2)
    assert out["rep_3"] == pytest.approx(1 / 2 / 2)
    assert out["tokenization"].startswith("tokenizer:")
    assert text_stats(texts)["rep_2"] == 0.0  # whitespace words do not repeat


def test_sequence_stats_cap_and_compat_none():
    assert sequence_stats(list("abcdefg"))["log_diversity"] == 20.0
    assert sequence_stats(list("abcd"), paper_compat=True) is None
    assert sequence_stats(list("abcd"))["diversity"] == 1.0


@pytest.mark.parametrize(
    ("texts", "kwargs", "error", "match"),
    [
        ([], {}, ValueError, "texts is empty"),
        ("a b c", {}, TypeError, "list of strings, got str"),
        (["a b", 3], {}, TypeError, r"texts\[1\] must be a string, got int"),
        (["a b"], {"cutoff": 0}, ValueError, "positive int, got 0"),
        (["a b"], {"cutoff": True}, ValueError, "positive int, got True"),
        (["a b"], {"cutoff": "median"}, ValueError, "got 'median'"),
        (["", "", "a"], {"cutoff": "auto"}, ValueError, "resolves to 0 tokens"),
    ],
)
def test_bad_input_errors(texts, kwargs, error, match):
    with pytest.raises(error, match=match):
        text_stats(texts, **kwargs)
