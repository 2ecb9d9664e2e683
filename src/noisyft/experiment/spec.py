"""The experiment spec: a YAML file read, checked and expanded before anything runs.

```yaml
name: plain-vs-neftune            # the Optuna study name (default: the file name)
train: {max_steps: 40}            # any `noisyft train` setting, shared by every trial
eval: {analyses: [loss, memorization]}   # any `noisyft eval run` setting
seeds: [1, 2, 3]                  # each variant runs once per seed (train's `seed`)
baseline: plain                   # variants are compared to this one, paired by seed
variants:
  plain: {method: none}
  neftune: {method: neftune, neftune: {alpha: [5, 10, 15]}}   # a list = a grid axis
```

A grid variant expands into one variant per combination of its lists (``neftune-alpha5``, ...). A search
replaces lists by ranges (``neftune: {alpha: {low: 1, high: 20}}``) and adds
``search: {metric: loss.sharegpt:heldout, direction: minimize, n_trials: 12}``; it explores one variant with
one seed (confirm the best value afterwards with a grid over seeds).
"""

from __future__ import annotations

import copy
import difflib
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import settings_bridge as bridge

TOP_KEYS = ("name", "train", "eval", "seeds", "baseline", "variants", "search", "metric", "direction")
SEARCH_KEYS = ("metric", "direction", "n_trials", "sampler_seed")
RANGE_KEYS = ("low", "high", "log", "step")
# set per trial by the runner, so the spec may not set them
MANAGED_TRAIN = ("seed", "output_dir", "overwrite_output_dir", "resume_from_checkpoint")
MANAGED_EVAL = ("target", "output_dir", "overwrite")


@dataclass(frozen=True)
class Range:
    """A search axis: a float (or int, with ``step``) range sampled by TPE."""

    low: float
    high: float
    log: bool = False
    step: float | None = None


@dataclass
class Variant:
    """One expanded variant: its name in the report, the spec entry it came from and its train settings."""

    name: str
    group: str
    settings: dict[str, Any]  # nested train settings of this variant, merged over the spec's `train`
    axes: dict[str, Any] = field(default_factory=dict)  # dotted setting -> value (grid) or Range (search)


@dataclass
class Search:
    metric: str
    direction: str
    n_trials: int
    sampler_seed: int = 0


@dataclass
class ExperimentSpec:
    name: str
    train: dict[str, Any]
    eval: dict[str, Any]
    seeds: list[int]
    baseline: str | None
    variants: list[Variant]
    search: Search | None = None
    metric: str | None = None  # grids: the value Optuna records per trial (default: none, 0.0)
    direction: str = "minimize"
    source: dict[str, Any] = field(default_factory=dict)  # the spec as written

    @property
    def is_search(self) -> bool:
        return self.search is not None

    def variant(self, name: str) -> Variant:
        for v in self.variants:
            if v.name == name:
                return v
        raise KeyError(name)

    def cells(self) -> list[tuple[str, int]]:
        """(variant, seed) pairs of a grid, in spec order."""
        return [(v.name, s) for v in self.variants for s in self.seeds]


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3)
    return f" Did you mean {', '.join(close)}?" if close else ""


def _is_range(value: Any) -> bool:
    return isinstance(value, Mapping) and {"low", "high"} <= set(value) and set(value) <= set(RANGE_KEYS)


def _dotted(mapping: Mapping[str, Any], sections: set[str], prefix: str = "") -> dict[str, Any]:
    """Nested settings -> {dotted name: value}; method sections are walked, other values are leaves."""
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        key = str(key).replace("-", "_")
        if not prefix and key in sections and isinstance(value, Mapping):
            out.update(_dotted(value, sections, prefix=f"{key}."))
        else:
            out[prefix + key] = value
    return out


def _nested(dotted: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in dotted.items():
        if "." in key:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
        else:
            out[key] = value
    return out


def _is_list_type(typ: Any) -> bool:
    text = typ if isinstance(typ, str) else getattr(typ, "__name__", "") + str(typ)
    return "list" in text.lower() or "tuple" in text.lower()


def _label(path: str, value: Any, short: bool) -> str:
    name = path.rsplit(".", 1)[-1] if short else path.replace(".", "_")
    text = f"{value:g}" if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9._-]+", "_", f"{name}{text}")


