"""Experiment configs: each file's `get_config()` returns the whole ConfigDict."""
