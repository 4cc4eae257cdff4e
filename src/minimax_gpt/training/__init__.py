"""One training run: its config, Trainer, Checkpointer, metrics, faults and run folder."""
