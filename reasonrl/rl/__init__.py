"""RL math: GRPO advantages and policy-gradient losses."""
