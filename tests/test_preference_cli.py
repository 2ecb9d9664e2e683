"""`noisyft train --task dpo|kto` end to end on a tiny model, and what it refuses before anything loads.

Closed forms at the first step (dropout is off in TRL's preference trainers, fp32): the policy starts equal to its
reference, so DPO's first loss is ``-log sigmoid(0) = ln 2`` and KTO's is ``1 - sigmoid(0) = 0.5`` (the KL estimate is
0 too) -- unless noise reaches the policy's forward, which NEFTune's does."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from noisyft.cli import main

from conftest import tiny_llama, tiny_tokenizer

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("pref") / "tinymodel"
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def _train(model_dir, data, out, *extra):
    argv = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--output-dir",
        str(out),
        "--bf16",
        "false",
    ]
    argv += [
        "--max-steps",
        "2",
        "--per-device-train-batch-size",
        "4",
        "--logging-steps",
        "1",
        "--learning-rate",
    ]
    return main([*argv, "1e-3", *extra])


def _first_loss(out) -> float:
    return json.loads((out / "metrics.json").read_text())["log_history"][0]["loss"]


def _error(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("noisyft train: error:")]
    assert lines, err[-2000:]
    return err


@pytest.mark.slow
def test_dpo_with_neftune_skipping_bad_records(model_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    data = tmp_path / "prefs.jsonl"
    bad = [json.dumps({"prompt": "p", "chosen": "same", "rejected": "same"}), json.dumps({"prompt": "p"})]
    data.write_text((DATA / "preference_small.jsonl").read_text() + "\n".join(bad) + "\n")
    out = tmp_path / "run"
    extra = [
        "--task",
        "dpo",
        "--method",
        "neftune",
        "--skip-bad-records",
        "--eval-data",
        DATA / "preference_chat.jsonl",
    ]
    assert _train(model_dir, data, out, *map(str, extra)) == 0
    assert str(out) in capsys.readouterr().out

    trained = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    init = dict(tiny_llama().named_parameters())
    assert not torch.equal(trained["lm_head.weight"], init["lm_head.weight"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "dpo" and metrics["neftune"]["alpha"] == 5.0
    assert abs(metrics["log_history"][0]["loss"] - math.log(2)) > 1e-4  # the policy forward is noised
    assert "eval_rewards/accuracies" in metrics["eval"] and metrics["eval"]["eval_loss"] > 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["n_records"] == 18 and report["train"]["n_bad"] == 2
    assert report["train"]["bad_by_kind"] == {"identical pair": 1, "missing field": 1}
    assert report["train"]["n_examples"] == 16 and report["train"]["n_response_tokens"] > 0
    assert report["eval"]["format"] == "paired conversational"
    config = (out / "config.yaml").read_text()
    assert config.startswith("task: dpo\n") and "dpo:\n  beta: 0.1\n  loss_type: sigmoid\n" in config
    # the resolved config repeats the run
    assert main(["train", "--config", str(out / "config.yaml"), "--print-config"]) == 0
    assert capsys.readouterr().out == config


@pytest.mark.slow
def test_dpo_with_lora_starts_at_ln2(model_dir, tmp_path):
    """No noise: the policy equals its reference (the adapter-disabled model; LoRA B starts at 0) at step 1."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    extra = ["--task", "dpo", "--method", "none", "--lora", "--lora-target-modules", "q_proj,v_proj"]
    assert _train(model_dir, DATA / "preference_chat.jsonl", out, *extra, "--dpo.beta", "0.5") == 0
    assert _first_loss(out) == pytest.approx(math.log(2), abs=1e-6)
    merged = AutoModelForCausalLM.from_pretrained(out / "model")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert json.loads((out / "metrics.json").read_text())["task"] == "dpo"
    # eval run reads a run's instruction data: a preference run is refused, its model folder pointed to
    from noisyft.eval.config import EvalConfig
    from noisyft.eval.recipe import EvalError, resolve_target

    with pytest.raises(EvalError, match=r"is a --task dpo run; .* noisyft eval run .*model --train-data"):
        resolve_target(EvalConfig(target=str(out)))


