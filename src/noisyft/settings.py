"""One settings layer for every command: typed dataclasses -> flags, YAML sections, validation, resolved YAML.

A command's settings are one dataclass (``TrainConfig``, ``EvalConfig``, ...). Its fields are plain values
(``bool``, ``int``, ``float``, ``str``, ``X | None``, ``list[...]``, ``dict[str, Any]``) or nested settings
dataclasses (a method's config: ``neftune: NEFTuneConfig | None``). From that one definition this module derives:

* flags: ``--max-length 256``, nested ``--neftune.alpha 5`` with the alias ``--neftune-alpha 5``, booleans as
  ``--packing / --no-packing``, lists repeated or comma-separated (``--analyses loss,lengths``), help text from
  ``field(metadata={"help": ...})`` and the default;
* YAML files with nested sections (``neftune: {alpha: 5, scale: sequence}``); unknown keys fail with the closest
  valid names;
* the resolved settings as YAML (:func:`to_yaml`), the text a run folder's ``config.yaml`` holds and that feeds
  back in unchanged (``--config``), also printed by ``--print-config``.

Values are checked once, where they are defined: each dataclass's ``__post_init__``. This module only converts
types. It imports nothing heavy, so ``--help`` is instant. Field metadata understood here: ``help``,
``aliases`` (other names of the field, e.g. NoisyTune's ``lam`` is also ``lambda``), ``positional``
(the field is a positional argument), ``flag`` (the flag's name when it differs, e.g. ``--sft-arg``).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import logging
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

logger = logging.getLogger(__name__)

_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}
_SEP = "."  # section separator in flag destinations and error messages


class SettingsError(ValueError):
    """A setting that cannot be read: unknown key, wrong type, missing value. One line, names where it came from."""


def _at(where: str) -> str:
    return f"{where}: " if where else ""


# -- type introspection ------------------------------------------------------------------------------------------
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), optional  # noqa: UP007
    return tp, False


def is_section(tp: Any) -> bool:
    base, _ = _unwrap_optional(tp)
    return dataclasses.is_dataclass(base) and isinstance(base, type)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def doc_help(cls: type) -> dict[str, str]:
    """Field help from the class docstring's ``Args:`` / ``Attributes:`` section (``name (type): text`` or
    ``a, b: text``, continuation lines indented), for dataclasses whose fields carry no ``help`` metadata."""
    import re

    out: dict[str, str] = {}
    current: list[str] = []
    in_args = False
    for line in (cls.__doc__ or "").splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Attributes:", "Arguments:"):
            in_args = True
            continue
        if not in_args:
            continue
        m = re.match(r"^\s{4,8}([A-Za-z_][\w, ]*?)\s*(\([^)]*\))?:\s*(.*)$", line)
        if m and len(line) - len(line.lstrip()) <= 8:
            current = [n.strip() for n in m.group(1).split(",")]
            for n in current:
                out[n] = m.group(3).strip()
        elif stripped and current:
            for n in current:
                out[n] = f"{out[n]} {stripped}".strip()
        elif not stripped and current:
            current = []
    return {k: v.split(". ")[0].rstrip(".") for k, v in out.items()}


def _names(f: dataclasses.Field) -> tuple[str, ...]:
    return (f.name, *f.metadata.get("aliases", ()))


def leaf_paths(cls: type, prefix: str = "") -> dict[str, Any]:
    """Every setting's dotted name (``max_steps``, ``neftune.alpha``) -> its type, sections expanded."""
    out: dict[str, Any] = {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_section(tp):
            out.update(leaf_paths(_unwrap_optional(tp)[0], prefix + f.name + _SEP))
        else:
            out[prefix + f.name] = tp
    return out


# -- conversion --------------------------------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert(value: Any, tp: Any, *, where: str) -> Any:
    """Coerce a YAML value or a flag string to ``tp``; raise :class:`SettingsError` naming ``where``."""
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.strip().lower() in ("none", "null")):
        if optional:
            return None
        raise SettingsError(f"{where} needs a value (got none)")
    origin = typing.get_origin(base)
    try:
        if base is Any:
            return value
        if base is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
                return value.strip().lower() in _TRUE
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value.strip()) if isinstance(value, str) else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if isinstance(value, (dict, list)):
                raise ValueError
            return str(value)
        if origin is list:
            (item,) = typing.get_args(base) or (Any,)
            items = split_list(value)
            if len(items) == 1 and isinstance(items[0], str) and items[0].lower() in ("none", "null"):
                return []  # `--heldout none`: an empty list
            return [convert(v, item, where=f"{where}[{i}]") for i, v in enumerate(items)]
        if origin is dict or base is dict:
            if not isinstance(value, Mapping):
                raise ValueError
            return dict(value)
    except SettingsError:
        raise
    except (TypeError, ValueError):
        pass
    want = _type_name(base) + (" or none" if optional else "")
    raise SettingsError(f"{where} expects {want}, got {value!r}")


