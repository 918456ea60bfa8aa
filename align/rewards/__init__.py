"""Rewards: reward kinds and the scorers built from them.

    registry.py           the reward kinds by name: register_reward, reward_kind, check_spec, build_scorer
    base.py               RewardScores (mean, variance, members), the Reward and Scorer interfaces
    vader.py ... combined.py   one module per built-in kind, each registering itself
    laplace_posterior.py  the Laplace-LoRA posterior a `laplace` reward predicts with

Adding a reward kind is one module: put it in this package (found by name) or anywhere importable and
name it "module:kind" in a config. Keep heavy imports inside the builder: every module here is imported
when a kind is first looked up.
"""
