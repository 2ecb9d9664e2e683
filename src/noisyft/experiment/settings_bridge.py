"""The one place where `noisyft experiment` touches the train / eval settings classes.

The experiment spec holds nested settings (``{"method": "neftune", "neftune": {"alpha": 5}}``), the same keys
as a ``noisyft train --config`` file. They are checked here by building the real settings objects, so a typo
fails before anything runs, with the settings layer's own "Did you mean ...?" message.

With :mod:`noisyft.settings` (issue 8) present this is a thin wrapper over ``settings.build`` and
``settings.leaf_paths``. Without it (a checkout from before the settings layer), nested method sections are
flattened to the old prefixed fields (``neftune.alpha`` -> ``neftune_alpha``) and checked with
:func:`noisyft.config.check_keys`.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping
from typing import Any


def _settings_module() -> Any | None:
    try:
        return importlib.import_module("noisyft.settings")
    except ImportError:
        return None


def _flat_train_fields() -> dict[str, Any]:
    from noisyft.config import TrainConfig

    return {f.name: f.type for f in dataclasses.fields(TrainConfig)}


def train_leaf_paths() -> dict[str, Any]:
    """Dotted train setting name -> its type (a type object or its annotation string)."""
    settings = _settings_module()
    if settings is not None:
        from noisyft.config import TrainConfig

        return dict(settings.leaf_paths(TrainConfig))
    out = {}
    for name, typ in _flat_train_fields().items():
        section = name.split("_", 1)[0]
        out[f"{section}.{name.split('_', 1)[1]}" if section in _FLAT_SECTIONS else name] = typ
    return out


_FLAT_SECTIONS = ("neftune", "noisytune", "fisher")


def method_parts(method: Any, *, where: str) -> tuple[str, ...]:
    """The methods a ``method`` setting combines (``"noisytune+neftune"`` -> both); ValueError if unknown."""
    if not isinstance(method, str):
        raise ValueError(f"{where}: method must be a string such as 'neftune', got {method!r}")
    try:
        methods = importlib.import_module("noisyft.methods")
    except ImportError:
        from noisyft.config import METHODS

        if method not in METHODS:
            raise ValueError(f"{where}: method must be one of {', '.join(METHODS)}; got {method!r}") from None
        return tuple(p for p in method.split("+") if p != "none")
    try:
        return tuple(p for p in methods.parse_method(method) if p != "none")
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None


def method_sections() -> set[str]:
    """Names of the nested method sections of the train settings (``neftune``, ``noisytune``, ...)."""
    sections = {path.split(".", 1)[0] for path in train_leaf_paths() if "." in path}
    out = set()
    for name in sections:
        try:
            method_parts(name, where="")
        except ValueError:
            continue
        out.add(name)
    return out


def _flatten_for_old_config(data: Mapping[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in _FLAT_SECTIONS and isinstance(value, Mapping):
            flat.update({f"{key}_{k}": v for k, v in value.items()})
        else:
            flat[key] = value
    return flat


def build_train(data: Mapping[str, Any], *, where: str) -> Any:
    """A train settings object from nested settings; ValueError naming ``where`` and the bad key."""
    from noisyft.config import TrainConfig

    settings = _settings_module()
    if settings is not None:
        return settings.build(TrainConfig, dict(data), where=where)
    from noisyft.config import check_keys

    flat = _flatten_for_old_config(data)
    check_keys(flat, where=where, cls=TrainConfig, command="train")
    try:
        return TrainConfig(**flat)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def build_eval(data: Mapping[str, Any], *, where: str) -> Any:
    """An eval settings object (``noisyft eval run``); ValueError naming ``where`` and the bad key."""
    from noisyft.eval.config import EvalConfig

    settings = _settings_module()
    if settings is not None:
        return settings.build(EvalConfig, dict(data), where=where)
    from noisyft.config import check_keys

    values = dict(data)
    if isinstance(values.get("analyses"), list):
        values["analyses"] = ",".join(str(a) for a in values["analyses"])
    if isinstance(values.get("heldout"), list):
        values["heldout"] = ",".join(str(a) for a in values["heldout"])
    check_keys(values, where=where, cls=EvalConfig, command="eval run")
    try:
        return EvalConfig(**values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {exc}") from None


def eval_file_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """Eval settings as a ``--config`` file of this checkout's ``noisyft eval run`` reads them."""
    if _settings_module() is not None:
        return dict(data)
    values = dict(data)
    for key in ("analyses", "heldout"):
        if isinstance(values.get(key), list):
            values[key] = ",".join(str(a) for a in values[key])
    return values


def train_file_settings(data: Mapping[str, Any]) -> dict[str, Any]:
    """Train settings as a ``--config`` file of this checkout's ``noisyft train`` reads them."""
    if _settings_module() is not None:
        return dict(data)
    return _flatten_for_old_config(data)
