"""Experiment commands: ``python -m experiments.<name>``."""
