"""Training objectives as small objects: which model to build, whether a reference model runs live,
and how a collated batch of pairs becomes (loss, metrics) through the pure losses in align/math/losses.

A batch holds one prefix-shared row per pair (align.data.pairs.collate_packed_pairs: the prompt computed once)
or chosen rows then rejected rows (2B rows, collate_pairs); one forward pass scores both sides. The trainer loop knows nothing about any particular loss.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from align.math import losses


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


@dataclass
class PreferenceObjective:
    """DPO or IPO (Rafailov et al. 2305.18290; Azar et al. 2310.12036), optionally with TR-DPO
    reference updates (Gorbatovski et al. 2404.09656): ref_update none | soft | hard every tau steps."""

    loss: str = "dpo"  # dpo | ipo
    beta: float = 0.1
    ref_update: str = "none"
    ref_alpha: float = 0.6
    ref_tau: int = 32
    precompute_reference: bool = True
    eos_token_id: int | None = None  # the tokenizer's; set by the trainer

    kind = "causal_lm"

    def __post_init__(self):
        if self.loss not in ("dpo", "ipo"):
            raise ValueError(f"dpo.loss must be 'dpo' or 'ipo', got {self.loss!r}")
        if self.ref_update not in ("none", "soft", "hard"):
            raise ValueError(f"dpo.ref_update must be 'none', 'soft' or 'hard', got {self.ref_update!r}")

    @property
    def live_reference(self) -> bool:
        return self.ref_update != "none" or not self.precompute_reference

    @property
    def stored_reference(self) -> bool:
        """A frozen reference whose log-probs are computed once, at step 0, and kept with the run."""
        return not self.live_reference

    def __call__(self, model, ref_model, batch):
        pc, pr, _ = pair_logps(model, batch, self.eos_token_id)
        rc, rr = reference_logps(ref_model, batch, self.eos_token_id)
        fn = losses.dpo_loss if self.loss == "dpo" else losses.ipo_loss
        return fn(pc, pr, rc.to(pc.dtype), rr.to(pc.dtype), self.beta)


@dataclass
class BonbonObjective:
    """BoNBoN (Gui et al. 2406.00832): alpha * SFT(best) + (1 - alpha) * IPO(best, worst) at beta*_n."""

    n: int = 8
    alpha: float = 0.5
    eos_token_id: int | None = None  # the tokenizer's; set by the trainer

    kind = "causal_lm"
    live_reference = False
    stored_reference = True
    ref_update = "none"

    def __call__(self, model, ref_model, batch):
        pc, pr, lengths = pair_logps(model, batch, self.eos_token_id)
        rc, rr = reference_logps(ref_model, batch, self.eos_token_id)
        return losses.bonbon_loss(pc, pr, rc.to(pc.dtype), rr.to(pc.dtype), self.n, self.alpha, best_lengths=lengths)


@dataclass
class BradleyTerryObjective:
    """Reward model: one-logit sequence classifier trained with -log sigmoid(r_chosen - r_rejected)."""

    eos_token_id: int | None = None  # unused: a reward model scores, it does not sample

    kind = "reward_model"
    live_reference = False
    stored_reference = False
    ref_update = "none"

    def __call__(self, model, ref_model, batch):
        r = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0]
        b = r.shape[0] // 2
        return losses.bradley_terry_loss(r[:b], r[b:])


OBJECTIVES = {"preference": PreferenceObjective, "bonbon": BonbonObjective, "bradley_terry": BradleyTerryObjective}


def make_objective(name: str, params: dict):
    if name not in OBJECTIVES:
        raise ValueError(f"objective must be one of {sorted(OBJECTIVES)}, got {name!r}")
    return OBJECTIVES[name](**params)
