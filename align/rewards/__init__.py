"""Rewards: reward functions and the scorers built from them."""
