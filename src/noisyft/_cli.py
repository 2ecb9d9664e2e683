"""Plumbing every command shares (below all command modules): logging set-up, the one place that turns expected
failures into one-line messages with a non-zero exit, and ``--print-config``."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from typing import Any

from .settings import SettingsError, resolve, to_yaml

USAGE_ERROR = 2  # bad settings: nothing was started
RUN_ERROR = 1  # the run started and could not finish


class UserError(RuntimeError):
    """A failure caused by the user's input (a file, a setting, a folder), reported as one line, no traceback."""


def setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "transformers.configuration_utils"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(command: str, message: Any, code: int = RUN_ERROR) -> int:
    text = " ".join(str(message).split("\n")[0:1]) if code == USAGE_ERROR else str(message)
    print(f"noisyft {command}: error: {text}", file=sys.stderr)
    return code


def settings_or_exit(
    command: str,
    ns: argparse.Namespace,
    cls: type,
    *,
    migrate=None,
    finalize: Callable[[Any], None] | None = None,
) -> tuple[Any, int | None]:
    """The resolved settings, or (None, exit code) after printing the error or the ``--print-config`` YAML.
    ``finalize`` fills in defaults decided at run time (a timestamped output folder), so the printed YAML is the
    text the run will record."""
    try:
        cfg = resolve(ns, cls, migrate=migrate)
    except SettingsError as exc:
        return None, fail(command, exc, USAGE_ERROR)
    if finalize is not None:
        finalize(cfg)
    if getattr(ns, "print_config", False):
        sys.stdout.write(to_yaml(cfg))
        return None, 0
    return cfg, None


def run_guarded(command: str, fn: Callable[[], int], errors: tuple[type[BaseException], ...]) -> int:
    """Run a command body; the listed exception types (user mistakes) become one line and exit code 1."""
    try:
        return fn()
    except errors as exc:
        return fail(command, exc)
