"""`noisyft train`: fine-tune a model with the chosen noise methods (defaults: the embedded run)."""

from __future__ import annotations

import argparse
import os
from datetime import datetime

from noisyft import _cli
from noisyft.config import TrainConfig, migrate_legacy
from noisyft.settings import add_arguments

DESCRIPTION = (
    "Fine-tune a causal LM with noise regularizers on TRL's SFTTrainer (--task dpo / kto: DPOTrainer / KTOTrainer "
    "on a preference file). With no options it runs the embedded "
    "default: SmolLM2-135M-Instruct on a slice of ShareGPT with NEFTune alpha 5. Method settings are YAML "
    "sections or dotted flags: --method noisytune+neftune --neftune.alpha 10 --noisytune.lambda 0.15."
)


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "train",
        help="fine-tune a model (defaults: embedded SmolLM2 + ShareGPT slice, NEFTune alpha 5)",
        description=DESCRIPTION,
    )
    add_arguments(parser, TrainConfig)


def _default_output_dir(cfg: TrainConfig) -> None:
    if cfg.output_dir is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.output_dir = os.path.join("outputs", f"{cfg.method.replace('+', '-')}-{stamp}")


def run(ns: argparse.Namespace) -> int:
    cfg, code = _cli.settings_or_exit(
        "train", ns, TrainConfig, migrate=migrate_legacy, finalize=_default_output_dir
    )
    if cfg is None:
        return code
    _cli.setup_logging()
    from noisyft._torch import end_process_group
    from noisyft.recipe import TrainError, run_train

    ok = False
    try:
        result = run_train(cfg)
        ok = True
    except TrainError as exc:
        return _cli.fail("train", exc)
    finally:
        end_process_group(wait=ok)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun / accelerate: one summary, from rank 0
        return 0
    print()
    print(f"Run folder:  {result['output_dir']}")
    print(f"  model:     {result['model_dir']}  (AutoModelForCausalLM.from_pretrained)")
    print(f"  config:    {result['config_path']}")
    print(f"  metrics:   {result['metrics_path']}")
    print(f"  logs:      {result['tensorboard_dir']}  (tensorboard --logdir ...)")
    summary = result.get("summary", {})
    if summary:
        print("  " + ", ".join(f"{k}={v}" for k, v in summary.items()))
    return 0
