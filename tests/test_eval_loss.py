"""noisyft.eval.loss: noise-free response-only loss, checked against a per-example hand computation."""

from __future__ import annotations

import json
import math

import datasets
import pytest
import torch

from noisyft.eval.loss import gsm8k_sft_dataset, loss_report, noise_free_loss
from noisyft.methods.neftune.config import NEFTuneConfig
from noisyft.methods.neftune.noise import NEFTuneHook

from conftest import tiny_llama, tiny_tokenizer

# Three examples of different lengths; the first has a response token at position 0 (never predicted).
IDS = [
    [5, 17, 30, 41, 8, 9, 2],
    [5, 17, 22, 60, 61, 62, 63, 70, 71, 2, 44],
    [7, 12, 13, 2],
]
MASKS = [
    [1, 0, 0, 1, 1, 1, 1],
    [0, 0, 0, 0, 1, 1, 1, 0, 1, 1, 0],
    [0, 0, 1, 1],
]


def _dataset(ids=IDS, masks=MASKS) -> datasets.Dataset:
    return datasets.Dataset.from_dict({"input_ids": ids, "assistant_masks": masks})


def _reference(model, ids, masks) -> list[tuple[float, int]]:
    """(sum of NLL, predicted tokens) per example, each run alone (no padding), by log_softmax + gather."""
    out = []
    with torch.no_grad():
        for x, m in zip(ids, masks, strict=True):
            logits = model(input_ids=torch.tensor([x])).logits[0].double()  # (T, V)
            logp = torch.log_softmax(logits, dim=-1)  # (T, V)
            nll, n = 0.0, 0
            for t in range(1, len(x)):
                if m[t]:
                    nll -= float(logp[t - 1, x[t]])
                    n += 1
            out.append((nll, n))
    return out


@pytest.fixture
def model():
    return tiny_llama().eval()


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_loss_matches_hand_computed_cross_entropy(model, batch_size):
    ref = _reference(model, IDS, MASKS)
    assert [n for _, n in ref] == [4, 5, 2]  # position 0 of example 0 is not predicted
    result = noise_free_loss(model, _dataset(), batch_size=batch_size, pad_token_id=0)
    total_nll = sum(nll for nll, _ in ref)
    assert result["n_tokens"] == 11
    assert result["n_examples"] == 3
    assert result["loss"] == pytest.approx(total_nll / 11, rel=1e-5)
    per_example = [nll / n for nll, n in ref]
    assert result["loss_per_example"] == pytest.approx(sum(per_example) / 3, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total_nll / 11), rel=1e-5)
    for i, ex in enumerate(result["examples"]):
        assert ex["index"] == i
        assert ex["n_tokens"] == ref[i][1]
        assert ex["loss"] == pytest.approx(per_example[i], rel=1e-5)
    # a random model over 96 tokens sits near ln(96)
    assert abs(result["loss"] - math.log(96)) < 0.5


def test_pad_token_value_does_not_matter(model):
    a = noise_free_loss(model, _dataset(), batch_size=3, pad_token_id=0)
    b = noise_free_loss(model, _dataset(), batch_size=3, pad_token_id=77)
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)


def test_eval_mode_is_noise_free_and_training_mode_restored(model):
    clean = noise_free_loss(model, _dataset(), batch_size=2, pad_token_id=0)
    hook = NEFTuneHook(NEFTuneConfig(alpha=1e4)).attach(model)
    try:
        # the hook does act in a training forward pass (so the check below can fail) ...
        x = torch.tensor([IDS[0]])
        model.train()
        noisy_logits = model(input_ids=x).logits
        model.eval()
        with torch.no_grad():
            clean_logits = model(input_ids=x).logits
        assert not torch.allclose(noisy_logits, clean_logits, atol=1e-3)
        # ... but not in noise_free_loss, even when the model is handed over in training mode
        model.train()
        noised = noise_free_loss(model, _dataset(), batch_size=2, pad_token_id=0)
        assert model.training  # mode restored
        assert hook.calls == 1  # only the explicit training forward above was noised
    finally:
        hook.detach()
    assert noised["loss"] == pytest.approx(clean["loss"], rel=1e-6)


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