def split_list(value: Any) -> list[Any]:
    """A list setting from YAML (a list, or a comma string) or flags (repeated and/or comma-separated)."""
    if isinstance(value, str):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, (list, tuple)):
        out: list[Any] = []
        for v in value:
            out.extend(split_list(v) if isinstance(v, str) and "," in v else [v])
        return out
    return [value]


# -- building ----------------------------------------------------------------------------------------------------
def _suggest(key: str, valid: list[str], prefix: str = "") -> str:
    """Close names compared without the section prefix (all of a section's names share it)."""
    close = difflib.get_close_matches(key, valid, n=3)
    return f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""


def build(cls: type, data: Mapping[str, Any] | None, *, where: str = "", prefix: str = "") -> Any:
    """Build the settings dataclass ``cls`` from a (nested) mapping: keys checked, values converted, then the
    dataclass's own ``__post_init__`` validates. Errors are :class:`SettingsError` naming ``where`` and the key."""
    if isinstance(data, cls):
        return data
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise SettingsError(
            f"{_at(where)}{prefix.rstrip(_SEP) or 'settings'} must be a mapping, got {data!r}"
        )
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    by_name = {n: f for f in fields.values() for n in _names(f)}
    kwargs: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        f = by_name.get(key)
        if f is None:
            raise SettingsError(
                f"{_at(where)}unknown setting {prefix + key!r}.{_suggest(key, list(by_name), prefix)}"
            )
        if f.name in kwargs:
            raise SettingsError(f"{_at(where)}{prefix + f.name!r} is given twice (as {key!r})")
        tp = hints[f.name]
        if is_section(tp):
            section, optional = _unwrap_optional(tp)
            if value is None and optional:
                kwargs[f.name] = None
            else:
                kwargs[f.name] = build(section, value, where=where, prefix=prefix + f.name + _SEP)
        else:
            kwargs[f.name] = convert(value, tp, where=f"{_at(where)}{prefix + f.name}")
    for n, f in fields.items():  # a required section absent from the data: built from its own defaults
        if n not in kwargs and _default(f) is dataclasses.MISSING and is_section(hints[n]):
            kwargs[n] = build(_unwrap_optional(hints[n])[0], {}, where=where, prefix=prefix + n + _SEP)
    missing = [n for n, f in fields.items() if n not in kwargs and _default(f) is dataclasses.MISSING]
    if missing:
        name = prefix + missing[0]
        raise SettingsError(f"{_at(where)}missing required setting {name!r} (--{_flag(name)})")
    try:
        return cls(**kwargs)
    except SettingsError:
        raise
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"{_at(where)}{exc}") from None


