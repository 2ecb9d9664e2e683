"""`noisyft experiment ...`: ``main(argv) -> int`` over the words after ``experiment``.

noisyft experiment run configs/experiments/cpu.yaml                 # -> outputs/experiments/<name>/
noisyft experiment run SPEC.yaml --output-dir DIR --workers 2       # two trials at a time
noisyft experiment run SPEC.yaml --storage postgresql://user@host/db --launcher "torchrun --nproc_per_node 2"
noisyft experiment work DIR --storage postgresql://user@host/db     # another machine joins the study
noisyft experiment report DIR                                       # summary.json, report.md, report.html

Run the same ``run`` again after an interruption (Ctrl-C, kill -9, a reboot): finished trials are kept.
Heavy imports (optuna, matplotlib, scipy) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from pathlib import Path

PROG = "noisyft experiment"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Seeded grids and searches of `noisyft train` + `noisyft eval run` on Optuna, with paired "
        "statistics and an HTML report.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run = sub.add_parser("run", help="run (or resume) an experiment spec", description="Run every trial of SPEC "
                         "that has not finished yet, then write the report. Safe to run again after a kill.")  # fmt: skip
    run.add_argument("spec", metavar="SPEC.yaml", help="the experiment spec (see configs/experiments/)")
    run.add_argument("--output-dir", help="experiment folder (default: outputs/experiments/<name>)")
    _common(run)
    run.add_argument(
        "--print-config", action="store_true", help="print the expanded trials' settings and exit"
    )

    work = sub.add_parser("work", help="join a running experiment's study as one more worker")
    work.add_argument("dir", metavar="DIR", help="the experiment folder (holding experiment.yaml)")
    _common(work)

    rep = sub.add_parser("report", help="write DIR/summary.json, report.md and report.html")
    rep.add_argument("dir", metavar="DIR")
    return parser


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--storage", metavar="URL", help="Optuna storage: an RDB URL (postgresql://, mysql://, "
                   "sqlite:///) or journal:PATH (default: sqlite:///DIR/study.db)")  # fmt: skip
    p.add_argument("--workers", type=int, default=1, metavar="N", help="trials at a time on this machine")
    p.add_argument("--launcher", metavar="CMD", default="", help="prefix for every trial command, run as "
                   "`CMD -m noisyft.cli train ...` (e.g. 'torchrun --nproc_per_node 2', 'accelerate launch')")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _fail(message: str, code: int = 2) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return code


def _spec_text(spec) -> str:
    import yaml

    return yaml.safe_dump({**spec.source, "name": spec.name}, sort_keys=False, allow_unicode=True)


def _print_config(spec) -> None:
    import yaml

    from .spec import trial_train_settings

    trials = []
    for v in spec.variants:
        for seed in spec.seeds:
            axes = {k: (vars(r) if hasattr(r, "low") else r) for k, r in v.axes.items()}
            trials.append(
                {"variant": v.name, "seed": seed, "axes": axes, "train": trial_train_settings(v, seed)}
            )
    doc = {"name": spec.name, "baseline": spec.baseline, "eval": spec.eval, "trials": trials}
    if spec.search:
        doc["search"] = vars(spec.search)
    print(yaml.safe_dump(doc, sort_keys=False, allow_unicode=True), end="")


def _prepare_dir(spec, out_dir: Path) -> None:
    from noisyft._io import atomic_write_text

    text = _spec_text(spec)
    existing = out_dir / "experiment.yaml"
    if existing.is_file() and existing.read_text(encoding="utf-8") != text:
        raise ValueError(
            f"{out_dir} holds another experiment (its experiment.yaml differs from this spec); pass another "
            "--output-dir, or delete the folder to start over"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(existing, text)


def _execute(spec, out_dir: Path, ns: argparse.Namespace) -> int:
    from .report import ReportError, write_report
    from .runner import Runner, StorageError, default_storage

    if ns.workers < 1:
        return _fail(f"--workers must be >= 1, got {ns.workers}")
    try:
        runner = Runner(spec, out_dir, ns.storage or default_storage(out_dir), shlex.split(ns.launcher))
    except StorageError as exc:
        return _fail(str(exc))
    try:
        counts = runner.run(workers=ns.workers, progress=not ns.no_progress)
    except KeyboardInterrupt:
        print(f"\n{PROG}: stopped; run the same command again to resume", file=sys.stderr)
        return 130
    status = runner.status()
    done, total = status["complete"], status["total"]
    print(
        f"{done}/{total} trials complete ({counts['complete']} now, {counts['failed']} failed now) in {out_dir}"
    )
    if status["running"]:
        print(
            f"{status['running']} trial(s) still running in other workers; `{PROG} report {out_dir}` when they end"
        )
    try:
        paths = write_report(out_dir)
    except ReportError as exc:
        return _fail(str(exc), 1)
    print(f"report: {paths['html']}\nsummary: {paths['summary']}\ntable: {paths['markdown']}")
    return 1 if status["failed"] else 0


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    for noisy in ("matplotlib", "PIL", "optuna", "sqlalchemy", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.command is None:
        parser.print_help()
        return 2
    from .spec import load_spec

    try:
        if ns.command == "report":
            from .report import ReportError, write_report

            try:
                paths = write_report(Path(ns.dir))
            except ReportError as exc:
                return _fail(str(exc), 1)
            print(f"report: {paths['html']}\nsummary: {paths['summary']}\ntable: {paths['markdown']}")
            return 0
        if ns.command == "run":
            spec = load_spec(ns.spec)
            if ns.print_config:
                _print_config(spec)
                return 0
            out_dir = Path(ns.output_dir or Path("outputs") / "experiments" / spec.name)
            _prepare_dir(spec, out_dir)
        else:
            out_dir = Path(ns.dir)
            if not (out_dir / "experiment.yaml").is_file():
                return _fail(f"{out_dir}/experiment.yaml not found: start the experiment with `{PROG} run SPEC "
                             "--output-dir DIR --storage URL` first, and share DIR (or copy experiment.yaml)")  # fmt: skip
            spec = load_spec(out_dir / "experiment.yaml")
    except ValueError as exc:
        return _fail(str(exc))
    _setup_logging()
    return _execute(spec, out_dir, ns)


if __name__ == "__main__":
    sys.exit(main())
