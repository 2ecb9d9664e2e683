"""The one place where `noisyft experiment` touches the train / eval settings classes.

The experiment spec holds nested settings (``{"method": "neftune", "neftune": {"alpha": 5}}``), the same keys
as a ``noisyft train --config`` file. They are checked here by building the real settings objects through the
settings layer, so a typo fails before anything runs, with its "Did you mean ...?" message.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from noisyft import settings
from noisyft.methods import REGISTRY, parse_method


def train_leaf_paths() -> dict[str, Any]:
    """Dotted train setting name (``max_steps``, ``neftune.alpha``) -> its type."""
    from noisyft.config import TrainConfig

    return dict(settings.leaf_paths(TrainConfig))


def method_parts(method: Any, *, where: str) -> tuple[str, ...]:
    """The methods a ``method`` setting combines (``"noisytune+neftune"`` -> both); ValueError if unknown."""
    try:
        return parse_method(method)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def method_sections() -> set[str]:
    """Names of the nested method sections of the train settings (``neftune``, ``noisytune``, ...)."""
    return set(REGISTRY)


def build_train(data: Mapping[str, Any], *, where: str) -> Any:
    """A train settings object from nested settings; ValueError naming ``where`` and the bad key."""
    from noisyft.config import TrainConfig

    return settings.build(TrainConfig, dict(data), where=where)


def build_eval(data: Mapping[str, Any], *, where: str) -> Any:
    """An eval settings object (``noisyft eval run``); ValueError naming ``where`` and the bad key."""
    from noisyft.eval.config import EvalConfig

    return settings.build(EvalConfig, dict(data), where=where)


def eval_file_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """Eval settings as a ``--config`` file of ``noisyft eval run`` reads them."""
    return dict(data)


def train_file_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """Train settings as a ``--config`` file of ``noisyft train`` reads them."""
    return dict(data)
