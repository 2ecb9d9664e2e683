"""`noisyft experiment`: seeded grids and searches of `noisyft train` + `noisyft eval run`, on Optuna.

- :mod:`.spec` reads an experiment YAML, checks every setting before anything runs and expands grids;
- :mod:`.runner` drives an Optuna study (GridSampler for grids, TPE for searches) whose trials are
  subprocesses, resumable after a kill;
- :mod:`.results` reads the trial folders, :mod:`.stats` computes mean ± std and paired bootstrap intervals,
  :mod:`.report` writes ``summary.json`` / ``report.md`` and :mod:`.html` the self-contained ``report.html``;
- :mod:`.cli` is the command line (``main(argv) -> int``).

Nothing heavy is imported at package level, so ``noisyft experiment --help`` is instant.
"""
