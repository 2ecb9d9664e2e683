"""The README taken literally: every Python snippet runs as written (on tiny stand-ins for `model`, `ds`, `embeds`,
`mask`, which the README leaves to the reader), and every `noisyft` command line parses and resolves its settings
(with --print-config, which loads nothing). Training the embedded model itself is covered by test_embedded.py; the
launchers (torchrun / accelerate) and remote experiment storages are not run here."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from noisyft.cli import main

from conftest import tiny_llama, tiny_tokenizer
from test_trainer import _dataset

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
PYTHON = [body for lang, body in BLOCKS if lang == "python"]


def _commands() -> list[str]:
    out = []
    for lang, body in BLOCKS:
        if lang != "bash":
            continue
        for line in body.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            m = re.search(r"(?:\.venv/bin/)?noisyft (train|eval|experiment)\b.*", line)
            if m:
                out.append(m.group(0))
    return out


COMMANDS = _commands()


def test_the_readme_has_snippets_and_commands():
    assert len(PYTHON) >= 3 and len(COMMANDS) >= 20


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_snippet_runs_as_written(index, tmp_path, monkeypatch):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig

    from test_preference_trainers import _preference_data

    monkeypatch.chdir(tmp_path)
    tiny_llama().save_pretrained(tmp_path / "tiny")
    tiny_tokenizer().save_pretrained(tmp_path / "tiny")
    namespace = {  # as a reader has them: a model loaded from a folder (TRL finds its tokenizer there), a dataset
        "model": AutoModelForCausalLM.from_pretrained(tmp_path / "tiny"),
        "ds": _dataset(n=8),
        "embeds": torch.randn(2, 5, 16),
        "mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
        # the DPO snippet's: preference pairs, DPO arguments, a LoRA config
        "pairs": _preference_data(),
        "dpo_args": DPOConfig(output_dir="dpo", use_cpu=True, bf16=False, max_length=32, report_to="none"),
        "lora": LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    }
    exec(compile(PYTHON[index], f"README.md python block {index + 1}", "exec"), namespace)


@pytest.mark.parametrize("command", COMMANDS)
def test_command_line_resolves(command, capsys, monkeypatch):
    monkeypatch.chdir(README.parent)  # paths in the README are relative to the repository
    argv = shlex.split(command)[1:]
    if argv[:2] in (["experiment", "work"], ["experiment", "report"]):
        pytest.skip("needs a finished experiment folder (covered by tests/test_experiment_runner.py)")
    if "--help" in argv:
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        return
    if "--print-config" not in argv:
        argv.append("--print-config")
    assert main(argv) == 0, capsys.readouterr().err
