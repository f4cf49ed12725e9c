"""Readers of pretrained checkpoints into the parameter trees of `dsi_jax.models`."""
