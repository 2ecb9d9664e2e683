"""LNSR (layerwise noise stability regularization, arXiv 2206.05658): penalty on how much later hidden states
move when Gaussian noise is injected at one decoder layer's input. Config in ``config.py``, the penalty in
``penalty.py`` (torch); this package imports neither."""
