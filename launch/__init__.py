"""Launching s3_jax jobs: ablation sweeps (`python -m launch.sweep`); cloud VM scripts live beside it."""