def _expand(group: str, settings: dict[str, Any], where: str, leaves: dict[str, Any], sections: set[str]):
    """Split a variant's dotted settings into fixed values, grid axes (lists) and search axes (ranges)."""
    fixed, grid, ranges = {}, {}, {}
    for path, value in _dotted(settings, sections).items():
        if path not in leaves:
            raise ValueError(f"{where}: unknown train setting {path!r}.{_suggest(path, list(leaves))}")
        list_typed = _is_list_type(leaves[path])
        if isinstance(value, list) and (not list_typed or (value and isinstance(value[0], list))):
            if not value:
                raise ValueError(f"{where}: grid axis {path} is an empty list")
            grid[path] = value
        elif _is_range(value):
            ranges[path] = _range(value, f"{where}.{path}")
        else:
            fixed[path] = value
    if grid and ranges:
        raise ValueError(
            f"{where}: mixes grid lists ({', '.join(grid)}) and search ranges ({', '.join(ranges)})"
        )
    return fixed, grid, ranges


def _range(value: Mapping[str, Any], where: str) -> Range:
    try:
        low, high = float(value["low"]), float(value["high"])
        step = None if value.get("step") is None else float(value["step"])
    except (TypeError, ValueError):
        raise ValueError(f"{where}: low, high and step must be numbers, got {dict(value)}") from None
    log = bool(value.get("log", False))
    if not (math.isfinite(low) and math.isfinite(high)) or low >= high:
        raise ValueError(f"{where}: need finite low < high, got low={low}, high={high}")
    if log and low <= 0:
        raise ValueError(f"{where}: a log range needs low > 0, got {low}")
    return Range(low, high, log, step)


def _check_methods(variant: Variant, own: set[str], where: str) -> None:
    """A section the variant sets itself (or a grid over it) must belong to one of its methods."""
    method = variant.settings.get("method", "neftune")
    used = set(bridge.method_parts(method, where=where))
    for section in sorted(own - used):
        axes = [a for a in variant.axes if a.startswith(section + ".")]
        what = f"a grid or search over {', '.join(axes)}" if axes else f"{section} settings"
        raise ValueError(f"{where}: {what}, but method {method!r} does not use {section}")


def _variants_of(group: str, raw: Any, base: dict, leaves: dict, sections: set[str], path: str) -> list:
    where = f"{path}: variants.{group}"
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping of train settings, got {type(raw).__name__}")
    fixed, grid, ranges = _expand(group, dict(raw), where, leaves, sections)
    for key in fixed:
        if key in MANAGED_TRAIN:
            raise ValueError(f"{where}: {key} is set per trial by the experiment (use `seeds`)")
    base_dotted = _dotted(base, sections)
    own = {p.split(".", 1)[0] for p in [*fixed, *grid, *ranges] if "." in p}
    out = []
    short = len({p.rsplit(".", 1)[-1] for p in grid}) == len(grid)
    for combo in itertools.product(*grid.values()) if grid else [()]:
        axes = dict(zip(grid, combo, strict=True))
        name = "-".join([group, *(_label(p, v, short) for p, v in axes.items())])
        merged = _nested({**base_dotted, **fixed, **axes})
        variant = Variant(name=name, group=group, settings=merged, axes={**axes, **ranges})
        _check_methods(variant, own, where)
        # sections shared in `train:` that this variant's method does not use are left out of its settings
        used = set(bridge.method_parts(merged.get("method", "neftune"), where=where))
        for section in sections - used:
            merged.pop(section, None)
        out.append(variant)
    return out


def _check_top(data: Any, path: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(
            f"{path}: expected a mapping (train, eval, seeds, baseline, variants) at the top level"
        )
    for key in data:
        if key not in TOP_KEYS:
            raise ValueError(f"{path}: unknown key {key!r}.{_suggest(str(key), list(TOP_KEYS))}")
    for key in ("train", "eval"):
        if not isinstance(data.get(key) or {}, Mapping):
            raise ValueError(f"{path}: {key} must be a mapping of settings")
    if not isinstance(data.get("variants"), Mapping) or not data["variants"]:
        raise ValueError(f"{path}: variants must be a non-empty mapping of name -> train settings")


def _seeds(data: Mapping, path: str) -> list[int]:
    seeds = data.get("seeds", [42])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
        raise ValueError(f"{path}: seeds must be a non-empty list of integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"{path}: seeds repeat a value: {seeds}")
    return seeds


def _search(data: Mapping, path: str) -> Search | None:
    raw = data.get("search")
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path}: search must be a mapping ({', '.join(SEARCH_KEYS)})")
    for key in raw:
        if key not in SEARCH_KEYS:
            raise ValueError(f"{path}: search: unknown key {key!r}.{_suggest(str(key), list(SEARCH_KEYS))}")
    if not isinstance(raw.get("metric"), str):
        raise ValueError(f"{path}: search.metric must name a metric, e.g. loss.sharegpt:heldout")
    direction = raw.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"{path}: search.direction must be minimize or maximize, got {direction!r}")
    n_trials = raw.get("n_trials", 10)
    if not isinstance(n_trials, int) or n_trials < 1:
        raise ValueError(f"{path}: search.n_trials must be an integer >= 1, got {n_trials!r}")
    return Search(raw["metric"], direction, n_trials, int(raw.get("sampler_seed", 0)))


