"""The experiment spec: grid expansion, searches, and bad input failing before anything runs."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import yaml

from noisyft.experiment.cli import main
from noisyft.experiment.spec import Range, parse_spec, trial_train_settings


def spec(**over):
    data = {
        "train": {"max_steps": 4, "learning_rate": 1e-4},
        "eval": {"analyses": ["loss"]},
        "seeds": [1, 2, 3],
        "baseline": "plain",
        "variants": {
            "plain": {"method": "none"},
            "neftune": {"method": "neftune", "neftune": {"alpha": [5, 10, 15]}},
        },
    }
    data.update(over)
    return data


def test_a_grid_expands_into_one_named_variant_per_combination():
    s = parse_spec(spec())
    assert [v.name for v in s.variants] == ["plain", "neftune-alpha5", "neftune-alpha10", "neftune-alpha15"]
    assert len(s.cells()) == 4 * 3 and s.cells()[0] == ("plain", 1)
    v = s.variant("neftune-alpha10")
    assert v.group == "neftune" and v.axes == {"neftune.alpha": 10}
    assert v.settings == {
        "max_steps": 4,
        "learning_rate": 1e-4,
        "method": "neftune",
        "neftune": {"alpha": 10},
    }
    assert trial_train_settings(v, 2)["seed"] == 2 and "seed" not in v.settings


def test_two_axes_multiply_and_shared_sections_stay_off_methods_that_do_not_use_them():
    s = parse_spec(
        spec(
            train={"neftune": {"scale": "padded"}},
            variants={
                "plain": {"method": "none"},
                "nt": {"method": "neftune", "neftune": {"alpha": [1, 2]}, "learning_rate": [1e-4, 1e-5]},
            },
        )
    )
    names = [v.name for v in s.variants]
    assert names == ["plain", "nt-alpha1-learning_rate0.0001", "nt-alpha1-learning_rate1e-05",
                     "nt-alpha2-learning_rate0.0001", "nt-alpha2-learning_rate1e-05"]  # fmt: skip
    assert "neftune" not in s.variant("plain").settings
    assert s.variant("nt-alpha2-learning_rate1e-05").settings["neftune"] == {"scale": "padded", "alpha": 2}


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"variants": {"plain": {"method": "none", "neftune": {"alpha": [5, 10]}}}},
         r"variants.plain: a grid or search over neftune.alpha, but method 'none' does not use neftune"),
        ({"variants": {"a": {"neftune": {"alfa": [5]}}}}, r"unknown train setting 'neftune.alfa'. Did you mean neftune.alpha"),
        ({"variants": {"a": {"learning_rat": 1e-4}}}, r"variants.a: unknown train setting 'learning_rat'. Did you mean learning_rate"),
        ({"variants": {"a": {"max_length": 0}}}, r"variants.a \(a\).*max_length must be .*>= 1"),
        ({"variants": {"a": {"method": "dropout"}}}, r"variants.a.*dropout"),
        ({"eval": {"analyses": ["los"]}}, r"eval: .*'los'"),
        ({"eval": {"num_prompt": 4}}, r"eval: unknown (key|setting) .num_prompt.. Did you mean num_prompts"),
        ({"variant": {}}, r"unknown key 'variant'. Did you mean variants"),
        ({"baseline": "plian"}, r"baseline 'plian' is not a variant. Did you mean plain"),
        ({"seeds": [1, 1]}, r"seeds repeat"),
        ({"train": {"seed": 3}}, r"train.seed is set per trial"),
        ({"eval": {"target": "x"}}, r"eval.target is set per trial"),
        ({"variants": {"a": {"method": "neftune", "neftune": {"alpha": {"low": 1, "high": 9}}}}},
         r"ranges .* need a `search:` section"),
        ({"seeds": [1], "baseline": None, "search": {"metric": "loss.train", "n_trials": 2},
          "variants": {"a": {"method": "neftune", "neftune": {"alpha": {"low": 5, "high": 1}}}}}, r"need finite low < high"),
        ({"baseline": None, "search": {"metric": "loss.train", "n_trials": 2},
          "variants": {"a": {"method": "neftune", "neftune": {"alpha": {"low": 1, "high": 5}}}}}, r"give one seed"),
    ],
)  # fmt: skip
def test_bad_specs_fail_with_the_file_the_key_and_a_suggestion(over, message):
    if "variants" in over:
        over = {"baseline": None, **over}
    with pytest.raises(ValueError, match=message):
        parse_spec(spec(**over), path="exp.yaml")


def test_a_search_spec_keeps_its_ranges():
    s = parse_spec(
        spec(
            seeds=[7],
            baseline=None,
            variants={"nt": {"method": "neftune", "neftune": {"alpha": {"low": 1, "high": 20, "log": True}}}},
            search={"metric": "loss.sharegpt:heldout", "direction": "minimize", "n_trials": 12},
        )
    )
    assert s.is_search and s.search.n_trials == 12
    assert s.variants[0].axes == {"neftune.alpha": Range(1.0, 20.0, True, None)}


def test_cli_errors_are_one_line_and_nothing_is_created(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec(variants={"plain": {"method": "none", "neftune": {"alpha": [5]}}})))
    out = tmp_path / "out"
    assert main(["run", str(path), "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("noisyft experiment: error: ") and err.count("\n") == 1 and "exp.yaml" in err
    assert not out.exists()
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "experiment spec not found" in capsys.readouterr().err


def test_print_config_shows_every_trial_and_exits(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec(), sort_keys=False))
    assert main(["run", str(path), "--print-config", "--output-dir", str(tmp_path / "out")]) == 0
    doc = yaml.safe_load(capsys.readouterr().out)
    assert len(doc["trials"]) == 12 and doc["name"] == "exp"
    assert doc["trials"][-1] == {
        "variant": "neftune-alpha15",
        "seed": 3,
        "axes": {"neftune.alpha": 15},
        "train": {
            "max_steps": 4,
            "learning_rate": 1e-4,
            "method": "neftune",
            "neftune": {"alpha": 15},
            "seed": 3,
        },
    }
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_another_experiment_is_refused(tmp_path, capsys):
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(spec(), sort_keys=False))
    out = tmp_path / "out"
    out.mkdir()
    (out / "experiment.yaml").write_text("name: other\n")
    assert main(["run", str(path), "--output-dir", str(out)]) == 2
    assert "holds another experiment" in capsys.readouterr().err


def test_help_is_fast_and_imports_nothing_heavy():
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "noisyft.experiment.cli", "run", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert time.time() - start < 10 and "--launcher" in proc.stdout and "--storage" in proc.stdout
    probe = (
        "import sys, noisyft.experiment.cli as c; c.build_parser(); "
        "print(sorted(m for m in ('torch', 'optuna', 'matplotlib', 'scipy') if m in sys.modules))"
    )
    assert (
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "[]"
    )


def test_every_preset_is_a_valid_spec_that_says_how_to_run_it():
    from pathlib import Path

    from noisyft.experiment.spec import load_spec

    presets = sorted((Path(__file__).resolve().parents[1] / "configs" / "experiments").glob("*.yaml"))
    assert {p.stem for p in presets} >= {"cpu", "gpu"}
    for path in presets:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Run: ") and "noisyft experiment run configs/experiments/" in first, path
        s = load_spec(path)
        assert s.variants and s.seeds
    cpu = load_spec(presets[[p.stem for p in presets].index("cpu")])
    assert len(cpu.seeds) == 3 and cpu.eval["num_prompts"] >= 64 and cpu.train["max_examples"] >= 200
