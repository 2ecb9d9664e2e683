"""`noisyft eval run` settings: one dataclass, as for training (YAML for defaults, flags override).

Imports nothing heavy, so ``noisyft eval --help`` is instant.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

ANALYSES = ("loss", "memorization", "lengths", "ablations", "gsm8k", "curvature")
DEFAULT_ANALYSES = "loss,memorization,lengths,gsm8k"


def _split(text: str | None) -> list[str]:
    return [p.strip() for p in (text or "").split(",") if p.strip()]


@dataclass
class EvalConfig:
    """Settings of `noisyft eval run`. The defaults evaluate a `noisyft train` run folder (or a model) on the
    analyses of the NEFTune paper, sized to take a few minutes on a 2-core CPU with the embedded SmolLM2."""

    target: str = field(
        default="smollm2",
        metadata={
            "help": "a `noisyft train` run folder (its model/ and training data settings are used), a model "
            "folder, a Hugging Face model id or 'smollm2'"
        },
    )
    output_dir: str | None = field(
        default=None, metadata={"help": "results folder (default: <run>/eval, or outputs/eval-<name>-<time>)"}
    )
    overwrite: bool = field(default=False, metadata={"help": "replace results already in output_dir"})
    analyses: str = field(
        default=DEFAULT_ANALYSES,
        metadata={"help": f"comma list of {', '.join(ANALYSES)}, or 'all'"},
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
    heldout: str = field(
        default="sharegpt:heldout,gsm8k",
        metadata={"help": "comma list of held-out sets for the loss: files, 'sharegpt:heldout', 'gsm8k'"},
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
    curvature_alphas: str = field(
        default="1,5,15", metadata={"help": "NEFTune alphas for the curvature table"}
    )
    curvature_examples: int = field(default=2, metadata={"help": "training sequences in the curvature batch"})
    curvature_mc_samples: int = field(default=32, metadata={"help": "antithetic MC noise draws per alpha"})
    curvature_hutchinson_samples: int = field(default=8, metadata={"help": "Hutchinson probes for Tr(H_X)"})
    curvature_fisher_samples: int = field(default=4, metadata={"help": "label draws for Tr(F_X) (0: skip)"})
    seed: int = field(default=0, metadata={"help": "seed of every sampled quantity"})

    def __post_init__(self):
        unknown = [a for a in self.analysis_list if a not in ANALYSES]
        if unknown:
            raise ValueError(f"unknown analyses {unknown}; choose from {', '.join(ANALYSES)} or 'all'")
        for name in (
            "num_prompts",
            "max_new_tokens",
            "batch_size",
            "gsm8k_limit",
            "gsm8k_max_new_tokens",
            "curvature_examples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("curvature_mc_samples", "curvature_hutchinson_samples"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 (a standard error needs two samples)")
        if self.curvature_fisher_samples == 1 or self.curvature_fisher_samples < 0:
            raise ValueError("curvature_fisher_samples must be 0 (skip) or >= 2")
        try:
            [float(a) for a in _split(self.curvature_alphas)]
        except ValueError:
            raise ValueError(f"curvature_alphas must be numbers, got {self.curvature_alphas!r}") from None

    @property
    def analysis_list(self) -> list[str]:
        return list(ANALYSES) if self.analyses.strip() == "all" else _split(self.analyses)

    @property
    def heldout_list(self) -> list[str]:
        return _split(self.heldout)

    @property
    def alphas(self) -> list[float]:
        return [float(a) for a in _split(self.curvature_alphas)]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
