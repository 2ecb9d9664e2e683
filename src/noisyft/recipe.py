"""The `noisyft train` recipe: one readable function from a TrainConfig to a finished run folder.

Run folder layout (everything a later report needs, as files)::

    <output_dir>/
      config.yaml            resolved settings + library versions (written first)
      data_report.json       records read / skipped (and why) / truncated, per data set
      noisytune_report.json  per-tensor std and relative change (NoisyTune runs)
      tensorboard/           TensorBoard event files (loss, lr, neftune/noise_to_embed_norm, ...)
      checkpoints/           trainer checkpoints (only with --save-steps); they carry the noise-stream state
      model/                 final weights (safetensors) + tokenizer; written to a temp folder, then renamed
      metrics.json           train / held-out metrics and the log history (written last)
"""

from __future__ import annotations

import logging
import os
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ._io import atomic_dir, atomic_write_json, atomic_write_text
from .config import TrainConfig

logger = logging.getLogger(__name__)


class TrainError(RuntimeError):
    """A run that cannot start or finish, with a message meant for the user (no stack trace needed)."""


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for pkg in ("noisyft", "torch", "transformers", "trl", "peft", "accelerate", "datasets"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _prepare_output_dir(cfg: TrainConfig) -> Path:
    if cfg.output_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.output_dir = os.path.join("outputs", f"{cfg.method.replace('+', '-')}-{stamp}")
    out = Path(cfg.output_dir)
    resuming = cfg.resume_from_checkpoint is not None
    ours = {"config.yaml", "data_report.json", "noisytune_report.json", "tensorboard"}
    if out.exists() and not (cfg.overwrite_output_dir or resuming):
        present = {p.name for p in out.iterdir()}
        if present - ours:
            raise TrainError(
                f"output folder {out} already holds {', '.join(sorted(present - ours))}; pass "
                "--overwrite-output-dir or --resume-from-checkpoint, or choose another --output-dir"
            )
        if present:
            logger.warning(
                "%s holds files of an unfinished run (%s); they are replaced", out, ", ".join(sorted(present))
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def _sft_config(cfg: TrainConfig, out: Path):
    import dataclasses

    import torch
    from trl import SFTConfig

    known = {f.name for f in dataclasses.fields(SFTConfig)}
    unknown = sorted(set(cfg.sft_args) - known)
    if unknown:
        raise TrainError(f"sft_args: unknown trl.SFTConfig argument(s) {', '.join(unknown)}")
    if "neftune_noise_alpha" in cfg.sft_args and cfg.uses_neftune:
        raise TrainError(
            "sft_args sets transformers' neftune_noise_alpha while --method uses noisyft's NEFTune: the noise would "
            "be applied twice. Use --neftune-scale padded to reproduce transformers' scaling instead."
        )
    kwargs: dict[str, Any] = {
        "output_dir": str(out / "checkpoints"),
        "max_length": cfg.max_length,
        "packing": cfg.packing,
        "packing_strategy": cfg.packing_strategy,
        "padding_free": cfg.padding_free,
        # our data set carries `assistant_masks`, which TRL always applies; completion_only_loss is for its
        # prompt/completion format and must stay off here
        "completion_only_loss": False,
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
        "bf16": cfg.bf16,
        "activation_checkpointing": cfg.gradient_checkpointing,
        "dataloader_num_workers": 0,
        "dataloader_pin_memory": torch.cuda.is_available(),
    }
    if cfg.gradient_checkpointing:
        kwargs["activation_checkpointing_kwargs"] = {"use_reentrant": False}
    kwargs.update(cfg.sft_args)
    try:
        return SFTConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise TrainError(f"invalid training arguments: {exc}") from exc


def _peft_config(cfg: TrainConfig):
    if not cfg.lora:
        return None
    from peft import LoraConfig

    targets = cfg.lora_target_modules
    target_modules = (
        targets if targets == "all-linear" else [t.strip() for t in targets.split(",") if t.strip()]
    )
    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target_modules,
        task_type="CAUSAL_LM",
    )


def _save_final_model(trainer, tokenizer, model_dir: Path) -> None:
    """Write the trained model as a plain transformers folder, atomically (a killed run leaves no half model)."""
    from .regularizers.neftune import unwrap_model

    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):  # PEFT: merge the adapters so from_pretrained loads a full model
        model = model.merge_and_unload()
    model = unwrap_model(model)
    with atomic_dir(model_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)


