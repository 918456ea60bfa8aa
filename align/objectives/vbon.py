"""Variational best-of-n's knobs (Amini, Vieira, Cotterell 2407.06057; the math in align/math/vbon.py):
the `vbon` and `sampling` sections of jobs.train_vbon, shipped as they are to the Ray Train workers.

vBoN learns on its own samples, so it runs its own on-policy step algorithm (actors/vbon_trainer.py)
rather than the pair trainer's Objective protocol, and is not registered: these dataclasses are
its config sections and what its workers read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.runtime.config import require


@dataclass
class VbonParams:
    # what tune.train may vary, field -> (lo, hi); hi None: unbounded
    SWEEPABLE = {"n": (2, None), "beta": (1e-9, None), "k": (2, None)}

    n: int = 8  # the best-of-n the policy learns to behave like (beta = 1 / (n - 1))
    mode: Literal["vbon", "kl_rl"] = "vbon"  # vbon: reward log F_x(r) | kl_rl: the raw reward with `beta` (the baseline)
    beta: float | None = None  # kl_rl: the KL weight; vbon: null (it is 1 / (n - 1))
    algo: Literal["rloo", "ppo_clip"] = "rloo"  # the policy-gradient estimator
    clip: float = 0.2  # ppo_clip: the ratio clip
    k: int = 4  # samples per prompt per step (the RLOO group); >= 2
    reference_samples: int = 64  # M: pi_0 samples per training prompt that estimate F_x
    sync_every: int = 1  # steps between weight pushes to the generators (> 1: samples from an older policy)

    def __post_init__(self):
        require(self.n >= 2, "n", "an integer >= 2", self.n)
        require(self.k >= 2, "k", "an integer >= 2 (RLOO's leave-one-out baseline)", self.k)
        require(self.reference_samples >= 1, "reference_samples", "an integer >= 1", self.reference_samples)
        require(self.sync_every >= 1, "sync_every", "an integer >= 1", self.sync_every)
        require(0 < self.clip < 1, "clip", "a number in (0, 1)", self.clip)
        if self.mode == "kl_rl":
            require(self.beta is not None and self.beta > 0, "beta", "a number > 0 with mode kl_rl", self.beta)
        else:
            require(self.beta is None, "beta", "null with mode vbon (beta is 1 / (n - 1))", self.beta)

    @property
    def kl_weight(self) -> float:
        from align.math.vbon import vbon_beta

        return vbon_beta(self.n) if self.mode == "vbon" else float(self.beta)


@dataclass
class VbonSampling:
    temperature: float = 1.0
    max_new_tokens: int = 24
    min_new_tokens: int = 16
    stop_at_eos: bool = True

    def __post_init__(self):
        require(self.temperature > 0, "temperature", "a number > 0", self.temperature)
        require(0 <= self.min_new_tokens <= self.max_new_tokens, "min_new_tokens",
                f"0 <= min_new_tokens <= max_new_tokens ({self.max_new_tokens})", self.min_new_tokens)