def to_dict(obj: Any) -> Any:
    """Nested plain data (YAML/JSON-safe) from a settings dataclass."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def to_yaml(obj: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(obj), sort_keys=False, allow_unicode=True)


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file of settings as a mapping. Keys starting with ``_`` are metadata and dropped."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except FileNotFoundError:
        raise SettingsError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise SettingsError(f"config file {path} is a folder") from None
    except UnicodeDecodeError as exc:
        raise SettingsError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except yaml.YAMLError as exc:
        raise SettingsError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise SettingsError(
            f"{path}: expected a mapping of settings at the top level, got {type(data).__name__}"
        )
    return {str(k): v for k, v in data.items() if not str(k).startswith("_")}


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` on top of ``base``, sections merged key by key (a None section replaces the whole section)."""
    out = dict(base)
    for key, value in override.items():
        key = str(key).replace("-", "_")
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


# -- flags -------------------------------------------------------------------------------------------------------
def _flag(name: str) -> str:
    return name.replace("_", "-")


class _Bool(argparse.Action):
    """``--flag`` (true), ``--no-flag`` (false) or ``--flag VALUE`` (true/false/yes/no/1/0, none for an optional
    setting's default), so a resolved YAML value can be given back as a flag."""

    def __init__(self, option_strings, dest, **kwargs):
        options = list(option_strings)
        for opt in option_strings:
            options.append("--no-" + opt[2:])
        super().__init__(options, dest, nargs="?", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string.startswith("--no-"):
            if values is not None:
                parser.error(f"{option_string} takes no value")
            value: Any = False
        else:
            value = True if values is None else values
        setattr(namespace, self.dest, value)


class _KeyValue(argparse.Action):
    """``--sft-arg KEY=VALUE`` (repeatable): VALUE is read as YAML, so numbers and booleans keep their type."""

    def __call__(self, parser, namespace, values, option_string=None):
        import yaml

        if "=" not in values:
            parser.error(f"{option_string} expects KEY=VALUE, got {values!r}")
        key, raw = values.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        current = dict(getattr(namespace, self.dest, None) or {})
        current[key.strip()] = value
        setattr(namespace, self.dest, current)


def add_arguments(parser: argparse.ArgumentParser, cls: type, *, config_flag: bool = True) -> None:
    """Flags for every setting of ``cls`` (sections as argument groups), plus ``--config`` and ``--print-config``."""
    if config_flag:
        parser.add_argument(
            "--config",
            metavar="FILE",
            action="append",
            help="YAML file of settings (repeatable; flags override)",
        )
        parser.add_argument(
            "--print-config", action="store_true", help="print the resolved settings as YAML and exit"
        )
    _add_fields(parser, parser, cls, prefix="")


def _add_fields(parser, group, cls: type, *, prefix: str) -> None:
    hints = _hints(cls)
    docs = doc_help(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if is_section(tp):
            section = _unwrap_optional(tp)[0]
            title = f.metadata.get("help") or (section.__doc__ or "").strip().splitlines()[0]
            sub = parser.add_argument_group(f"{prefix}{f.name} settings", title)
            _add_fields(parser, sub, section, prefix=prefix + f.name + _SEP)
            continue
        dest = prefix + f.name
        default = _default(f)
        shown = "required" if default is dataclasses.MISSING else f"default: {default}"
        help_text = f"{f.metadata.get('help') or docs.get(f.name, '')} ({shown})".replace("%", "%%")
        if f.metadata.get("positional"):
            base, _ = _unwrap_optional(tp)
            nargs = (
                "+"
                if typing.get_origin(base) is list
                else ("?" if default is not dataclasses.MISSING else None)
            )
            group.add_argument(dest, nargs=nargs, default=None, help=help_text, metavar=f.name.upper())
            continue
        flags = [f"--{_flag(f.metadata['flag'])}"] if "flag" in f.metadata else []
        for n in _names(f):
            if prefix:
                flags += [f"--{prefix}{_flag(n)}", f"--{_flag(prefix.replace(_SEP, '_'))}{_flag(n)}"]
            else:
                flags.append(f"--{_flag(n)}")
        flags = list(dict.fromkeys(flags))
        base, _ = _unwrap_optional(tp)
        if base is bool:
            group.add_argument(*flags, dest=dest, action=_Bool, default=None, metavar="BOOL", help=help_text)
        elif typing.get_origin(base) is dict or base is dict:
            group.add_argument(
                *flags, dest=dest, action=_KeyValue, default=None, metavar="KEY=VALUE", help=help_text
            )
        elif typing.get_origin(base) is list:
            group.add_argument(
                *flags, dest=dest, action="append", default=None, metavar="A,B", help=help_text
            )
        else:
            group.add_argument(
                *flags, dest=dest, default=None, metavar=f.name.split("_")[-1].upper(), help=help_text
            )


def given_flags(ns: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The settings given on the command line, as a nested mapping (unset flags are absent)."""
    out: dict[str, Any] = {}
    for path in leaf_paths(cls):
        value = getattr(ns, path, None)
        if value is None:
            continue
        node = out
        *sections, leaf = path.split(_SEP)
        for s in sections:
            node = node.setdefault(s, {})
        node[leaf] = value
    return out


def resolve(
    ns: argparse.Namespace,
    cls: type,
    *,
    migrate: typing.Callable[[dict[str, Any], str], dict[str, Any]] | None = None,
) -> Any:
    """YAML files (``--config``, in order) as defaults, then every flag given on top; built and validated."""
    stages: list[tuple[str, dict[str, Any]]] = []
    for path in getattr(ns, "config", None) or []:
        data = load_yaml(path)
        if migrate is not None:
            data = migrate(data, str(path))
        # check the file's keys and types (with suggestions) before merging, so an error names the file
        _check_keys(cls, data, where=str(path))
        stages.append((str(path), canonical(cls, data)))
    flags = given_flags(ns, cls)
    _check_keys(cls, flags, where="command line")
    stages.append(("command line", canonical(cls, flags)))
    values: dict[str, Any] = {}
    for _, data in stages:
        values = merge(values, data)
    try:
        return build(cls, values)
    except SettingsError as exc:
        # name the source (file or command line) that introduced the value the settings reject
        partial: dict[str, Any] = {}
        for where, data in stages:
            partial = merge(partial, data)
            try:
                build(cls, partial)
            except SettingsError as again:
                if str(again) == str(exc) and data:
                    raise SettingsError(f"{where}: {exc}") from None
        raise


def canonical(cls: type, data: Mapping[str, Any]) -> dict[str, Any]:
    """Keys renamed to field names (``-`` -> ``_``, aliases -> the field), sections too; unknown keys kept as they
    are (for :func:`build` to report)."""
    hints = _hints(cls)
    by_name = {n: f for f in dataclasses.fields(cls) for n in _names(f)}
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        f = by_name.get(key)
        if f is not None:
            key = f.name
            if is_section(hints[f.name]) and isinstance(value, Mapping):
                value = canonical(_unwrap_optional(hints[f.name])[0], value)
        out[key] = value
    return out


def _check_keys(cls: type, data: Mapping[str, Any], *, where: str, prefix: str = "") -> None:
    hints = _hints(cls)
    by_name = {n: f for f in dataclasses.fields(cls) for n in _names(f)}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        f = by_name.get(key)
        if f is None:
            raise SettingsError(
                f"{_at(where)}unknown setting {prefix + key!r}.{_suggest(key, list(by_name), prefix)}"
            )
        if is_section(hints[f.name]):
            section, optional = _unwrap_optional(hints[f.name])
            if isinstance(value, Mapping):
                _check_keys(section, value, where=where, prefix=prefix + f.name + _SEP)
            elif not (value is None and optional):
                raise SettingsError(
                    f"{_at(where)}{prefix + f.name} must be a mapping of settings, got {value!r}"
                )
        else:
            convert(value, hints[f.name], where=f"{_at(where)}{prefix + f.name}")
