"""Decoding-time realignment (DeRa; Liu et al. 2402.02992): sample each token from a mix of a
reference model's and an aligned model's logits,

    softmax( lam * logits_aligned + (1 - lam) * logits_ref )          (eq. 6 of the paper)

If the aligned model is the KL-regularized optimum at strength beta, pi_beta(y|x) proportional to
pi_0(y|x) exp(r(x, y) / beta), the mix at one step is exactly pi_0 exp(lam r / beta): the policy aligned
at strength beta / lam, without training it. lam = 0 is the reference, lam = 1 the aligned model,
lam > 1 extrapolates. Per-row lambdas let one decoding pass serve a whole lambda sweep.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch import Tensor


def check_lambdas(lam) -> Tensor:
    """Lambdas as a float tensor, each finite and >= 0 (ValueError naming `lambda` otherwise)."""
    lam_t = torch.as_tensor(lam, dtype=torch.float32)
    if lam_t.numel() == 0 or not torch.isfinite(lam_t).all() or (lam_t < 0).any():
        raise ValueError(f"lambda must be finite numbers >= 0 (lambda > 1 extrapolates), got {lam!r}")
    return lam_t


def dera_logits(logits_ref: Tensor, logits_aligned: Tensor, lam: float | Tensor) -> Tensor:
    """lam * logits_aligned + (1 - lam) * logits_ref.

    logits_*: (B, V), the same vocabulary. lam: a float, or (B,) one per row. Temperature and
    end-of-sequence blocking apply afterwards, to the mixed logits, as for a single model.
    """
    if logits_ref.shape != logits_aligned.shape:
        raise ValueError(f"reference and aligned logits must have the same shape (one vocabulary), got "
                         f"{tuple(logits_ref.shape)} and {tuple(logits_aligned.shape)}")
    lam_t = check_lambdas(lam).to(logits_ref.device)
    if lam_t.dim() == 1:  # one per row
        if lam_t.numel() != logits_ref.shape[0]:
            raise ValueError(f"lambda must be one float or one per row ({logits_ref.shape[0]}), got {lam_t.numel()}")
        lam_t = lam_t[:, None]
    # torch.lerp is exact at both ends (lam 0 gives the reference's logits, lam 1 the aligned model's),
    # so DeRa at lam 0 / 1 draws exactly the samples of either model under the same seed.
    return torch.lerp(logits_ref.float(), logits_aligned.float(), lam_t)


def dera_mix(row_lambdas: Sequence[float] | Tensor) -> Callable[[list[Tensor], Tensor], Tensor]:
    """The `mix` of align.engine.sampling.NSampler for models [reference, aligned]: `row_lambdas` holds one
    lambda per original row (P * n), and `rows` maps the sampler's current rows to original ones."""
    lam = check_lambdas(row_lambdas)

    def mix(logits: list[Tensor], rows: Tensor) -> Tensor:
        ref, aligned = logits
        return dera_logits(ref, aligned, lam.to(rows.device)[rows])

    return mix
