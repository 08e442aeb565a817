"""s3_jax: train search agents with RL (s3, Gain Beyond RAG) in JAX."""

__version__ = "0.1.0"