def parse_spec(data: Any, *, path: str = "spec", default_name: str = "experiment") -> ExperimentSpec:
    """Check a spec mapping and expand its grids. Raises ValueError naming the file, key and a suggestion."""
    _check_top(data, path)
    train = copy.deepcopy(dict(data.get("train") or {}))
    evals = copy.deepcopy(dict(data.get("eval") or {}))
    for key, managed in (("train", MANAGED_TRAIN), ("eval", MANAGED_EVAL)):
        for name in managed:
            if name in (train if key == "train" else evals):
                raise ValueError(f"{path}: {key}.{name} is set per trial by the experiment")
    seeds = _seeds(data, path)
    leaves = bridge.train_leaf_paths()
    sections = bridge.method_sections()
    variants = []
    for group, raw in data["variants"].items():
        variants += _variants_of(str(group), raw, train, leaves, sections, path)
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: two variants expand to the same name: {names}")
    search = _search(data, path)
    n_ranges = sum(1 for v in variants for a in v.axes.values() if isinstance(a, Range))
    if search is not None:
        if len(variants) != 1 or not n_ranges:
            raise ValueError(
                f"{path}: a search explores one variant with ranges ({{low: .., high: ..}}); "
                f"got {len(variants)} variant(s) and {n_ranges} range(s)"
            )
        if len(seeds) != 1:
            raise ValueError(
                f"{path}: a search runs each trial once; give one seed (then confirm the best value "
                "with a grid over seeds)"
            )
    elif n_ranges:
        raise ValueError(
            f"{path}: ranges ({{low: .., high: ..}}) need a `search:` section (metric, direction, n_trials)"
        )
    baseline = data.get("baseline")
    if baseline is not None and baseline not in names:
        raise ValueError(
            f"{path}: baseline {baseline!r} is not a variant.{_suggest(str(baseline), names)} "
            f"Variants: {', '.join(names)}"
        )
    direction = data.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise ValueError(f"{path}: direction must be minimize or maximize, got {direction!r}")
    spec = ExperimentSpec(
        name=str(data.get("name") or default_name),
        train=train,
        eval=evals,
        seeds=seeds,
        baseline=baseline,
        variants=variants,
        search=search,
        metric=data.get("metric"),
        direction=direction,
        source=copy.deepcopy(dict(data)),
    )
    check_settings(spec, path)
    return spec


def check_settings(spec: ExperimentSpec, path: str) -> None:
    """Build every variant's train settings and the eval settings, so bad values fail before anything runs."""
    bridge.build_eval(spec.eval, where=f"{path}: eval")
    for v in spec.variants:
        where = f"{path}: variants.{v.group}"
        probe = trial_train_settings(
            v, spec.seeds[0], values={p: r.low for p, r in v.axes.items() if isinstance(r, Range)}
        )
        bridge.build_train(probe, where=f"{where} ({v.name})")


def trial_train_settings(
    variant: Variant, seed: int, values: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """The nested train settings of one trial: the variant's settings, the seed, sampled search values."""
    settings = copy.deepcopy(variant.settings)
    for dotted, value in (values or {}).items():
        if "." in dotted:
            section, name = dotted.split(".", 1)
            settings.setdefault(section, {})[name] = value
        else:
            settings[dotted] = value
    settings["seed"] = seed
    return settings


def load_spec(path: str | Path) -> ExperimentSpec:
    import yaml

    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"experiment spec not found: {p}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{p}: not valid YAML: {exc}") from None
    return parse_spec(data, path=str(p), default_name=p.stem)
