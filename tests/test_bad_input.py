"""A table of user mistakes, each run through the real command: non-zero exit, one line naming the problem, no
traceback, nothing half-written. Cases are the ones found by trying noisyft as a new user would (issue 12)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import tiny_llama, tiny_tokenizer


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad-input")
    model_dir = root / "tinymodel"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = root / "data.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": f"write hello w{i}", "input": "", "output": "hello world w1 w2"})
            + "\n"
            for i in range(16)
        )
    )
    return root, model_dir, data


def _cli(*argv, env=None):
    return subprocess.run(
        [sys.executable, "-m", "noisyft.cli", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def _train(inputs, out, *extra, data=None):
    _, model_dir, default_data = inputs
    return _cli(
        "train",
        "--model",
        model_dir,
        "--data",
        data or default_data,
        "--output-dir",
        out,
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "4",
        "--eval-data",
        "none",
        "--logging-steps",
        "1",
        *extra,
    )


def _one_line_error(proc, *needles):
    assert proc.returncode != 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert errors, proc.stderr[-2000:]
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr[-2000:])


def _nothing_written(out):
    assert not (out / "model").exists() and not (out / "metrics.json").exists()
    assert not list(out.parent.glob(f".{out.name}.*"))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


GOOD = b'{"instruction": "write hello", "input": "", "output": "hello world"}'

# name -> (extra flags, data file bytes or None, expected text in the error)
CASES = {
    "nan alpha": (["--neftune.alpha", "nan"], None, "NEFTune alpha must be a finite number"),
    "inf fisher coef": (["--method", "fisher", "--fisher.coef", "inf"], None, "Fisher coef must be a finite"),
    "nan learning rate": (["--learning-rate", "nan"], None, "learning_rate must be a finite number"),
    "zero steps": (["--max-steps", "0"], None, "max_steps must be >= 1"),
    "negative lambda": (["--method", "noisytune", "--noisytune.lambda", "-1"], None, "NoisyTune lambda"),
    "mixout p 1": (["--method", "mixout", "--mixout.p", "1"], None, "Mixout p must be"),
    "negative gamma": (["--method", "recadam", "--recadam.gamma", "-2"], None, "RecAdam gamma"),
    "negative sigma": (["--method", "lnsr", "--lnsr.sigma", "-0.1"], None, "LNSR sigma"),
    "impossible combination": (["--method", "neftune+symnoise"], None, "cannot combine"),
    "mixout pattern matches nothing": (
        ["--method", "mixout", "--mixout.include", "nothing_here"],
        None,
        "mixout:",
    ),
    "lnsr layer out of range": (["--method", "lnsr", "--lnsr.layer", "9"], None, "out of range"),
    "sft-arg wrong type": (["--sft-arg", "logging_steps=often"], None, "--sft-arg logging_steps expects"),
    "resume last without checkpoint": (["--resume-from-checkpoint", "last"], None, "no complete checkpoint"),
    "broken json array": ([], b"[" + GOOD + b"," + GOOD + b",,]", "record"),
    "array in jsonl": ([], b"[" + GOOD + b"]\n", "looks like a JSON array"),
    "invalid utf-8": ([], GOOD + b"\n" + GOOD[:20] + b"\xff" + GOOD[21:] + b"\n", "invalid UTF-8"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_settings_and_files(inputs, tmp_path, name):
    extra, data_bytes, needle = CASES[name]
    data = None
    if data_bytes is not None:
        suffix = ".json" if data_bytes.startswith(b"[") and name != "array in jsonl" else ".jsonl"
        data = _write(tmp_path / f"data{suffix}", data_bytes)
    out = tmp_path / "run"
    proc = _train(inputs, out, *extra, data=data)
    _one_line_error(proc, needle)
    _nothing_written(out)


def test_data_errors_come_before_the_model_loads(inputs, tmp_path):
    """A typo in the data is reported even though the model path is wrong too: data is checked first."""
    data = _write(tmp_path / "d.jsonl", b'{"instruction": "x", "output": ""}\n')
    proc = _cli(
        "train", "--model", tmp_path / "no-such-model", "--data", data, "--output-dir", tmp_path / "r"
    )
    _one_line_error(proc, "d.jsonl", "record 1", "output")


def test_output_dir_that_is_a_file_or_under_a_file(inputs, tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    _one_line_error(_train(inputs, f), "is a file")
    _one_line_error(_train(inputs, f / "sub"), "cannot write the run folder")


def test_non_finite_training_stops_before_the_step_and_writes_no_model(inputs, tmp_path):
    out = tmp_path / "run"
    proc = _train(
        inputs, out, "--learning-rate", "1e30", "--max-steps", "4", "--lr-scheduler-type", "constant"
    )
    _one_line_error(proc, "nan/inf at step")
    _nothing_written(out)


def test_failed_overwrite_keeps_the_finished_run_whole(inputs, tmp_path):
    out = tmp_path / "run"
    assert _train(inputs, out).returncode == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    config = (out / "config.yaml").read_text()
    proc = _train(
        inputs,
        out,
        "--overwrite-output-dir",
        "--learning-rate",
        "1e30",
        "--max-steps",
        "4",
        "--lr-scheduler-type",
        "constant",
    )
    _one_line_error(proc, "nan/inf")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert (out / "config.yaml").read_text() == config
    # a successful overwrite replaces it whole (no file of the old run left)
    (out / "eval").mkdir()
    assert _train(inputs, out, "--overwrite-output-dir", "--method", "none").returncode == 0
    assert not (out / "eval").exists() and "method: none" in (out / "config.yaml").read_text()
    assert not list(tmp_path.glob(".run.*"))


def test_eval_refuses_a_run_folder_whose_parts_do_not_belong_together(inputs, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert _train(inputs, a).returncode == 0 and _train(inputs, b).returncode == 0
    (a / "model" / "noisyft_run.json").write_text((b / "model" / "noisyft_run.json").read_text())
    proc = _cli("eval", "run", a, "--analyses", "loss", "--heldout", "none")
    _one_line_error(proc, "do not belong together")
    assert not (a / "eval").exists()
    # config.yaml edited after the run
    cfg = b / "config.yaml"
    cfg.write_text(cfg.read_text().replace("max_steps: 2", "max_steps: 3"))
    _one_line_error(_cli("eval", "run", b, "--analyses", "loss"), "not the config this run was trained with")
