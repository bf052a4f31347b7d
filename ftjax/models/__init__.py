"""Decoder-only policy transformers (Flax NNX), their configs and checkpoint loaders."""
