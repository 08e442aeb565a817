"""Reinforcement learning: PPO math (`ppo`), the jitted score/update steps (`update`)."""