def run_train(cfg: TrainConfig) -> dict[str, Any]:
    import yaml
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    from .data import BadRecordsError, build_sft_dataset
    from .models import load_model_and_tokenizer
    from .regularizers.fisher import FisherConfig, FisherSetupError
    from .regularizers.neftune import NEFTuneConfig
    from .regularizers.noisytune import NoisyTuneConfig
    from .trainer import NoisySFTTrainer

    started = time.time()
    out = _prepare_output_dir(cfg)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main:
        resolved = {
            **cfg.to_dict(),
            "_versions": _versions(),
            "_started": datetime.now().isoformat(timespec="seconds"),
        }
        atomic_write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))

    # -- method configs first: bad settings fail before anything heavy loads
    try:
        neftune = (
            NEFTuneConfig(
                alpha=cfg.neftune_alpha,
                distribution=cfg.neftune_distribution,
                scale=cfg.neftune_scale,
                response_only=cfg.neftune_response_only,
                use_global_rng=cfg.neftune_global_rng,
            )
            if cfg.uses_neftune
            else None
        )
        noisytune = (
            NoisyTuneConfig(
                lam=cfg.noisytune_lambda,
                distribution=cfg.noisytune_distribution,
                mode=cfg.noisytune_mode,
                include=cfg.noisytune_include,
                exclude=cfg.noisytune_exclude,
            )
            if cfg.uses_noisytune
            else None
        )
        fisher = (
            FisherConfig(
                kind=cfg.fisher_kind,
                coef=cfg.fisher_coef,
                warmup_steps=cfg.fisher_warmup_steps,
                num_samples=cfg.fisher_num_samples,
                sampling=cfg.fisher_sampling,
                probability=cfg.fisher_probability,
            )
            if cfg.uses_fisher
            else None
        )
    except ValueError as exc:
        raise TrainError(str(exc)) from exc
    args = _sft_config(cfg, out)

    # -- model and data
    try:
        model, tokenizer = load_model_and_tokenizer(
            cfg.model,
            dtype=cfg.dtype,
            trust_remote_code=cfg.trust_remote_code,
            attn_implementation=cfg.attn_implementation,
        )
    except (OSError, ValueError) as exc:
        raise TrainError(f"could not load model {cfg.model!r}: {exc}") from exc

    skip_bad = cfg.resolved_skip_bad_records()
    reports: dict[str, Any] = {}
    try:
        train_ds, train_report = build_sft_dataset(
            cfg.data,
            tokenizer,
            template=cfg.template,
            format=cfg.data_format,
            split="train",
            max_length=cfg.max_length,
            completion_only_loss=cfg.completion_only_loss,
            skip_bad_records=skip_bad,
            limit=cfg.max_examples,
        )
        reports["train"] = train_report.to_dict()
        eval_ds = None
        eval_source = cfg.resolved_eval_data()
        if eval_source is not None:
            eval_ds, eval_report = build_sft_dataset(
                eval_source,
                tokenizer,
                template=cfg.template,
                format=cfg.data_format,
                split="train",
                max_length=cfg.max_length,
                completion_only_loss=cfg.completion_only_loss,
                skip_bad_records=skip_bad,
                limit=cfg.eval_max_examples,
            )
            reports["eval"] = eval_report.to_dict()
    except BadRecordsError as exc:
        raise TrainError(f"{exc}\n(pass --skip-bad-records to skip these records and report them)") from exc
    except (OSError, ValueError) as exc:
        raise TrainError(f"could not load data: {exc}") from exc
    if len(train_ds) == 0:
        raise TrainError(f"no training examples left in {cfg.data} (see {out / 'data_report.json'})")
    if is_main:
        atomic_write_json(out / "data_report.json", reports)
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

    tb_dir = out / "tensorboard"
    trainer = NoisySFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=_peft_config(cfg),
        callbacks=[TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(tb_dir)))] if is_main else None,
        neftune=neftune,
        noisytune=noisytune,
        fisher=fisher,
        fisher_diagnostic_steps=cfg.fisher_diagnostic_steps,
    )
    resume = cfg.resume_from_checkpoint
    try:
        train_output = trainer.train(resume_from_checkpoint=True if resume == "last" else resume)
    except FisherSetupError as exc:
        raise TrainError(str(exc)) from exc

    metrics: dict[str, Any] = {"train": dict(train_output.metrics)}
    if eval_ds is not None:
        # noise-free: evaluate() runs the model in eval mode under no_grad, and the hook is detached by now
        metrics["eval"] = trainer.evaluate()
    model_dir = out / "model"
    if trainer.is_world_process_zero():
        if trainer.noisytune_report is not None:
            trainer.save_noisytune_report(str(out / "noisytune_report.json"))
        _save_final_model(trainer, tokenizer, model_dir)
    history = trainer.state.log_history
    noise_stats = [h["neftune/noise_to_embed_norm"] for h in history if "neftune/noise_to_embed_norm" in h]
    metrics.update(
        {
            "method": cfg.method,
            "neftune": None
            if neftune is None
            else {
                **neftune.__dict__,
                "mean_noise_to_embed_norm": (sum(noise_stats) / len(noise_stats) if noise_stats else None),
            },
            "fisher": None if fisher is None else dict(fisher.__dict__),
            "noisytune": None
            if noisytune is None
            else {
                **noisytune.__dict__,
                "perturbed_tensors": sum(
                    1 for r in trainer.noisytune_report or [] if not getattr(r, "skipped", None)
                ),
            },
            "data": reports,
            "log_history": history,
            "device": str(trainer.args.device),
            "world_size": trainer.args.world_size,
            "wall_time_s": round(time.time() - started, 2),
            "versions": _versions(),
        }
    )
    if is_main:
        atomic_write_json(out / "metrics.json", metrics)
    summary = {
        "train_loss": round(metrics["train"].get("train_loss", float("nan")), 4),
        "steps": trainer.state.global_step,
        "wall_time_s": metrics["wall_time_s"],
    }
    if "eval" in metrics:
        summary["heldout_loss"] = round(metrics["eval"].get("eval_loss", float("nan")), 4)
    return {
        "output_dir": str(out),
        "model_dir": str(model_dir),
        "config_path": str(out / "config.yaml"),
        "metrics_path": str(out / "metrics.json"),
        "tensorboard_dir": str(tb_dir),
        "summary": summary,
    }
