"""The command modules: leaves of the import graph (nothing below imports them, and none imports another)."""
