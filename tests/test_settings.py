"""The settings layer: one definition per setting, reachable from YAML and flags, resolved YAML feeds back in."""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys

import pytest
import yaml

from noisyft.cli import build_parser, main
from noisyft.config import TrainConfig, migrate_legacy
from noisyft.eval.config import EvalConfig
from noisyft.methods import REGISTRY, MethodSpec, method_name, parse_method
from noisyft.settings import SettingsError, build, leaf_paths, resolve, to_dict, to_yaml


def _train(*argv: str) -> TrainConfig:
    return resolve(build_parser().parse_args(["train", *argv]), TrainConfig, migrate=migrate_legacy)


def test_method_sections_from_flags_aliases_and_yaml(tmp_path):
    cfg = _train("--method", "noisytune+neftune", "--neftune.alpha", "10", "--noisytune-lambda", "0.3")
    assert cfg.neftune.alpha == 10.0 and cfg.noisytune.lam == 0.3 and cfg.fisher is None
    f = tmp_path / "c.yaml"
    f.write_text("method: neftune+noisytune\nneftune: {alpha: 7, scale: padded}\nnoisytune: {lambda: 0.1}\n")
    cfg = _train("--config", str(f), "--neftune.response-only")
    assert cfg.method == "noisytune+neftune"  # canonical order: order of application
    assert (cfg.neftune.alpha, cfg.neftune.scale, cfg.neftune.response_only) == (7.0, "padded", True)
    assert cfg.noisytune.lam == 0.1


def test_every_method_field_is_reachable_from_yaml_and_flags(tmp_path):
    """Each field of each method config gets a non-default value through YAML and through its dotted flag."""
    values = {
        "noisytune": {
            "lam": 0.3,
            "distribution": "gaussian",
            "mode": "global",
            "include": "q_proj",
            "exclude": "embed",
            "trainable_only": False,
            "seed": 7,
        },
        "neftune": {
            "alpha": 9.0,
            "distribution": "gaussian",
            "scale": "padded",
            "response_only": True,
            "seed": 3,
            "use_global_rng": True,
        },
        "fisher": {
            "kind": "logit",
            "coef": 0.01,
            "warmup_steps": 4,
            "num_samples": 2,
            "sampling": "uniform",
            "probability": 0.5,
            "seed": 5,
        },
        "mixout": {"p": 0.3, "include": "mlp", "exclude": None, "target": "start", "seed": 2},
        "recadam": {"gamma": 10.0, "anneal_k": 0.1, "anneal_t0": 50.0, "anchor": "start"},
        "symnoise": {"alpha": 3.0, "pair": False, "scale": "padded", "response_only": True, "seed": 4},
        "lnsr": {
            "sigma": 0.2,
            "layer": 1,
            "layers": [1, 2],
            "coef": 0.5,
            "response_only": True,
            "relative_sigma": False,
            "normalize": False,
            "seed": 6,
        },
    }
    assert set(values) == set(REGISTRY), "add the new method's fields to this table"
    for name, fields in values.items():
        assert set(fields) == {f.name for f in dataclasses.fields(REGISTRY[name].config_class())}, name
    f = tmp_path / "all.yaml"
    # one run per compatible group (methods sharing a slot cannot be in one method set)
    for group in (["noisytune", "mixout", "recadam", "neftune", "fisher"], ["symnoise"], ["lnsr"]):
        method = "+".join(group)
        part = {n: values[n] for n in group}
        f.write_text(yaml.safe_dump({"method": method, **part}))
        assert to_dict(_train("--config", str(f))) == to_dict(build(TrainConfig, {"method": method, **part}))
        flags = ["--method", method]
        for name, fields in part.items():
            for key, value in fields.items():
                flag = f"--{name}.{key.replace('_', '-')}"
                if isinstance(value, bool):
                    flags += [flag] if value else [f"--no-{flag[2:]}"]
                elif value is None:
                    flags += [flag, "none"]
                else:
                    flags += [flag, ",".join(map(str, value)) if isinstance(value, list) else str(value)]
        cfg = _train(*flags)
        for name, fields in part.items():
            assert dataclasses.asdict(getattr(cfg, name)) == fields, name


def test_resolved_config_feeds_back_unchanged(tmp_path):
    cfg = _train(
        "--method",
        "noisytune+fisher",
        "--fisher.kind",
        "logit",
        "--max-examples",
        "none",
        "--lora-target-modules",
        "q_proj",
        "--lora-target-modules",
        "k_proj,v_proj",
        "--sft-arg",
        "max_grad_norm=0.5",
    )
    assert cfg.lora_target_modules == ["q_proj", "k_proj", "v_proj"] and cfg.sft_args == {
        "max_grad_norm": 0.5
    }
    text = to_yaml(cfg)
    f = tmp_path / "config.yaml"
    f.write_text(text)
    assert to_yaml(_train("--config", str(f))) == text


