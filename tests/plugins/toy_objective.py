"""A training objective from outside the project, as a user would write one: this module alone,
no project file edited. Jobs and tests name it "tests.plugins.toy_objective:toy_sft"."""
from __future__ import annotations

from dataclasses import dataclass

from align.objectives import register_objective
from align.objectives.base import ObjectiveBase, pair_logps


@register_objective("toy_sft")
@dataclass
class ToySftObjective(ObjectiveBase):
    """Supervised fine-tuning on the chosen completions: the negative mean log-prob of the chosen
    side of each pair; the rejected side and any reference model are ignored."""

    def compute_loss(self, model, ref_model, batch, eos_token_id):
        chosen, _, _ = pair_logps(model, batch, eos_token_id)
        return -chosen.mean(), {"sft_logp": chosen.mean().detach()}
