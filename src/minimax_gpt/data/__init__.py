"""Tokenizers, prepared token files and the datasets that sample from them."""
