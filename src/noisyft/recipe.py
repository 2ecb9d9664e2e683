"""The `noisyft train` recipe: one readable function from a TrainConfig to a finished run folder.

Run folder layout (everything a later report needs, as files)::

    <output_dir>/
      config.yaml            the resolved settings (`noisyft train --print-config`; feeds back with --config)
      run.json               library versions and start time
      data_report.json       records read / skipped (and why) / truncated, per data set
      noisytune_report.json  per-tensor std and relative change (NoisyTune runs)
      tensorboard/           TensorBoard event files (loss, lr, neftune/noise_to_embed_norm, ...)
      checkpoints/           trainer checkpoints (only with --save-steps); they carry the noise-stream state
      model/                 final weights (safetensors) + tokenizer; written to a temp folder, then renamed
      metrics.json           train / held-out metrics and the log history (written last)
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ._io import atomic_dir, atomic_write_json, atomic_write_text
from ._meta import versions
from .config import TrainConfig

logger = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """A run that cannot start or finish, with a message meant for the user (no stack trace needed)."""


def _prepare_output_dir(cfg: TrainConfig, *, is_main: bool = True) -> Path:
    """The folder this run writes to (a staging folder when it replaces a finished run; see run_folder)."""
    from .run_folder import RunFolderError, prepare

    if cfg.output_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.output_dir = os.path.join("outputs", f"{cfg.method.replace('+', '-')}-{stamp}")
    out = Path(cfg.output_dir)
    if (
        not is_main
    ):  # rank 0 prepares the folder; the other ranks only write their own checkpoint files into it
        stage = out.parent / f".{out.name}.staging"
        return stage if stage.exists() else out
    try:
        return prepare(
            out, overwrite=cfg.overwrite_output_dir, resuming=cfg.resume_from_checkpoint is not None
        )
    except RunFolderError as exc:
        raise TrainError(str(exc)) from exc


def _training_args(cfg: TrainConfig, out: Path):
    """The task's TRL config (SFTConfig, DPOConfig or KTOConfig) from the settings, ``--sft-arg`` on top."""
    import dataclasses

    import torch

    from .tasks import double_noise_error, task_arguments, trl_config_class

    cls = trl_config_class(cfg.task)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(cfg.sft_args) - known)
    if unknown:
        raise TrainError(f"sft_args: unknown trl.{cls.__name__} argument(s) {', '.join(unknown)}")
    if double_noise_error(cfg):
        raise TrainError(double_noise_error(cfg))
    kwargs: dict[str, Any] = {
        "output_dir": str(out / "checkpoints"),
        "max_length": cfg.max_length,
        **task_arguments(cfg),
        "num_train_epochs": cfg.num_train_epochs,
        "max_steps": cfg.max_steps,
        "per_device_train_batch_size": cfg.per_device_train_batch_size,
        "per_device_eval_batch_size": cfg.per_device_train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler_type": cfg.lr_scheduler_type,
        "warmup_steps": cfg.warmup_steps,
        "weight_decay": cfg.weight_decay,
        "seed": cfg.seed,
        "logging_steps": cfg.logging_steps,
        "logging_first_step": True,
        "save_strategy": "steps" if cfg.save_steps else "no",
        "save_steps": cfg.save_steps or 500,
        "eval_strategy": "no",
        "report_to": "none",  # TensorBoard is wired explicitly below, into <output_dir>/tensorboard
        "bf16": _use_bf16(cfg),
        # no accelerator: say so, or transformers refuses bf16 and torchrun forms no CPU process group
        "use_cpu": not torch.cuda.is_available(),
        "activation_checkpointing": cfg.gradient_checkpointing,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    if cfg.gradient_checkpointing:
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    _check_sft_arg_types(cfg.sft_args, cls)
    if cfg.sft_args.get("fsdp") and not torch.cuda.is_available():
        # accelerate (1.15) turns FSDP on only for multi-accelerator runs: on CPU the run would silently be DDP
        raise TrainError(
            "sft_args fsdp: accelerate runs FSDP on GPUs only (on CPU it would silently train as plain DDP); "
            "drop the fsdp arguments on CPU (torchrun alone gives DDP)"
        )
    kwargs.update(cfg.sft_args)
    try:
        args = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainError(f"invalid training arguments: {exc}") from exc
    if args.deepspeed and args.use_cpu and args.world_size > 1:
        # transformers' CPU path starts torch.distributed but not DeepSpeed's own layer, so ZeRO-3's zero.Init
        # (inside from_pretrained) would see one process; on GPUs accelerate starts it
        import deepspeed

        deepspeed.init_distributed(dist_backend="gloo")
    return args


def _check_sft_arg_types(sft_args: dict[str, Any], cls: type) -> None:
    """``--sft-arg KEY=VALUE`` values against the TRL config's field types (the simple ones: numbers, booleans,
    strings), so a wrong type fails here and not inside the training loop."""
    import typing

    from .settings import SettingsError, convert

    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an annotation transformers cannot resolve here: leave the check to SFTConfig
        return
    simple = {bool, int, float, str}
    for key, value in sft_args.items():
        tp = hints.get(key)
        args = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_args(tp) else [tp]
        if not args or not all(a in simple for a in args):
            continue
        try:
            if len(args) == 1:
                convert(value, tp, where=f"--sft-arg {key}")
            elif not any(_accepts(a, value) for a in args):
                raise SettingsError(
                    f"--sft-arg {key} expects {' or '.join(a.__name__ for a in args)}, got {value!r}"
                )
        except SettingsError as exc:
            raise TrainError(str(exc)) from None


def _accepts(tp: type, value: Any) -> bool:
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def _peft_config(cfg: TrainConfig):
    if not cfg.lora:
        return None
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    target_modules = "all-linear" if targets == ["all-linear"] else list(targets)
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )


