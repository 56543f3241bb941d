"""Reward functions (answer extraction, matching, combination) for GRPO training."""
