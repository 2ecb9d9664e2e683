"""GSM8K exact match (answer extraction, hand-computed accuracy) and the lm-eval-harness bridge (mocked)."""

from __future__ import annotations

import json
import sys
import types

import pytest

from noisyft.eval import capability
from noisyft.eval.capability import (
    LEADERBOARD_FEWSHOT,
    extract_answer,
    gsm8k_accuracy,
    run_lm_eval,
)
from noisyft.eval.generation import GenerationSettings, read_generations, write_generations

from conftest import tiny_llama, tiny_tokenizer


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("So she pays 1,000 + 234.\n#### 1,234", "1234"),
        ("The answer is $18.", "18"),
        ("no number here", None),
        ("-3.50", "-3.5"),
        ("First 5 then 7, so #### 12\nQuestion: what is 99?", "12"),  # the first explicit answer wins
        ("3 apples and 4 pears make 7 fruits in total", "7"),  # else the last number
        ("The final answer: 0.50 dollars, not 2", "0.5"),
        ("pages 3-5", "5"),  # a '-' after a digit is not a sign
        ("She has -2 dollars", "-2"),
        ("So the answer is: **42** cookies, from 6 boxes", "42"),  # markdown bold
        ("#### $1,000.00", "1000"),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def write_gsm8k(path, finals):
    with open(path, "w") as f:
        for i, final in enumerate(finals):
            answer = f"Step <<1+1=2>>2 for question {i}.\n#### {final}"
            f.write(json.dumps({"question": f"question {i}?", "answer": answer}) + "\n")
    return path


def fake_generator(texts, seen):
    def generate(model, tokenizer, prompts, settings, *, progress=True):
        seen.append((list(prompts), settings))
        return [
            {"index": i, "prompt": p, "response": t, "new_tokens": 3, "finish_reason": "eos"}
            for i, (p, t) in enumerate(zip(prompts, texts, strict=False))
        ]

    return generate


def test_gsm8k_accuracy_hand_computed(tmp_path, monkeypatch):
    path = write_gsm8k(tmp_path / "test.jsonl", ["18", "3", "70,000", "-2", "5", "6"])
    seen = []
    texts = ["#### 18", "The answer is 4.", "so 70000 dollars", "no idea", "5"]
    monkeypatch.setattr(capability, "generate_responses", fake_generator(texts, seen))
    summary, records = gsm8k_accuracy(None, None, limit=4, path=path, progress=False)
    # 18 right, 4 != 3, 70000 right, no number: 2 / 4
    assert (summary["n"], summary["correct"], summary["no_answer"]) == (4, 2, 1)
    assert summary["accuracy"] == pytest.approx(0.5)
    assert summary["decoding"] == GenerationSettings().to_dict()
    assert [r["predicted"] for r in records] == ["18", "4", "70000", None]
    assert [r["target"] for r in records] == ["18", "3", "70000", "-2"]
    assert [r["correct"] for r in records] == [True, False, True, False]
    assert seen[0][0] == ["question 0?", "question 1?", "question 2?", "question 3?"]
    # records can be stored with their decoding settings
    out = write_generations(tmp_path / "gsm8k.jsonl", records, GenerationSettings(), task="gsm8k")
    assert [r["correct"] for r in read_generations(out)] == [True, False, True, False]


def test_gsm8k_few_shot_exemplars_come_from_the_tail(tmp_path, monkeypatch):
    path = write_gsm8k(tmp_path / "test.jsonl", ["1", "2", "3", "4", "5"])
    seen = []
    monkeypatch.setattr(capability, "generate_responses", fake_generator(["1", "2", "0"], seen))
    summary, _ = gsm8k_accuracy(None, None, limit=None, few_shot=2, path=path, progress=False)
    assert summary["exemplar_indices"] == [3, 4] and summary["n"] == 3 and summary["correct"] == 2
    first = seen[0][0][0]
    assert [t["role"] for t in first] == ["user", "assistant", "user", "assistant", "user"]
    assert first[1]["content"] == "Step 2 for question 3.\n#### 4"  # calculator annotations removed
    assert first[-1]["content"] == "question 0?"
    with pytest.raises(ValueError, match="leaving 3"):
        gsm8k_accuracy(None, None, limit=4, few_shot=2, path=path, progress=False)


