"""SymNoise (arXiv 2312.01523): symmetric +/- Bernoulli noise on the input embeddings. Config in ``config.py``,
the noise and the symmetric pair in ``noise.py`` (torch); this package imports neither."""
