"""Run metadata shared by the recipes: library versions (torch-free)."""

from __future__ import annotations

import importlib.metadata as md

CORE = ("noisyft", "torch", "transformers", "trl", "peft", "accelerate", "datasets")


def versions(dists: tuple[str, ...] = CORE) -> dict[str, str]:
    """Installed versions of ``dists`` ("not installed" where missing)."""
    out = {}
    for dist in dists:
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    return out
