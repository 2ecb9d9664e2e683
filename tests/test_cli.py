"""`noisyft train` end to end on a tiny model, config handling, bad settings, crash safety."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch

from noisyft.cli import build_parser, main
from noisyft.config import TrainConfig, migrate_legacy
from noisyft.settings import leaf_paths, resolve

from conftest import tiny_llama, tiny_tokenizer


def resolve_train_config(ns):
    return resolve(ns, TrainConfig, migrate=migrate_legacy)


@pytest.fixture
def tiny_run_inputs(tmp_path):
    model_dir = tmp_path / "tinymodel"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "data.jsonl"
    with data.open("w") as f:
        for i in range(24):
            f.write(
                json.dumps({"instruction": f"write hello w{i}", "input": "", "output": "hello world w1 w2"})
                + "\n"
            )
    return model_dir, data


def _run(model_dir, data, out, *extra):
    argv = ["train", "--model", str(model_dir), "--data", str(data), "--output-dir", str(out)]
    argv += ["--max-steps", "3", "--per-device-train-batch-size", "4", "--logging-steps", "1", *extra]
    return main(argv)


@pytest.mark.slow
def test_train_end_to_end_writes_a_complete_run_folder(tiny_run_inputs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    model_dir, data = tiny_run_inputs
    out = tmp_path / "run"
    assert _run(model_dir, data, out, "--eval-data", str(data), "--eval-max-examples", "8") == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "model" in printed

    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert (out / "model" / "model.safetensors").is_file()
    assert not list(out.glob(".model.tmp-*"))
    trained = dict(model.named_parameters())
    init = dict(tiny_llama().named_parameters())
    assert not torch.equal(trained["lm_head.weight"], init["lm_head.weight"])
    # the saved model carries no hook or NEFTune attribute
    assert not hasattr(model.get_input_embeddings(), "neftune_noise_alpha")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["method"] == "neftune" and metrics["neftune"]["alpha"] == 5.0
    assert metrics["train"]["train_loss"] > 0
    assert metrics["eval"]["eval_loss"] > 0
    assert metrics["data"]["train"]["n_examples"] == 24
    assert any("neftune/noise_to_embed_norm" in h for h in metrics["log_history"])
    config = (out / "config.yaml").read_text()
    assert "neftune:\n  alpha: 5.0" in config and "_versions" not in config
    assert json.loads((out / "run.json").read_text())["versions"]["torch"] == torch.__version__
    # the resolved config repeats the run
    again = resolve_train_config(build_parser().parse_args(["train", "--config", str(out / "config.yaml")]))
    assert again.model == str(model_dir) and again.max_steps == 3 and again.eval_max_examples == 8
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    # no --save-steps: no checkpoints folder, and no stray logs in one
    assert not (out / "checkpoints").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in (out / "tensorboard").glob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {"train/loss", "eval/loss"} <= tags  # the held-out loss is where the README says


@pytest.mark.slow
def test_noisytune_plus_neftune_and_lora(tiny_run_inputs, tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir, data = tiny_run_inputs
    out = tmp_path / "run"
    code = _run(
        model_dir,
        data,
        out,
        "--method",
        "noisytune+neftune",
        "--lora",
        "--lora-target-modules",
        "q_proj,v_proj",
        "--eval-data",
        "none",
    )
    assert code == 0
    report = json.loads((out / "noisytune_report.json").read_text())
    assert report and any(r["name"].endswith("lora_A.default.weight") for r in report)
    merged = AutoModelForCausalLM.from_pretrained(out / "model")  # LoRA merged into a plain model
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_yaml_config_flags_override_and_unknown_keys_fail(tmp_path):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text(
        "method: noisytune\nnoisytune: {lambda: 0.1, seed: 3}\nlearning_rate: 1.0e-4\nmax_examples: null\n"
    )
    ns = build_parser().parse_args(["train", "--config", str(cfg_file), "--noisytune-lambda", "0.2"])
    cfg = resolve_train_config(ns)
    assert cfg.method == "noisytune" and cfg.noisytune.lam == 0.2 and cfg.learning_rate == 1e-4
    assert cfg.noisytune.seed == 3  # the section merges key by key
    assert cfg.max_examples is None

    cfg_file.write_text("method: neftune\nneftune_alfa: 5\n")
    assert main(["train", "--config", str(cfg_file)]) == 2

    cfg_file.write_text("learning_rate: fast\n")
    with pytest.raises(ValueError, match=r"run.yaml: learning_rate expects float"):
        resolve_train_config(build_parser().parse_args(["train", "--config", str(cfg_file)]))


def test_unknown_key_error_names_the_key_and_suggests(tmp_path, capsys):
    cfg_file = tmp_path / "run.yaml"
    cfg_file.write_text("neftune_alfa: 5\n")
    assert main(["train", "--config", str(cfg_file)]) == 2
    err = capsys.readouterr().err
    assert "neftune.alfa" in err and "neftune.alpha" in err and "run.yaml" in err


def test_bad_method_and_values_fail_cleanly(capsys):
    assert main(["train", "--method", "dropout"]) == 2
    assert "unknown method 'dropout'" in capsys.readouterr().err
    assert main(["train", "--neftune-alpha", "-1"]) == 2
    assert main(["train", "--max-length", "0"]) == 2


def test_unknown_sft_arg_and_double_neftune_fail(tiny_run_inputs, tmp_path, capsys):
    model_dir, data = tiny_run_inputs
    assert _run(model_dir, data, tmp_path / "a", "--sft-arg", "learning_rat=1") == 1
    assert "learning_rat" in capsys.readouterr().err
    assert _run(model_dir, data, tmp_path / "b", "--sft-arg", "neftune_noise_alpha=5") == 1
    assert "applied twice" in capsys.readouterr().err


def test_bad_records_stop_before_training_with_file_record_and_field(tiny_run_inputs, tmp_path, capsys):
    model_dir, data = tiny_run_inputs
    with data.open("a") as f:
        f.write(json.dumps({"instruction": "x", "output": ""}) + "\n")
    out = tmp_path / "run"
    assert _run(model_dir, data, out, "--eval-data", "none") == 1
    err = capsys.readouterr().err
    assert "data.jsonl" in err and "record 25" in err and "output" in err
    assert not (out / "model").exists()
    assert _run(model_dir, data, out, "--eval-data", "none", "--skip-bad-records") == 0
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"]["n_bad"] == 1


def test_refuses_to_overwrite_a_finished_run(tiny_run_inputs, tmp_path, capsys):
    model_dir, data = tiny_run_inputs
    out = tmp_path / "run"
    (out / "model").mkdir(parents=True)
    assert _run(model_dir, data, out) == 1
    assert "already holds model" in capsys.readouterr().err


def test_crash_while_saving_leaves_no_half_written_model(tiny_run_inputs, tmp_path, monkeypatch):
    from transformers import PreTrainedModel

    model_dir, data = tiny_run_inputs
    out = tmp_path / "run"
    original = PreTrainedModel.save_pretrained

    def dying_save(self, save_directory, *args, **kwargs):
        original(self, save_directory, *args, **kwargs)  # files are written ... then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _run(model_dir, data, out, "--eval-data", "none")
    assert not (out / "model").exists()
    assert not (out / "metrics.json").exists()
    assert not list(out.glob(".model.tmp-*"))


def test_help_is_fast_and_documents_every_option():
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "noisyft.cli", "train", "--help"], capture_output=True, text=True, check=True
    )
    assert time.time() - start < 10
    for name in leaf_paths(TrainConfig):
        flag = "--sft-arg" if name == "sft_args" else "--" + name.replace("_", "-")
        assert flag in proc.stdout, flag
    # --help must not import torch / transformers
    probe = "import sys, noisyft.cli; noisyft.cli.build_parser(); print('torch' in sys.modules)"
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip()
        == "False"
    )
