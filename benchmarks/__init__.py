"""Benchmarks: `python -m benchmarks.suite` (the suite) and the single-topic scripts next to it."""
