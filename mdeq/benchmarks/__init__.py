"""Measurements behind the project's speed and memory targets (run through ``tools/benchmark.py``)."""
