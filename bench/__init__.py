"""Benchmarks: scripts that print tables of measured memory and time (``python -m bench.<name>``)."""
