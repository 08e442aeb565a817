"""Answer scoring and rewards."""

from s3_jax.reward.answers import normalize_answer

__all__ = ["normalize_answer"]
