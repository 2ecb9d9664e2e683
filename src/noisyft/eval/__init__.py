"""`noisyft eval`: the analyses the NEFTune and Fisher-penalty papers used, as a library and a command.

The names below load on first use, so ``import noisyft.eval`` (and ``noisyft eval --help``) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

# Eager (stdlib only): binds the function over the submodule of the same name, so `noisyft.eval.text_stats(...)`
# is the function however the submodule was imported.
from .text_stats import text_stats

_LAZY = {
    # noise-free loss and curvature
    "noise_free_loss": "noisyft.eval.loss",
    "loss_report": "noisyft.eval.loss",
    "curvature_report": "noisyft.eval.curvature",
    "mc_noise_gap": "noisyft.eval.curvature",
    "hutchinson_trace": "noisyft.eval.curvature",
    "batch_from_dataset": "noisyft.eval.curvature",
    # generation, lengths, memorization
    "GenerationSettings": "noisyft.eval.generation",
    "LONG_ANSWER_SUFFIX": "noisyft.eval.generation",
    "generate_responses": "noisyft.eval.generation",
    "length_ablations": "noisyft.eval.generation",
    "write_generations": "noisyft.eval.generation",
    "read_generations": "noisyft.eval.generation",
    "memorization_scores": "noisyft.eval.memorization",
    # capabilities
    "gsm8k_accuracy": "noisyft.eval.capability",
    "extract_answer": "noisyft.eval.capability",
    "run_lm_eval": "noisyft.eval.capability",
    "load_gsm8k": "noisyft.eval.gsm8k",
    # pairwise judge
    "JudgeConfig": "noisyft.eval.judge",
    "judge_pairwise": "noisyft.eval.judge",
    "judge_answer_files": "noisyft.eval.judge",
    "load_answers": "noisyft.eval.judge",
    "win_rates": "noisyft.eval.judge",
    # the command's pieces
    "EvalConfig": "noisyft.eval.config",
    "run_eval": "noisyft.eval.recipe",
    "render_report": "noisyft.eval.report",
}

__all__ = ["text_stats", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'noisyft.eval' has no attribute {name!r}")
