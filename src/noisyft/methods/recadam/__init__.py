"""RecAdam (Recall and Learn, arXiv 2004.12651): Adam on an annealed mix of the task loss and a quadratic pull
toward the pre-trained weights. Config in ``config.py``, the optimizer in ``optimizer.py`` (torch); this package
imports neither."""
