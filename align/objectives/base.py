"""What the trainer calls on an objective (Objective), the defaults most objectives share
(ObjectiveBase), and the log-prob helpers the preference losses are built from.

A batch holds one prefix-shared row per pair (align.data.pairs.collate_packed_pairs: the prompt
computed once) or chosen rows then rejected rows (2B rows, collate_pairs); one forward pass scores
both sides. The trainer loop knows nothing about any particular loss.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, runtime_checkable

import torch

from align.math import losses

ModelKind = Literal["causal_lm", "reward_model"]


@runtime_checkable
class Objective(Protocol):
    """A training objective as the trainer (actors/trainer.py train_worker) runs it. The instance is
    also the job's config section (a dataclass), and crosses to the Ray workers pickled."""

    NAME: ClassVar[str]  # the registered name (set by register_objective): run keys and sweetspot.json
    SWEEPABLE: ClassVar[dict[str, tuple[float, float | None]]]  # field -> (lo, hi) tune.train may vary; hi None: unbounded
    model_kind: ModelKind  # which model the trainer builds (align.engine.models.build_model_for)
    live_reference: bool  # a reference model runs beside the policy
    stored_reference: bool  # reference log-probs computed once, at step 0, and stored with the checkpoints
    ref_alpha: float  # the weight of a "soft" reference update

    def reference_update(self, step: int) -> str | None:
        """After optimizer step `step` (1-based): "soft" (theta_ref <- ref_alpha theta + (1 - ref_alpha)
        theta_ref), "hard" (theta_ref <- theta) or None."""
        ...

    def compute_loss(self, model, ref_model, batch: dict, eos_token_id: int | None) -> tuple[torch.Tensor, dict]:
        """(scalar loss, metrics) of a collated batch; ref_model is None unless live_reference, and
        stored reference log-probs come in the batch (ref_chosen_logps, ref_rejected_logps)."""
        ...

    def describe(self) -> str:
        """The title the job prints, e.g. "dpo (reference update: none)"."""
        ...


@dataclass
class ObjectiveBase:
    """Defaults for an objective on a causal LM with no reference model and nothing to sweep.
    Class attributes, not fields: a field is a config knob, and these are not."""

    NAME = "unregistered"
    SWEEPABLE = {}
    model_kind = "causal_lm"
    live_reference = False
    stored_reference = False
    ref_alpha = 1.0

    def reference_update(self, step: int) -> str | None:
        return None

    def describe(self) -> str:
        return self.NAME


def pair_logps(model, batch, eos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logps, rejected logps, chosen lengths), each (B,), under the sampling process the pairs
    were drawn with (temperature, eos blocked early): from one forward over B prefix-shared rows
    (align.data.pairs.collate_packed_pairs) or over 2B rows (collate_pairs)."""
    if "packed" in batch:
        return packed_pair_logps(model, batch, eos_token_id)
    logps, lengths = losses.model_sequence_logps(
        model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
        temperature=batch["temperature"], eos_token_id=eos_token_id, eos_blocked=batch["eos_blocked"])
    b = logps.shape[0] // 2
    return logps[:b], logps[b:], lengths[:b]


def packed_pair_logps(model, batch, eos_token_id: int | None = None):
    """pair_logps of prefix-shared rows: the LM head runs only on the kept columns."""
    allowed = batch["attention_4d"]
    dtype = next(model.parameters()).dtype
    # An additive mask: eager attention adds it, sdpa accepts it, and no softmax row is all -inf.
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, torch.finfo(dtype).min)
    logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                   logits_to_keep=int(batch["logits_to_keep"])).logits  # (B, keep, V)
    process = dict(temperature=batch["temperature"], eos_token_id=eos_token_id, eos_blocked=batch["blocked"])
    c, lengths = losses.gathered_logps(logits, batch["chosen_src"], batch["chosen_targets"], batch["chosen_mask"], **process)
    r, _ = losses.gathered_logps(logits, batch["rejected_src"], batch["rejected_targets"], batch["rejected_mask"], **process)
    return c, r, lengths


@torch.no_grad()
def reference_logps(ref_model, batch, eos_token_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference log-probs: precomputed ones in the batch if present, else from the live reference."""
    if "ref_chosen_logps" in batch and ref_model is None:
        return batch["ref_chosen_logps"], batch["ref_rejected_logps"]
    c, r, _ = pair_logps(ref_model, batch, eos_token_id)
    return c, r
