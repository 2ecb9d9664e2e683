"""`noisyft eval` end to end on a tiny model: every analysis writes its files, the report renders from them."""

from __future__ import annotations

import json

import pytest

from noisyft.cli import main

from conftest import tiny_llama, tiny_tokenizer


@pytest.fixture
def tiny_eval_inputs(tmp_path):
    model_dir = tmp_path / "tinymodel"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": f"write hello w{i}", "input": "", "output": "hello world w1 w2"})
            + "\n"
            for i in range(6)
        )
    )
    gsm = tmp_path / "gsm.jsonl"
    gsm.write_text(
        "".join(
            json.dumps({"question": f"w{i} w2 w3", "answer": f"w4 w5\n#### {i}"}) + "\n" for i in range(3)
        )
    )
    return model_dir, data, gsm


@pytest.mark.slow
def test_eval_run_all_analyses_then_report(tiny_eval_inputs, tmp_path, capsys):
    model_dir, data, gsm = tiny_eval_inputs
    out = tmp_path / "eval"
    argv = ["eval", "run", str(model_dir), "--train-data", str(data), "--train-max-examples", "4"]
    argv += ["--heldout", f"{data},gsm8k:{gsm}", "--prompts-data", str(data), "--num-prompts", "3"]
    argv += [
        "--max-new-tokens",
        "6",
        "--min-new-tokens",
        "8",
        "--gsm8k-limit",
        "2",
        "--gsm8k-max-new-tokens",
        "6",
    ]
    argv += [
        "--analyses",
        "all",
        "--curvature-mc-samples",
        "2",
        "--curvature-hutchinson-samples",
        "2",
        "--curvature-fisher-samples",
        "2",
        "--curvature-alphas",
        "1,5",
        "--output-dir",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "loss/train" in printed

    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["files"]) == {"loss", "memorization", "lengths", "ablations", "gsm8k", "curvature"}
    loss = json.loads((out / "loss.json").read_text())
    assert set(loss) == {"train", str(data), f"gsm8k:{gsm}"}
    assert loss["train"]["n_examples"] == 4 and loss["train"]["loss"] > 0
    mem = json.loads((out / "memorization.json").read_text())
    assert mem["n_prompts"] == 3 and 0 <= mem["scores"]["rougeL_f"] <= 1 and mem["shuffled_baseline"]
    lines = (out / "generations" / "train_prompts.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first = json.loads(lines[0])
    assert first["decoding"]["do_sample"] is False and first["reference"] == "hello world w1 w2"
    abl = json.loads((out / "ablations.json").read_text())
    assert abl["eos_blocked"]["decoding"]["min_new_tokens"] == 8
    assert abl["eos_blocked"]["finish_reasons"].get("eos", 0) == 0  # 6 < 8 tokens: EOS can never come
    curv = json.loads((out / "curvature.json").read_text())
    assert [row["alpha"] for row in curv["table"]] == [1.0, 5.0]
    assert json.loads((out / "gsm8k.json").read_text())["n"] == 2

    # a second run into the same folder is refused, with a one-line error
    assert main(argv) == 1
    assert "already holds results" in capsys.readouterr().err

    # report from files alone
    report = tmp_path / "report.md"
    assert main(["eval", "report", str(out), str(out), "--output", str(report)]) == 0
    table = report.read_text()
    assert "| loss train |" in table.replace("run | ", "") or "loss train" in table
    assert table.count(str(out)) == 2 and "ROUGE-L" in table


def test_eval_bad_settings_fail_cleanly(tmp_path, capsys):
    assert main(["eval", "run", "--analyses", "loss,vibes"]) == 2
    assert "vibes" in capsys.readouterr().err
    assert main(["eval", "run", "--max-new-tokens", "0"]) == 2
    assert main(["eval", "report", str(tmp_path)]) == 1
    assert "summary.json" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_promts: 3\n")
    assert main(["eval", "run", "--config", str(bad)]) == 2
    assert "num_prompts" in capsys.readouterr().err  # the suggestion


@pytest.mark.slow
def test_eval_judge_cli_with_a_local_judge(tiny_eval_inputs, tmp_path, capsys):
    model_dir, _, _ = tiny_eval_inputs
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"prompt": f"w{i}", "response": "hello"}) + "\n" for i in range(2)))
    b.write_text("".join(json.dumps({"prompt": f"w{i}", "response": "world"}) + "\n" for i in range(2)))
    out = tmp_path / "judge"
    code = main(
        [
            "eval",
            "judge",
            str(a),
            str(b),
            "--judge-model",
            str(model_dir),
            "--judge.backend",
            "hf",
            "--output-dir",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
        ]
    )
    # a random tiny model cannot answer "Output (a)/(b)": no pair is judged, which is a failure (exit 1) after
    # the results are written and shown
    assert code == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n_pairs"] == 2 and summary["requests"]["total"] == 4  # both orders
    assert summary["counts"].get("win", 0) == 0
    captured = capsys.readouterr()
    assert "win_rate" in captured.out and "could not judge any of the 2 pairs" in captured.err


def test_eval_of_a_run_uses_all_its_records_and_overwrite_replaces_results_whole(tiny_eval_inputs, tmp_path):
    """A run trained with max_examples none is evaluated on every record (not the default 48 / a subset), and
    `--overwrite` leaves nothing of the previous results (no stale ablations beside fresh ones)."""
    model_dir, data, _ = tiny_eval_inputs
    run = tmp_path / "run"
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(run)]
    assert main([*argv, "--max-steps", "1", "--eval-data", "none", "--max-examples", "none"]) == 0
    # a record the run's settings must pick up as training data: max_examples None means all 7
    with data.open("a") as f:
        f.write(json.dumps({"instruction": "w9 w8", "input": "", "output": "w7"}) + "\n")
    from noisyft.eval.config import EvalConfig
    from noisyft.eval.recipe import resolve_target

    info = resolve_target(EvalConfig(target=str(run)))
    assert info["train_max_examples"] is None and info["train_data"] == str(data)

    ev = ["eval", "run", str(run), "--analyses", "loss", "--heldout", "none"]
    assert main(ev) == 0
    loss = json.loads((run / "eval" / "loss.json").read_text())
    assert loss["train"]["n_examples"] == 7
    (run / "eval" / "ablations.json").write_text("{}")  # a stale file from an earlier evaluation
    assert main(ev) == 1  # results exist: refused without --overwrite
    assert main([*ev, "--overwrite"]) == 0
    assert not (run / "eval" / "ablations.json").exists()