def _save_final_model(trainer, tokenizer, model_dir: Path, stamp: dict[str, Any]) -> None:
    """Write the trained model as a plain transformers folder, atomically (a killed run leaves no half model),
    with the run's identity stamp inside."""
    from ._torch import unwrap_model
    from .run_folder import MODEL_STAMP

    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):  # PEFT: merge the adapters so from_pretrained loads a full model
        model = model.merge_and_unload()
    model = unwrap_model(model)
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(Path(tmp) / MODEL_STAMP, stamp)


def _load_data(cfg: TrainConfig, tokenizer, out: Path) -> tuple[Any, Any, dict[str, Any]]:
    """The training set and the held-out set (None when there is none), and their data reports."""
    from .data import BadRecordsError, build_sft_dataset

    if cfg.task != "sft":
        return _load_preference_data(cfg)
    common = dict(
        template=cfg.template,
        format=cfg.data_format,
        split="train",
        max_length=cfg.max_length,
        completion_only_loss=cfg.completion_only_loss,
        skip_bad_records=cfg.resolved_skip_bad_records(),
    )
    reports: dict[str, Any] = {}
    eval_ds = None
    try:
        train_ds, report = build_sft_dataset(cfg.data, tokenizer, limit=cfg.max_examples, **common)
        reports["train"] = report.to_dict()
        eval_source = cfg.resolved_eval_data()
        if eval_source is not None:
            eval_ds, report = build_sft_dataset(eval_source, tokenizer, limit=cfg.eval_max_examples, **common)
            reports["eval"] = report.to_dict()
    except BadRecordsError as exc:
        raise TrainError(f"{exc}\n(pass --skip-bad-records to skip these records and report them)") from exc
    except (OSError, ValueError) as exc:
        raise TrainError(f"could not load data: {exc}") from exc
    if len(train_ds) == 0:
        raise TrainError(f"no training examples left in {cfg.data} (see {out / 'data_report.json'})")
    for name, rep in reports.items():
        logger.info(
            "%s data: %d examples, %d tokens (%d with loss); %d bad records skipped %s; %d truncated to %d tokens; "
            "%d dropped with no response token left",
            name,
            rep["n_examples"],
            rep["n_tokens"],
            rep["n_response_tokens"],
            rep["n_bad"],
            rep["bad_by_kind"] or "",
            rep["n_truncated"],
            cfg.max_length,
            rep["n_no_response_after_truncation"],
        )
    return train_ds, eval_ds, reports


def _load_preference_data(cfg: TrainConfig) -> tuple[Any, Any, dict[str, Any]]:
    """Preference records as TRL's DPO / KTO trainers take them (they tokenize); reports count records here and
    tokens once the trainer has tokenized them (:func:`_count_preference_tokens`)."""
    from .data import BadRecordsError
    from .preference_data import build_preference_dataset

    common = dict(task=cfg.task, skip_bad_records=cfg.resolved_skip_bad_records())
    reports: dict[str, Any] = {}
    eval_ds = None
    try:
        train_ds, report = build_preference_dataset(cfg.data, limit=cfg.max_examples, **common)
        reports["train"] = report
        if cfg.resolved_eval_data() is not None:
            eval_ds, reports["eval"] = build_preference_dataset(
                cfg.resolved_eval_data(), limit=cfg.eval_max_examples, **common
            )
    except BadRecordsError as exc:
        raise TrainError(f"{exc}\n(pass --skip-bad-records to skip these records and report them)") from exc
    except (OSError, ValueError) as exc:
        raise TrainError(f"could not load data: {exc}") from exc
    return train_ds, eval_ds, reports


