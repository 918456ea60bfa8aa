"""BoNBoN: fine-tune on best-of-n pairs so that one sample behaves like best-of-n."""
from __future__ import annotations

from dataclasses import dataclass

from align.math import losses
from align.objectives import register_objective
from align.objectives.base import ObjectiveBase, pair_logps, reference_logps
from align.runtime.config import require


@register_objective("bonbon")
@dataclass
class BonbonObjective(ObjectiveBase):
    """BoNBoN (Gui et al. 2406.00832): alpha * SFT(best) + (1 - alpha) * IPO(best, worst) at beta*_n,
    against pi_0's log-probs, computed once at step 0."""

    n: int = 8  # samples per prompt the best/worst pairs were drawn from (sets beta*_n); >= 2
    alpha: float = 0.5  # SFT weight in [0, 1]; 1 = SFT on best-of-n only

    SWEEPABLE = {"alpha": (0.0, 1.0)}
    stored_reference = True

    def __post_init__(self):
        require(self.n >= 2, "n", "an integer >= 2 (best and worst of n samples)", self.n)
        require(0 <= self.alpha <= 1, "alpha", "a number in [0, 1]", self.alpha)

    def compute_loss(self, model, ref_model, batch, eos_token_id):
        pc, pr, lengths = pair_logps(model, batch, eos_token_id)
        rc, rr = reference_logps(ref_model, batch, eos_token_id)
        return losses.bonbon_loss(pc, pr, rc.to(pc.dtype), rr.to(pc.dtype), self.n, self.alpha, best_lengths=lengths)

    def describe(self) -> str:
        return f"BoNBoN (n={self.n}, alpha={self.alpha})"
