"""A Bradley-Terry reward model (Bradley and Terry 1952; as in Ouyang et al. 2203.02155)."""
from __future__ import annotations

from dataclasses import dataclass

from align.math import losses
from align.objectives import register_objective
from align.objectives.base import ObjectiveBase


@register_objective("bradley_terry")
@dataclass
class BradleyTerryObjective(ObjectiveBase):
    """Reward model: one-logit sequence classifier trained with -log sigmoid(r_chosen - r_rejected)."""

    model_kind = "reward_model"

    def compute_loss(self, model, ref_model, batch, eos_token_id):
        # eos_token_id is unused: a reward model scores sequences, it does not sample them
        r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        b = r.shape[0] // 2
        return losses.bradley_terry_loss(r[:b], r[b:])

    def describe(self) -> str:
        return "reward model (Bradley-Terry)"
