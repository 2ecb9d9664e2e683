"""Mixout (arXiv 1909.11299): in training forwards, each selected Linear weight entry is swapped for its
pre-trained value with probability p and rescaled so the expected weight is unchanged. Config in ``config.py``,
the module change in ``mixout.py`` (torch); this package imports neither."""