def _count_preference_tokens(cfg: TrainConfig, trainer, reports: dict[str, Any]) -> dict[str, Any]:
    """The data reports (as dicts) with the token counts of the trainer's tokenized sets; an empty one fails."""
    from .preference_data import count_tokens

    for name, dataset in (("train", trainer.train_dataset), ("eval", trainer.eval_dataset)):
        if name in reports:
            count_tokens(reports[name], dataset, cfg.max_length, reports[name].n_examples)
    if len(trainer.train_dataset) == 0:
        raise TrainError(
            f"no training example of {cfg.data} keeps a reply within max_length={cfg.max_length}"
        )
    return {name: report.to_dict() for name, report in reports.items()}


def _load_model(cfg: TrainConfig):
    from .models import load_model_and_tokenizer

    try:
        return load_model_and_tokenizer(
            cfg.model,
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
        )
    except (OSError, ValueError) as exc:
        raise TrainError(f"could not load model {cfg.model!r}: {exc}") from exc


def _metrics(
    cfg: TrainConfig, trainer, train_output, started: float, reports: dict[str, Any]
) -> dict[str, Any]:
    metrics: dict[str, Any] = {"train": dict(train_output.metrics)}
    if trainer.eval_dataset is not None:
        # noise-free: evaluate() runs the model in eval mode under no_grad, and the hooks are detached by now
        metrics["eval"] = trainer.evaluate()
    methods = trainer.noisyft_summary()
    metrics.update(
        {
            "task": cfg.task,
            "method": cfg.method,
            "methods": methods,
            **{name: methods.get(name) for name in ("neftune", "noisytune", "fisher")},
            "data": reports,
            "log_history": trainer.state.log_history,
            "device": str(trainer.args.device),
            "precision": "bf16 mixed"
            if trainer.args.bf16
            else ("fp16 mixed" if trainer.args.fp16 else "fp32"),
            "world_size": trainer.args.world_size,
            "wall_time_s": round(time.time() - started, 2),
            "versions": versions(),
        }
    )
    return metrics


def _resume_point(cfg: TrainConfig, out: Path) -> str | None:
    """The checkpoint to resume from: ``last`` is the last *complete* one (a partial one is skipped, logged)."""
    from .checkpoints import resolve_resume

    try:
        return resolve_resume(out, cfg.resume_from_checkpoint)
    except ValueError as exc:
        raise TrainError(str(exc)) from exc


def _use_bf16(cfg: TrainConfig) -> bool:
    """``bf16: null`` (auto): bf16 mixed precision where the hardware does bf16 matrix products natively (a CUDA
    GPU with bf16, or a CPU with AMX), fp32 elsewhere. Weights and optimizer state stay fp32 either way."""
    import torch

    if cfg.bf16 is not None:
        return cfg.bf16
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    amx = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool(amx and amx())


def _build_trainer(cfg: TrainConfig, out: Path, model, tokenizer, args, train_ds, eval_ds, *, is_main: bool):
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    from .methods.base import MethodSetupError
    from .tasks import trainer_class

    callbacks = None
    if is_main:
        tensorboard = TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(out / "tensorboard")))
        # where it reopens after train(), for the held-out loss
        tensorboard.logging_dir = str(out / "tensorboard")
        callbacks = [tensorboard]
    try:
        return trainer_class(cfg.task)(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=tokenizer,
            peft_config=_peft_config(cfg),
            callbacks=callbacks,
            fisher_diagnostic_steps=cfg.fisher_diagnostic_steps,
            **cfg.method_configs(),
        )
    except MethodSetupError as exc:
        raise TrainError(str(exc)) from exc
    except ValueError as exc:
        if cfg.task == "sft":
            raise
        # TRL's preference trainers check their arguments here (e.g. KTO's sampling strategy, set by --sft-arg)
        raise TrainError(f"{trainer_class(cfg.task).__name__}: {exc}") from exc


