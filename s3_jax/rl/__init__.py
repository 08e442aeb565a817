"""Reinforcement learning: the PPO recipe (`ppo`), the learner's jitted score/update (`learner`), its settings
and optimizer, micro-batch layouts, training rows (`batch`) and the host side of a step (`experience`)."""
