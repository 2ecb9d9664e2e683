"""memorization_scores: ROUGE-L and BLEU against values worked out by hand."""

from __future__ import annotations

import json

import pytest

from noisyft.eval.memorization import memorization_scores


def test_rouge_l_by_hand():
    # reference: the cat sat on the mat (6 tokens); prediction: a cat sat on mat (5 tokens)
    # longest common subsequence: cat sat on mat = 4 -> P = 4/5, R = 4/6, F = 2PR/(P+R) = (16/15)/(22/15) = 8/11
    out = memorization_scores(["A cat sat on mat."], ["The cat sat on the mat"])  # lower-cased, "." dropped
    item = out["items"][0]
    assert item["rougeL_p"] == pytest.approx(4 / 5)
    assert item["rougeL_r"] == pytest.approx(4 / 6)
    assert item["rougeL_f"] == pytest.approx(8 / 11)
    assert out["rougeL_f"] == pytest.approx(8 / 11)
    assert out["scale"] == "fraction" and out["rouge_use_stemmer"] is False


def test_bleu_identical_disjoint_and_by_hand():
    same = memorization_scores(["one two three four five"], ["one two three four five"])
    assert same["bleu_corpus"] == pytest.approx(1.0)
    assert same["bleu_sentence_mean"] == pytest.approx(1.0)
    assert same["rougeL_f"] == pytest.approx(1.0)
    disjoint = memorization_scores(["one two three four five"], ["six seven eight nine ten"])
    assert disjoint["bleu_corpus"] == 0.0
    assert disjoint["bleu_sentence_mean"] == pytest.approx(0.0, abs=1e-12)
    assert disjoint["rougeL_f"] == 0.0
    # a b c d e vs a b c d f: n-gram precisions 4/5, 3/4, 2/3, 1/2, equal lengths so no brevity penalty
    one_off = memorization_scores(["a b c d e"], ["a b c d f"])
    assert one_off["bleu_corpus"] == pytest.approx((4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)


def test_corpus_bleu_pools_counts_while_sentence_bleu_averages():
    preds = ["a b c d", "w x y z v"]
    refs = ["a b c d", "p q r s t"]
    out = memorization_scores(preds, refs)
    # pooled matches / pooled n-grams: 4/9, 3/7, 2/5, 1/3; lengths 9 = 9, so no brevity penalty
    assert out["bleu_corpus"] == pytest.approx((4 / 9 * 3 / 7 * 2 / 5 * 1 / 3) ** 0.25)
    assert out["bleu_sentence_mean"] == pytest.approx((1.0 + 0.0) / 2)
    assert [item["bleu"] for item in out["items"]] == pytest.approx([1.0, 0.0])
    assert "eff:no" in out["bleu_corpus_signature"] and "eff:yes" in out["bleu_sentence_signature"]


def test_empty_predictions_score_zero_and_are_counted():
    out = memorization_scores(["the cat sat", "", "   "], ["the cat sat", "a dog ran", "a bird flew"])
    assert (out["n"], out["n_empty"]) == (3, 2)
    assert [item["empty"] for item in out["items"]] == [False, True, True]
    assert [item["rougeL_f"] for item in out["items"]] == pytest.approx([1.0, 0.0, 0.0])
    assert out["rougeL_f"] == pytest.approx(1 / 3)  # means over all pairs, empty ones included
    assert out["bleu_sentence_mean"] == pytest.approx(1 / 3)
    json.dumps(out, allow_nan=False)


def test_stemming_option_and_non_latin_references():
    assert memorization_scores(["cats running"], ["cat run"])["rougeL_f"] == 0.0
    assert memorization_scores(["cats running"], ["cat run"], use_stemmer=True)["rougeL_f"] == pytest.approx(
        1.0
    )
    # rouge-score's tokenizer keeps only [a-z0-9]: a verbatim copy of Chinese text has ROUGE-L 0 (counted)
    out = memorization_scores(["你好 世界", "ok"], ["你好 世界", "ok"])
    assert out["n_reference_without_rouge_tokens"] == 1
    assert out["items"][0]["rougeL_f"] == 0.0
    assert out["items"][0]["bleu"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("preds", "refs", "error", "match"),
    [
        (["a", "b"], ["a", "b", "c"], ValueError, "got 2 predictions and 3 references"),
        ([], [], ValueError, "empty"),
        (["a", "b"], ["a", " "], ValueError, r"references\[1\] is empty"),
        (["a", None], ["a", "b"], TypeError, r"predictions\[1\] must be a string, got NoneType"),
        ("ab", ["a", "b"], TypeError, "predictions must be a list of strings"),
    ],
)
def test_bad_input_errors(preds, refs, error, match):
    with pytest.raises(error, match=match):
        memorization_scores(preds, refs)
