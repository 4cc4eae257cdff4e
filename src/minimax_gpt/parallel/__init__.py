"""Parallelism applied from outside the model: the device mesh and parallelize."""
