"""The `noisyft` command line: ``main(argv) -> int`` so tests call it directly.

    noisyft train                          # the embedded default run (SmolLM2 + ShareGPT slice, NEFTune alpha 5)
    noisyft train --config configs/neftune.yaml --neftune.alpha 10
    noisyft train --print-config           # the resolved settings as YAML, nothing run
    noisyft eval run outputs/neftune-...   # the papers' analyses on a run
    noisyft train --help                   # every option, with its default

This module only dispatches: each command is a leaf module in ``noisyft.commands``, all reading their settings
through ``noisyft.settings``. Heavy libraries (torch, transformers, TRL) load inside the commands, so ``--help``
is instant.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .commands import eval as eval_command
from .commands import train as train_command

COMMANDS = {"train": train_command, "eval": eval_command}


class _Parser(argparse.ArgumentParser):
    """argparse with a suggestion for a mistyped flag (``--neftune.alhpa`` -> ``--neftune.alpha``)."""

    def error(self, message: str):
        if message.startswith("unrecognized arguments:"):
            import difflib

            known = [o for a in self._all_actions() for o in a.option_strings]
            for arg in message.split(":", 1)[1].split():
                close = (
                    difflib.get_close_matches(arg.split("=")[0], known, n=2) if arg.startswith("--") else []
                )
                if close:
                    message += f" (did you mean {' or '.join(close)}?)"
                    break
        super().error(message)

    def _all_actions(self):
        actions = list(self._actions)
        for action in self._actions:
            if isinstance(action, argparse._SubParsersAction):
                for parser in action.choices.values():
                    actions += parser._all_actions() if isinstance(parser, _Parser) else parser._actions
        return actions


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="noisyft",
        description="Noise-regularized instruction fine-tuning: NEFTune (per-sequence scale), NoisyTune, "
        "Fisher penalties (token-F, logit-F), and the papers' evaluations.",
    )
    parser.add_argument("--version", action="version", version=f"noisyft {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for module in COMMANDS.values():
        module.add_parser(sub)
    # listed for --help; `noisyft experiment ...` is routed before parsing (it has its own parser)
    sub.add_parser(
        "experiment", help="seeded grids / searches of train + eval runs, paired statistics, an HTML report"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["experiment"]:  # its own parser (sub-commands run / work / report)
        from .experiment.cli import main as experiment_main

        return experiment_main(argv[1:])
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    return COMMANDS[ns.command].run(ns)


if __name__ == "__main__":
    sys.exit(main())
