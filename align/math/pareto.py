"""The reward-KL Pareto front: the points no other point beats on both at once (no more KL for no
less reward). A sweep marks them; every other setting is dominated."""
from __future__ import annotations


def pareto_front(kl: list[float], reward: list[float]) -> list[bool]:
    """For each point, whether it is on the front: no other point has kl <= its kl and reward >= its
    reward with one of the two strict. Equal points are all on the front."""
    return [not any(k2 <= k and r2 >= r and (k2 < k or r2 > r) for k2, r2 in zip(kl, reward))
            for k, r in zip(kl, reward)]
