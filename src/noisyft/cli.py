"""The `noisyft` command line: ``main(argv) -> int`` so tests call it directly.

    noisyft train                          # the embedded default run (SmolLM2 + ShareGPT slice, NEFTune alpha 5)
    noisyft train --config configs/neftune.yaml --neftune-alpha 10
    noisyft train --help                   # every option, with its default

Heavy libraries (torch, transformers, TRL) load inside the command, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Any

from . import __version__
from .config import TrainConfig, check_keys, config_fields, load_yaml_config

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


def _convert(name: str, type_str: str, value: Any, *, where: str) -> Any:
    """Coerce a YAML value or a flag string to the field's type; raise ValueError naming where it came from."""
    optional = "None" in type_str
    base = type_str.replace("| None", "").replace("None |", "").strip()
    if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and optional):
        if optional:
            return None
        raise ValueError(f"{where}: {name} cannot be empty")
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
                return value.lower() in _TRUE
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base == "str":
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if base.startswith("dict"):
            if not isinstance(value, dict):
                raise ValueError
            return value
    except (TypeError, ValueError):
        pass
    raise ValueError(f"{where}: {name} expects {base}{' or none' if optional else ''}, got {value!r}")


def _parse_kv(text: str) -> tuple[str, Any]:
    import yaml

    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, raw = text.split("=", 1)
    return key.strip(), yaml.safe_load(raw)


def add_config_arguments(
    parser: argparse.ArgumentParser, cls: type = TrainConfig, *, positional: str | None = None
) -> None:
    """One flag per dataclass field (``--max-length``), with its help and default; ``positional`` is a field
    taken as an optional positional argument instead."""
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings (flags override it)")
    for name, f in config_fields(cls).items():
        if name == positional:
            default = f.default
            parser.add_argument(
                name, nargs="?", default=None, help=f"{f.metadata.get('help', '')} (default: {default})"
            )
            continue
        flag = "--" + name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f"{f.metadata.get('help', '')} (default: {default})"
        if name == "sft_args":
            parser.add_argument(
                "--sft-arg",
                dest="sft_args",
                action="append",
                type=_parse_kv,
                metavar="KEY=VALUE",
                help=help_text,
            )
        elif str(f.type).replace("| None", "").strip() == "bool":
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(
                flag, dest=name, default=None, metavar=name.split("_")[-1].upper(), help=help_text
            )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="noisyft",
        description="Noise-regularized instruction fine-tuning: NEFTune (per-sequence scale), NoisyTune, "
        "Fisher penalties (token-F, logit-F), and the papers' evaluations.",
    )
    parser.add_argument("--version", action="version", version=f"noisyft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="fine-tune a model (defaults: embedded SmolLM2 + ShareGPT slice, NEFTune alpha 5)",
        description="Fine-tune a causal LM with NEFTune and/or NoisyTune on TRL's SFTTrainer. With no options it "
        "runs the embedded default: SmolLM2-135M-Instruct on a slice of ShareGPT with NEFTune alpha 5.",
    )
    add_config_arguments(train)
    from .eval.cli import add_eval_parser

    add_eval_parser(sub)
    return parser


def resolve_train_config(ns: argparse.Namespace, cls: type = TrainConfig, command: str = "train") -> Any:
    """YAML file (if any) as defaults, then every flag given on the command line on top."""
    values: dict[str, Any] = {}
    fields = config_fields(cls)
    if ns.config:
        for key, value in load_yaml_config(ns.config, cls=cls, command=command).items():
            values[key] = _convert(key, str(fields[key].type), value, where=ns.config)
    for name, f in fields.items():
        given = getattr(ns, name, None)
        if given is None:
            continue
        if name == "sft_args":
            merged = dict(values.get("sft_args", {}))
            merged.update(dict(given))
            values["sft_args"] = merged
        else:
            values[name] = _convert(name, str(f.type), given, where="--" + name.replace("_", "-"))
    check_keys(values, where="settings", cls=cls, command=command)
    return cls(**values)


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers.configuration_utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    if ns.command == "eval":
        from .eval.cli import run_eval_command

        _setup_logging()
        return run_eval_command(ns, parser)
    if ns.command == "train":
        try:
            cfg = resolve_train_config(ns)
        except ValueError as exc:
            print(f"noisyft train: error: {exc}", file=sys.stderr)
            return 2
        _setup_logging()
        from .recipe import TrainError, run_train

        try:
            result = run_train(cfg)
        except TrainError as exc:
            print(f"noisyft train: error: {exc}", file=sys.stderr)
            return 1
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
    parser.error(f"unknown command {ns.command}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