@pytest.mark.slow
def test_kto_starts_at_one_half_and_trains(model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert _train(model_dir, DATA / "kto_small.jsonl", out, "--task", "kto", "--method", "none") == 0
    assert _first_loss(out) == pytest.approx(0.5, abs=1e-6)
    trained = dict(AutoModelForCausalLM.from_pretrained(out / "model").named_parameters())
    assert not torch.equal(trained["lm_head.weight"], dict(tiny_llama().named_parameters())["lm_head.weight"])
    report = json.loads((out / "data_report.json").read_text())["train"]
    assert (report["n_records"], report["n_examples"]) == (8, 10)


def test_preference_task_without_data_says_it_needs_a_file(capsys):
    assert main(["train", "--task", "dpo"]) == 2
    assert "--task dpo needs preference data: pass --data FILE.jsonl" in _error(capsys)
    assert main(["train", "--task", "kto", "--data", "x.jsonl", "--eval-data", "sharegpt:heldout"]) == 2
    assert "the embedded ShareGPT data is SFT-only" in _error(capsys)


@pytest.mark.parametrize("task", ["dpo", "kto"])
@pytest.mark.parametrize(
    "extra, words",
    [
        (["--method", "fisher"], "fisher (explicit Fisher penalty"),
        (["--method", "lnsr"], "lnsr (noise-stability penalty"),
        (["--method", "symnoise"], "symnoise (symmetric"),
        (["--method", "noisytune+fisher"], "fisher ("),
        (["--fisher-diagnostic-steps", "2"], "fisher_diagnostic_steps needs token labels"),
        (["--packing"], "packing applies to --task sft only"),
        (["--template", "alpaca"], "template applies to --task sft only"),
    ],
)
def test_what_needs_token_labels_or_sft_data_is_refused_before_anything_loads(
    task, extra, words, tmp_path, capsys
):
    # a model path that does not exist: the refusal must come from the settings, before any loading
    argv = [
        "train",
        "--task",
        task,
        "--data",
        str(DATA / "preference_small.jsonl"),
        "--model",
        str(tmp_path / "none"),
    ]
    assert main([*argv, "--output-dir", str(tmp_path / "run"), *extra]) == 2
    err = _error(capsys)
    assert words in err
    if "--method" in extra:
        assert f"needs a token-level loss with labels, which --task {task} does not have" in err
    assert not (tmp_path / "run").exists()


def test_the_trainer_refuses_the_same_methods():
    """The settings refuse exactly the methods NoisyDPOTrainer / NoisyKTOTrainer refuse."""
    from noisyft.config import TrainConfig
    from noisyft.methods import REGISTRY

    refused = set()
    for name in REGISTRY:
        try:
            TrainConfig(task="dpo", data="x.jsonl", method=name)
        except ValueError:
            refused.add(name)
    trainer_refuses = {n for n, spec in REGISTRY.items() if spec.needs_labels or "loss" in spec.slots}
    assert refused == trainer_refuses == {"fisher", "lnsr", "symnoise"}


def test_task_sections_and_print_config(capsys):
    assert main(["train", "--task", "kto", "--data", "k.jsonl", "--kto.beta", "0.3", "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("task: kto\n") and "kto:\n  beta: 0.3\n" in printed and "dpo: null" in printed
    assert main(["train", "--print-config"]) == 0  # the default run: sft, no preference sections
    printed = capsys.readouterr().out
    assert printed.startswith("task: sft\n") and "dpo: null\nkto: null\n" in printed
    assert main(["train", "--dpo.beta", "0.2"]) == 2
    assert "dpo settings are given but task is 'sft'" in _error(capsys)
    assert main(["train", "--task", "dpo", "--data", "p.jsonl", "--dpo.beta", "0"]) == 2
    assert "dpo beta must be > 0" in _error(capsys)
    assert main(["train", "--task", "kto", "--data", "k.jsonl", "--per-device-train-batch-size", "1"]) == 2
    assert "--task kto needs per_device_train_batch_size >= 2" in _error(capsys)
    assert main(["train", "--task", "ppo"]) == 2
    assert "task must be one of 'sft', 'dpo', 'kto'" in _error(capsys)


def test_bad_preference_record_stops_before_the_model_loads(tmp_path, capsys):
    data = tmp_path / "prefs.jsonl"
    data.write_text(json.dumps({"prompt": "p", "chosen": "c", "rejected": "r"}) + "\n" + '{"prompt": "p"}\n')
    argv = ["train", "--task", "dpo", "--data", str(data), "--model", str(tmp_path / "none")]
    assert main([*argv, "--output-dir", str(tmp_path / "run")]) == 1
    err = _error(capsys)
    assert f"{data}: record 2 (line 2): field 'chosen': missing required field" in err
    assert "--skip-bad-records" in err and "Traceback" not in err
    assert not (tmp_path / "run" / "model").exists()


def test_prompts_that_fill_max_length_leave_nothing_to_train(model_dir, tmp_path, capsys):
    argv = [
        "train",
        "--task",
        "dpo",
        "--data",
        str(DATA / "preference_small.jsonl"),
        "--model",
        str(model_dir),
    ]
    assert main([*argv, "--output-dir", str(tmp_path / "run"), "--max-length", "1"]) == 1
    assert "no training example of" in _error(capsys) and not (tmp_path / "run" / "model").exists()


def test_sft_args_go_to_the_tasks_trl_config(model_dir, tmp_path, capsys):
    argv = [
        "train",
        "--task",
        "dpo",
        "--data",
        str(DATA / "preference_small.jsonl"),
        "--model",
        str(model_dir),
    ]
    argv += ["--output-dir", str(tmp_path / "run")]
    assert main([*argv, "--sft-arg", "packing=true"]) == 1
    assert "unknown trl.DPOConfig argument(s) packing" in _error(capsys)
    assert (
        main([*argv, "--overwrite-output-dir", "--method", "none", "--sft-arg", "neftune_noise_alpha=5"]) == 1
    )
    assert "noises the reference pass too" in _error(capsys)
    assert main([*argv, "--overwrite-output-dir", "--sft-arg", "beta=often"]) == 1
    assert "--sft-arg beta expects float" in _error(capsys)
    # TRL's own checks of its trainer's arguments: one line too
    argv[2] = "kto"
    assert main([*argv, "--overwrite-output-dir", "--sft-arg", "train_sampling_strategy=random"]) == 1
    err = _error(capsys)
    assert (
        "NoisyKTOTrainer: Loss type `'kto'` estimates the KL divergence term" in err
        and "Traceback" not in err
    )


@pytest.mark.slow
def test_torchrun_of_dpo_is_one_ddp_run(model_dir, tmp_path):
    """2 ranks x 2 pairs = 1 process x 4 pairs: the same weights (DPO's loss is a mean over the pairs)."""
    import os
    import shutil
    import subprocess
    import sys

    from safetensors.torch import load_file

    torchrun = str(Path(sys.executable).with_name("torchrun"))
    if not Path(torchrun).exists():
        torchrun = shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")

    def args(out, batch):
        argv = ["train", "--task", "dpo", "--model", model_dir, "--data", DATA / "preference_small.jsonl"]
        argv += [
            "--output-dir",
            out,
            "--max-steps",
            "3",
            "--per-device-train-batch-size",
            batch,
            "--method",
            "none",
        ]
        argv += [
            "--bf16",
            "false",
            "--learning-rate",
            "1e-3",
            "--lr-scheduler-type",
            "constant",
            "--warmup-steps",
            0,
        ]
        return [str(a) for a in argv]

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = dict(capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    two = subprocess.run(
        [torchrun, "--nproc_per_node", "2", "-m", "noisyft.cli", *args(tmp_path / "ddp", 2)], **run
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("Run folder:") == 1
    assert json.loads((tmp_path / "ddp" / "metrics.json").read_text())["world_size"] == 2
    one = subprocess.run([sys.executable, "-m", "noisyft.cli", *args(tmp_path / "single", 4)], **run)
    assert one.returncode == 0, one.stderr[-3000:]
    a = load_file(tmp_path / "ddp" / "model" / "model.safetensors")
    b = load_file(tmp_path / "single" / "model" / "model.safetensors")
    init = load_file(model_dir / "model.safetensors")
    assert any(not torch.equal(a[k], init[k]) for k in a)  # it trained
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key
