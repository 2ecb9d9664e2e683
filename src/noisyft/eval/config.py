"""`noisyft eval` settings: one dataclass per command (``run``, ``report``, ``judge``, ``lm-eval``), read by the
settings layer (``noisyft.settings``) as for training: YAML for defaults, flags override.

Imports nothing heavy, so ``noisyft eval --help`` is instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from noisyft._checks import check_choice, check_int, check_number
from noisyft.eval.judge import JudgeConfig

ANALYSES = ("loss", "memorization", "lengths", "ablations", "gsm8k", "curvature")
DEFAULT_ANALYSES = ("loss", "memorization", "lengths", "gsm8k")


@dataclass
class EvalConfig:
    """Settings of `noisyft eval run`. The defaults evaluate a `noisyft train` run folder (or a model) on the
    analyses of the NEFTune paper, sized to take a few minutes on a 2-core CPU with the embedded SmolLM2."""

    target: str = field(
        default="smollm2",
        metadata={
            "help": "a `noisyft train` run folder (its model/ and training data settings are used), a model "
            "folder, a Hugging Face model id or 'smollm2'",
            "positional": True,
        },
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "results folder (default: <run>/eval, or outputs/eval-<name>-<time>)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace results already in output_dir"})
    analyses: list[str] = field(
        default_factory=lambda: list(DEFAULT_ANALYSES),
        metadata={"help": f"list of {', '.join(ANALYSES)}, or all"},
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "allow custom model code"})
    dtype: str = field(default="auto", metadata={"help": "weights dtype: auto, float32, bfloat16, float16"})

    # -- data -----------------------------------------------------------------------------------------------------
    train_data: str | None = field(
        default=None,
        metadata={"help": "training data (default: the run's; 'sharegpt' for a bare model)"},
    )
    train_max_examples: int | None = field(
        default=None,
        metadata={"help": "training records used (default: the run's max_examples; 48 otherwise)"},
    )
    template: str | None = field(
        default=None, metadata={"help": "prompt template (default: the run's, or auto)"}
    )
    max_length: int | None = field(
        default=None, metadata={"help": "tokens per example (default: the run's / 512)"}
    )
    heldout: list[str] = field(
        default_factory=lambda: ["sharegpt:heldout", "gsm8k"],
        metadata={"help": "held-out sets for the loss: files, sharegpt:heldout, gsm8k"},
    )
    heldout_max_examples: int | None = field(default=32, metadata={"help": "records per held-out set"})
    prompts_data: str = field(
        default="sharegpt:heldout",
        metadata={"help": "where the length/diversity prompts come from (first user turns)"},
    )

    # -- generation -----------------------------------------------------------------------------------------------
    num_prompts: int = field(default=16, metadata={"help": "prompts for memorization and for lengths"})
    max_new_tokens: int = field(default=128, metadata={"help": "greedy decoding budget per answer"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generate() / loss batch"})
    min_new_tokens: int = field(
        default=250, metadata={"help": "ablation: EOS blocked until this many tokens"}
    )
    gsm8k_limit: int = field(default=16, metadata={"help": "GSM8K test questions for exact-match accuracy"})
    gsm8k_max_new_tokens: int = field(default=256, metadata={"help": "GSM8K decoding budget"})

    # -- curvature ------------------------------------------------------------------------------------------------
    curvature_alphas: list[float] = field(
        default_factory=lambda: [1.0, 5.0, 15.0], metadata={"help": "NEFTune alphas for the curvature table"}
    )
    curvature_examples: int = field(default=2, metadata={"help": "training sequences in the curvature batch"})
    curvature_mc_samples: int = field(default=32, metadata={"help": "antithetic MC noise draws per alpha"})
    curvature_hutchinson_samples: int = field(default=8, metadata={"help": "Hutchinson probes for Tr(H_X)"})
    curvature_fisher_samples: int = field(default=4, metadata={"help": "label draws for Tr(F_X) (0: skip)"})
    seed: int = field(default=0, metadata={"help": "seed of every sampled quantity"})

    def __post_init__(self):
        if self.analyses == ["all"]:
            self.analyses = list(ANALYSES)
        for a in self.analyses:
            check_choice("analysis", a, (*ANALYSES, "all"))
        for name in (
            "num_prompts",
            "max_new_tokens",
            "batch_size",
            "gsm8k_limit",
            "gsm8k_max_new_tokens",
            "curvature_examples",
            "min_new_tokens",
        ):
            check_int(name, getattr(self, name), low=1)
        for name in ("train_max_examples", "heldout_max_examples", "max_length"):
            check_int(name, getattr(self, name), low=1, optional=True)
        for name in ("curvature_mc_samples", "curvature_hutchinson_samples"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (a standard error needs two samples)")
        if self.curvature_fisher_samples == 1 or self.curvature_fisher_samples < 0:
            raise ValueError("curvature_fisher_samples must be 0 (skip) or >= 2")
        for alpha in self.curvature_alphas:
            check_number("curvature alpha", alpha, low=0)
        check_int("seed", self.seed, low=0)

    @property
    def analysis_list(self) -> list[str]:
        return list(self.analyses)


@dataclass
class ReportConfig:
    """Settings of `noisyft eval report`: a markdown comparison table from eval folders."""

    folders: list[str] = field(
        default_factory=list,
        metadata={"help": "eval folders (or run folders holding eval/)", "positional": True},
    )
    output: str | None = field(default=None, metadata={"help": "also write the table to this file"})

    def __post_init__(self):
        if not self.folders:
            raise ValueError("give at least one eval folder")


@dataclass
class JudgeRunConfig:
    """Settings of `noisyft eval judge`: answers A against answers B, both orders, with a pairwise judge."""

    answers_a: str = field(metadata={"help": "answers A (JSONL with prompt/response)", "positional": True})
    answers_b: str = field(metadata={"help": "answers B (JSONL with prompt/response)", "positional": True})
    output_dir: str = field(metadata={"help": "where judgments.jsonl and summary.json go"})
    judge: JudgeConfig = field(
        metadata={
            "help": "the judge: an OpenAI-compatible endpoint or a local model (API key from the environment)"
        }
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "judgment cache (default: <noisyft cache>/judge)"}
    )


@dataclass
class LMEvalConfig:
    """Settings of `noisyft eval lm-eval`: OpenLLM-Leaderboard tasks through lm-eval-harness."""

    output: str = field(metadata={"help": "results JSON file"})
    model: str = field(
        default="smollm2",
        metadata={"help": "a model folder, 'smollm2', or a PEFT adapter folder", "positional": True},
    )
    tasks: list[str] = field(
        default_factory=lambda: ["mmlu", "arc_challenge", "hellaswag", "truthfulqa_mc2"],
        metadata={"help": "lm-eval task names"},
    )
    limit: float | None = field(default=None, metadata={"help": "examples per task (or a fraction < 1)"})
    num_fewshot: int | None = field(
        default=None, metadata={"help": "few-shot examples (task default if unset)"}
    )
    batch_size: int = field(default=8, metadata={"help": "batch size"})
    device: str = field(default="cpu", metadata={"help": "torch device"})

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("give at least one task")
        check_number("limit", self.limit, low=0, low_open=True, optional=True)
        check_int("num_fewshot", self.num_fewshot, low=0, optional=True)
        check_int("batch_size", self.batch_size, low=1)

    @property
    def limit_value(self) -> float | int | None:
        return self.limit if self.limit is None or self.limit < 1 else int(self.limit)
