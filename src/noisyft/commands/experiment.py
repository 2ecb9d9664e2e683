"""`noisyft experiment ...`: seeded grids and searches over train + eval settings (routes to noisyft.experiment)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "experiment",
        help="seeded grids / searches of train + eval runs with paired statistics and an HTML report",
        add_help=False,
    )
    parser.add_argument("args", nargs=argparse.REMAINDER)


def run(ns: argparse.Namespace) -> int:
    from noisyft.experiment.cli import main

    return main(ns.args)