def test_print_config_prints_the_yaml_and_loads_nothing_heavy():
    probe = (
        "import sys, io, contextlib; from noisyft.cli import main; buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf): code = main(['train', '--print-config', '--output-dir', 'x'])\n"
        "print(code, 'torch' in sys.modules); print(buf.getvalue())"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    first, rest = out.split("\n", 1)
    assert first == "0 False"
    assert yaml.safe_load(rest)["neftune"]["alpha"] == 5.0 and yaml.safe_load(rest)["output_dir"] == "x"
    for argv in (
        ["eval", "run", "--print-config"],
        ["eval", "lm-eval", "m", "--output", "r.json", "--print-config"],
    ):
        assert main(argv) == 0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("neftune: {alhpa: 5}\n", "unknown setting 'neftune.alhpa'. Did you mean neftune.alpha?"),
        ("neftune: {alpha: .nan}\n", "NEFTune alpha must be a finite number"),
        ("fisher: {coef: .inf}\nmethod: fisher\n", "Fisher coef must be a finite number"),
        ("learning_rate: .nan\n", "learning_rate must be a finite number"),
        ("method: none\nneftune: {alpha: 5}\n", "neftune settings are given but method is 'none'"),
        ("neftune: 5\n", "neftune must be a mapping"),
        ("max_length: 1.5\n", "max_length expects int"),
        ("- a\n- b\n", "expected a mapping of settings"),
    ],
)
def test_bad_settings_are_one_line_errors_naming_the_file(tmp_path, capsys, text, message):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    assert main(["train", "--config", str(f)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err
    assert "bad.yaml" in err


def test_every_method_combination_comes_from_the_registry(monkeypatch):
    names = list(REGISTRY)
    for r in range(1, len(names) + 1):
        for combo in itertools.combinations(names, r):
            slots = [s for n in combo for s in REGISTRY[n].slots]
            text = "+".join(reversed(combo))  # any order in, registry order out
            if len(slots) != len(set(slots)):
                with pytest.raises(ValueError, match="cannot combine"):
                    parse_method(text)
                continue
            assert parse_method(text) == combo
            assert TrainConfig(method=text).method == method_name(combo)
    with pytest.raises(ValueError, match="given twice"):
        parse_method("neftune+neftune")
    # two methods taking over the same slot cannot combine
    extra = MethodSpec("other", "x:Y", "x:Z", "other embedding noise", "paper", slots=("embedding-noise",))
    monkeypatch.setitem(REGISTRY, "other", extra)
    with pytest.raises(ValueError, match="cannot combine"):
        parse_method("neftune+other")


def test_legacy_flat_config_is_migrated(tmp_path, caplog):
    f = tmp_path / "old.yaml"
    f.write_text(
        "_versions: {torch: x}\nmethod: noisytune+neftune\nneftune_alpha: 10.0\nneftune_global_rng: true\n"
        "noisytune_lambda: 0.2\nfisher_kind: logit\nfisher_diagnostic_steps: 3\n"
    )
    cfg = _train("--config", str(f))
    assert cfg.neftune.alpha == 10.0 and cfg.neftune.use_global_rng and cfg.noisytune.lam == 0.2
    assert cfg.fisher is None and cfg.fisher_diagnostic_steps == 3  # unused methods' defaults are dropped
    assert "flat method settings" in caplog.text


def test_eval_lists_and_all(tmp_path):
    ns = build_parser().parse_args(["eval", "run", "--analyses", "loss", "--analyses", "lengths,gsm8k"])
    assert resolve(ns, EvalConfig).analyses == ["loss", "lengths", "gsm8k"]
    assert len(EvalConfig(analyses=["all"]).analyses) == 6
    with pytest.raises(SettingsError, match="curvature_alphas\\[1\\] expects float"):
        build(EvalConfig, {"curvature_alphas": [1, "big"]})


def test_every_setting_has_help_text():
    from noisyft.settings import doc_help

    for cls in (TrainConfig, EvalConfig, *(s.config_class() for s in REGISTRY.values())):
        docs = doc_help(cls)
        for f in dataclasses.fields(cls):
            assert f.metadata.get("help") or docs.get(f.name), f"{cls.__name__}.{f.name} has no help"
    assert "neftune.alpha" in leaf_paths(TrainConfig)