GSM = [
    {"question": "w1 w2 w3 w4", "answer": "w5 w6 w7 #### 18"},
    {"question": "w8 w9", "answer": "w10 w11 w12 w13 w14 #### 3"},
    {"question": "w15 w16 w17", "answer": "w18 #### 1,000"},
]


def test_gsm8k_set_from_a_jsonl_file(model, tmp_path):
    tok = tiny_tokenizer()
    gsm = _write_jsonl(tmp_path / "gsm.jsonl", GSM)
    train = _write_jsonl(
        tmp_path / "train.jsonl",
        [{"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world w1"}]}],
    )
    report = loss_report(model, tok, {"train": str(train), "gsm8k": f"gsm8k:{gsm}"}, batch_size=2)
    assert list(report) == ["train", "gsm8k"]
    g = report["gsm8k"]
    assert g["data"]["n_examples"] == 3 and g["data"]["n_bad"] == 0
    assert g["data"]["source"] == f"gsm8k:{gsm}"
    # question -> worked answer: the response tokens are the answer's words (plus the template's closing </s>)
    ds, _ = gsm8k_sft_dataset(tok, path=str(gsm))
    for row, rec in zip(ds, GSM, strict=True):
        kept = [t for t, m in zip(row["input_ids"], row["assistant_masks"], strict=True) if m]
        answer = tok(rec["answer"], add_special_tokens=False)["input_ids"]
        assert kept[: len(answer)] == answer
        assert tok.convert_tokens_to_ids(rec["question"].split()[0]) not in kept
    # the loss is the hand-computed one on that dataset
    ref = _reference(model, ds["input_ids"], ds["assistant_masks"])
    assert g["loss"] == pytest.approx(sum(a for a, _ in ref) / sum(n for _, n in ref), rel=1e-5)
    assert g["n_tokens"] == sum(n for _, n in ref) == g["data"]["n_response_tokens"]
    assert report["train"]["n_examples"] == 1
    json.dumps(report)  # serializable as is
    # max_examples limits every set
    limited = loss_report(model, tok, {"gsm8k": f"gsm8k:{gsm}"}, max_examples=2)
    assert limited["gsm8k"]["n_examples"] == 2


def test_bad_records_are_reported_not_dropped(model, tmp_path):
    tok = tiny_tokenizer()
    good = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]}
    bad = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": 3}]}
    path = _write_jsonl(tmp_path / "mixed.jsonl", [good, bad, good])
    with pytest.raises(ValueError, match=r"mixed\.jsonl: record 2 \(line 2\)"):
        loss_report(model, tok, {"x": str(path)})
    report = loss_report(model, tok, {"x": str(path)}, skip_bad_records=True)
    assert report["x"]["data"]["n_bad"] == 1 and report["x"]["n_examples"] == 2
    gsm = _write_jsonl(tmp_path / "gsm.jsonl", [GSM[0], {"question": "w1", "answer": "no number"}])
    with pytest.raises(ValueError, match=r"gsm\.jsonl: line 2: field 'answer'"):
        loss_report(model, tok, {"g": f"gsm8k:{gsm}"})


def test_empty_sets_give_clear_errors(model, tmp_path):
    with pytest.raises(ValueError, match="dataset is empty"):
        noise_free_loss(model, _dataset([], []), pad_token_id=0)
    with pytest.raises(ValueError, match="nothing to predict"):
        noise_free_loss(model, _dataset([[5, 6, 7]], [[1, 0, 0]]), pad_token_id=0)
    with pytest.raises(ValueError, match="assistant_masks"):
        noise_free_loss(model, datasets.Dataset.from_dict({"input_ids": [[1, 2]]}), pad_token_id=0)
    tok = tiny_tokenizer()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(ValueError, match=r"no usable records in .*empty\.jsonl"):
        loss_report(model, tok, {"e": str(empty)})
    with pytest.raises(ValueError, match=r"empty\.jsonl: no GSM8K record"):
        loss_report(model, tok, {"e": f"gsm8k:{empty}"})
    with pytest.raises(ValueError, match="at least one data set"):
        loss_report(model, tok, {})
