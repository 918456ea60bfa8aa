"""DPO and IPO on preference pairs, with optional TR-DPO reference updates."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from align.math import losses
from align.objectives import register_objective
from align.objectives.base import ObjectiveBase, pair_logps, reference_logps
from align.runtime.config import require


@register_objective("preference")
@dataclass
class PreferenceObjective(ObjectiveBase):
    """DPO or IPO (Rafailov et al. 2305.18290; Azar et al. 2310.12036), optionally with TR-DPO
    reference updates (Gorbatovski et al. 2404.09656): ref_update none | soft | hard every tau steps."""

    loss: Literal["dpo", "ipo"] = "dpo"
    beta: float = 0.1  # KL strength (DPO) / 1 / (2 * target gap) (IPO); > 0
    ref_update: Literal["none", "soft", "hard"] = "none"  # TR-DPO (Gorbatovski et al. 2404.09656)
    ref_alpha: float = 0.6  # soft: theta_ref <- alpha * theta + (1 - alpha) * theta_ref
    ref_tau: int = 32  # update the reference every tau steps
    precompute_reference: bool = True  # ref_update none: store reference log-probs once instead of a live model

    SWEEPABLE = {"beta": (1e-9, None), "ref_alpha": (0.0, 1.0), "ref_tau": (1, None)}

    def __post_init__(self):
        require(self.loss in ("dpo", "ipo"), "loss", "one of 'dpo', 'ipo'", self.loss)
        require(self.beta > 0, "beta", "a number > 0", self.beta)
        require(self.ref_update in ("none", "soft", "hard"), "ref_update", "one of 'none', 'soft', 'hard'", self.ref_update)
        require(0 <= self.ref_alpha <= 1, "ref_alpha", "a number in [0, 1]", self.ref_alpha)
        require(self.ref_tau >= 1, "ref_tau", "an integer >= 1", self.ref_tau)

    @property
    def live_reference(self) -> bool:
        return self.ref_update != "none" or not self.precompute_reference

    @property
    def stored_reference(self) -> bool:
        return not self.live_reference

    def reference_update(self, step: int) -> str | None:
        return self.ref_update if self.ref_update != "none" and step % self.ref_tau == 0 else None

    def compute_loss(self, model, ref_model, batch, eos_token_id):
        pc, pr, _ = pair_logps(model, batch, eos_token_id)
        rc, rr = reference_logps(ref_model, batch, eos_token_id)
        fn = losses.dpo_loss if self.loss == "dpo" else losses.ipo_loss
        return fn(pc, pr, rc.to(pc.dtype), rr.to(pc.dtype), self.beta)

    def describe(self) -> str:
        return f"{self.loss} (reference update: {self.ref_update})"
