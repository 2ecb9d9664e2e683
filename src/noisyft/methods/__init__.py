"""Regularization methods, one folder each: a torch-free ``config.py`` and its pure-torch component."""