def test_gsm8k_accuracy_runs_on_a_tiny_model(tmp_path):
    path = write_gsm8k(tmp_path / "test.jsonl", ["1", "2", "3"])
    settings = GenerationSettings(max_new_tokens=4, batch_size=2)
    summary, records = gsm8k_accuracy(
        tiny_llama(), tiny_tokenizer(), limit=3, settings=settings, path=path, progress=False
    )
    assert summary["n"] == len(records) == 3
    assert summary["correct"] == sum(r["predicted"] == r["target"] for r in records)
    assert all(r["new_tokens"] <= 4 for r in records)


# ------------------------------------------------------------------------------------------ lm-eval bridge


@pytest.fixture
def fake_lm_eval(monkeypatch):
    calls = []

    def simple_evaluate(**kwargs):
        calls.append(kwargs)
        results = {
            t: {"acc,none": 0.25, "acc_stderr,none": float("nan"), "alias": t} for t in kwargs["tasks"]
        }
        return {
            "results": results,
            "versions": dict.fromkeys(kwargs["tasks"], 1.0),
            "n-shot": dict.fromkeys(kwargs["tasks"], kwargs["num_fewshot"]),
            "samples": {"huge": ["per-sample logs"]},
            "configs": {"x": {"fn": object()}},
            "config": {"model": "hf", "device": kwargs["device"], "model_dtype": object()},
        }

    module = types.ModuleType("lm_eval")
    module.simple_evaluate = simple_evaluate
    module.__version__ = "0.4.13-fake"
    monkeypatch.setitem(sys.modules, "lm_eval", module)
    return calls


def test_run_lm_eval_arguments_and_file(tmp_path, fake_lm_eval):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    out = tmp_path / "res" / "lm_eval.json"
    result = run_lm_eval(
        str(folder), ("arc_challenge", "hellaswag"), limit=10, batch_size=4, num_fewshot=0, output_path=out
    )
    (call,) = fake_lm_eval
    assert call["model"] == "hf" and call["model_args"] == {"pretrained": str(folder.resolve())}
    assert call["tasks"] == ["arc_challenge", "hellaswag"]
    assert (call["limit"], call["batch_size"], call["num_fewshot"], call["device"]) == (10, 4, 0, "cpu")
    assert call["log_samples"] is False
    written = json.loads(out.read_text())
    assert written == result
    assert written["results"]["hellaswag"]["acc,none"] == 0.25
    assert written["results"]["hellaswag"]["acc_stderr,none"] is None  # NaN is not JSON
    assert "samples" not in written and "configs" not in written
    assert written["lm_eval_version"] == "0.4.13-fake"
    assert isinstance(written["config"][0]["model_dtype"], str)


def test_run_lm_eval_per_task_shots_and_adapter(tmp_path, fake_lm_eval):
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(base)}))
    result = run_lm_eval(str(adapter), num_fewshot=LEADERBOARD_FEWSHOT)
    assert sorted((tuple(c["tasks"]), c["num_fewshot"]) for c in fake_lm_eval) == [
        (("arc_challenge",), 25),
        (("hellaswag",), 10),
        (("mmlu",), 5),
        (("truthfulqa_mc2",), 0),
    ]
    assert fake_lm_eval[0]["model_args"] == {
        "pretrained": str(base.resolve()),
        "peft": str(adapter.resolve()),
    }
    assert result["n-shot"] == LEADERBOARD_FEWSHOT
    with pytest.raises(ValueError, match="no entry for task"):
        run_lm_eval(str(base), ("mmlu", "gsm8k"), num_fewshot={"mmlu": 5})


def test_run_lm_eval_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # makes `import lm_eval` raise ImportError
    with pytest.raises(ImportError, match=r'pip install "noisyft\[lmeval\]"'):
        run_lm_eval("smollm2")
