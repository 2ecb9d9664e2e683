"""fisher: see config.py (settings), plugin.py (how it attaches to a Trainer) and the component module."""