def _check_data(cfg: TrainConfig) -> None:
    """Read and validate every record (no tokenizer needed) so a bad file fails in seconds, not after the model
    has loaded. The tokenized datasets are built later from the same records."""
    from .data import BadRecordsError, load_conversations
    from .preference_data import load_preference_records

    def load(source, limit):
        skip = cfg.resolved_skip_bad_records()
        if cfg.task == "sft":
            return load_conversations(source, format=cfg.data_format, skip_bad_records=skip, limit=limit)
        return load_preference_records(source, task=cfg.task, skip_bad_records=skip, limit=limit)

    sources = [(cfg.data, cfg.max_examples)]
    if cfg.resolved_eval_data() is not None:
        sources.append((cfg.resolved_eval_data(), cfg.eval_max_examples))
    for source, limit in sources:
        try:
            load(source, limit)
        except BadRecordsError as exc:
            raise TrainError(
                f"{exc}\n(pass --skip-bad-records to skip these records and report them)"
            ) from exc
        except (OSError, ValueError) as exc:
            raise TrainError(f"could not load data: {exc}") from exc


def _write_start(out: Path, cfg: TrainConfig) -> dict[str, Any]:
    """config.yaml and the run's identity (run.json), before anything heavy loads."""
    from .run_folder import RUN_FILE, new_run_id, sha256_text
    from .settings import to_yaml

    text = to_yaml(cfg)
    atomic_write_text(out / "config.yaml", text)
    run = {
        "run_id": new_run_id(),
        "config_sha256": sha256_text(text),
        "started": datetime.now().isoformat(timespec="seconds"),
        "versions": versions(),
    }
    atomic_write_json(out / RUN_FILE, run)
    return run


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    """Train one run into ``cfg.output_dir`` (see the module docstring for the folder layout)."""
    from .methods.base import MethodSetupError
    from .methods.fisher.penalty import FisherSetupError
    from .preference_data import fingerprint_records
    from .run_folder import RUN_FILE, fingerprint_examples, finish, model_stamp
    from .trainer import NonFiniteError

    started = time.time()
    is_main = int(os.environ.get("RANK", "0")) == 0
    work = _prepare_output_dir(cfg, is_main=is_main)
    final = Path(cfg.output_dir)
    run = _write_start(work, cfg) if is_main else {}
    args = _training_args(cfg, work)  # bad training arguments fail before anything heavy loads
    resume = _resume_point(cfg, work)
    _check_data(cfg)  # bad records fail before the model loads
    model, tokenizer = _load_model(cfg)
    train_ds, eval_ds, reports = _load_data(cfg, tokenizer, work)
    trainer = _build_trainer(cfg, work, model, tokenizer, args, train_ds, eval_ds, is_main=is_main)
    if cfg.task != "sft":  # TRL tokenized the preference data while the trainer was built
        reports = _count_preference_tokens(cfg, trainer, reports)
    if is_main:
        sft = cfg.task == "sft"
        run["train_data_sha256"] = (fingerprint_examples if sft else fingerprint_records)(train_ds)
        run["precision"] = "bf16 mixed" if args.bf16 else "fp32"
        atomic_write_json(work / RUN_FILE, run)
        atomic_write_json(work / "data_report.json", reports)
    try:
        train_output = trainer.train(resume_from_checkpoint=resume)
    except (FisherSetupError, MethodSetupError, NonFiniteError) as exc:
        raise TrainError(str(exc)) from exc

    metrics = _metrics(cfg, trainer, train_output, started, reports)
    if trainer.is_world_process_zero():
        metrics["run_id"] = run["run_id"]
        noisytune = trainer.plugin("noisytune")
        if noisytune is not None:
            noisytune.save_report(str(work / "noisytune_report.json"))
        _save_final_model(trainer, tokenizer, work / "model", model_stamp(run))
        with contextlib.suppress(OSError):  # the trainer creates it even when it saves no checkpoint
            (work / "checkpoints").rmdir()
        atomic_write_json(work / "metrics.json", metrics)
        finish(work, final)
    summary = {
        "train_loss": round(metrics["train"].get("train_loss", float("nan")), 4),
        "steps": trainer.state.global_step,
        "wall_time_s": metrics["wall_time_s"],
    }
    if "eval" in metrics:
        summary["heldout_loss"] = round(metrics["eval"].get("eval_loss", float("nan")), 4)
    return {
        "output_dir": str(final),
        "model_dir": str(final / "model"),
        "config_path": str(final / "config.yaml"),
        "metrics_path": str(final / "metrics.json"),
        "tensorboard_dir": str(final / "tensorboard"),
        "summary": summary,
    }
