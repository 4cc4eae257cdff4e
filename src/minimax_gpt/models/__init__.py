"""The single-device model: nothing here imports torch.distributed."""
