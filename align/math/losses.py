"""Preference and likelihood losses on per-sequence log-probs, plus what feeds and anchors them.

DPO, IPO, BoNBoN, SFT and Bradley-Terry losses; the TR-DPO reference update; the completion
log-prob helper.

Every loss takes plain tensors of shape (B,) and returns ``(loss, metrics)``: ``loss`` is a
differentiable 0-d tensor, ``metrics`` a dict of detached 0-d tensors to log. No config objects,
no distributed calls: the trainer gathers ZeRO-3 parameters and all-reduces metrics around these.
An optional ``weights`` (B,) turns every mean into a weighted mean sum(w * x) / sum(w); exact
enumeration tests use it to weight each (best, worst) pair by its probability.
See docs/algorithms.md: BoNBoN, DPO/IPO/TR-DPO, Bradley-Terry.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

Metrics = dict[str, Tensor]


def _check_same_shape(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected 1-D tensors of equal shape (B,), got {shapes}")


def _mean(x: Tensor, weights: Tensor | None) -> Tensor:
    """Mean over the batch, or sum(w * x) / sum(w) when weights (B,) are given."""
    if weights is None:
        return x.mean()
    if weights.shape != x.shape:
        raise ValueError(f"weights must have shape {tuple(x.shape)}, got {tuple(weights.shape)}")
    w = weights.to(x.dtype)
    return (w * x).sum() / w.sum()


def _check_beta(beta: float) -> None:
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")


def _preference_metrics(h_w: Tensor, h_l: Tensor, beta: float, weights: Tensor | None) -> Metrics:
    """TRL's DPO metric names: implicit rewards beta * h, their margin and accuracy."""
    h_w, h_l = h_w.detach(), h_l.detach()
    return {
        "rewards/chosen": _mean(beta * h_w, weights),
        "rewards/rejected": _mean(beta * h_l, weights),
        "rewards/margins": _mean(beta * (h_w - h_l), weights),
        "rewards/accuracies": _mean((h_w > h_l).to(h_w.dtype), weights),
        "logratio_gap": _mean(h_w - h_l, weights),
    }


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """DPO (Rafailov et al. 2305.18290, Eq. 7): mean of -log sigmoid(beta * (h_w - h_l)).

    h = policy_logps - ref_logps is the sequence log-ratio (sum over completion tokens).
    Argument order follows TRL's ``dpo_loss``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: (B,).
        beta: KL strength, > 0.
        weights: optional (B,) nonnegative example weights.

    Returns:
        loss 0-d, metrics: rewards/{chosen,rejected,margins,accuracies}, logratio_gap.
    """
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    _check_beta(beta)
    h_w = policy_chosen_logps - ref_chosen_logps  # (B,)
    h_l = policy_rejected_logps - ref_rejected_logps  # (B,)
    loss = _mean(-F.logsigmoid(beta * (h_w - h_l)), weights)
    return loss, _preference_metrics(h_w, h_l, beta, weights)


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """IPO (Azar et al. 2310.12036, the empirical IPO loss): mean of (h_w - h_l - 1 / (2 beta))^2.

    h is the *sequence-sum* log-ratio, as in the paper and in BoNBoN's target gap. TRL's
    ``loss_type="ipo"`` divides each log-prob by its length first; we do not.

    Args:
        as ``dpo_loss``; shapes (B,).

    Returns:
        loss 0-d, metrics: as ``dpo_loss`` plus target_gap = 1 / (2 beta).
    """
    _check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        ref_chosen_logps=ref_chosen_logps,
        ref_rejected_logps=ref_rejected_logps,
    )
    _check_beta(beta)
    h_w = policy_chosen_logps - ref_chosen_logps
    h_l = policy_rejected_logps - ref_rejected_logps
    target = 1.0 / (2.0 * beta)
    loss = _mean((h_w - h_l - target) ** 2, weights)
    metrics = _preference_metrics(h_w, h_l, beta, weights)
    metrics["target_gap"] = torch.tensor(target)
    return loss, metrics


def harmonic_number(k: int) -> float:
    """H_k = 1 + 1/2 + ... + 1/k (H_0 = 0)."""
    return sum(1.0 / i for i in range(1, k + 1))


def bonbon_beta(n: int) -> float:
    """beta*_n = 1 / (2 (n - 1) H_{n-1}) (Gui et al. 2406.00832; docs/algorithms.md, BoNBoN).

    The IPO target gap 1 / (2 beta*_n) = (n - 1) H_{n-1} is E[h_bon(best) - h_bon(worst)] for
    continuous rewards. Requires n >= 2 (a single draw has no worst/best pair).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an integer >= 2 for BoNBoN, got {n!r}")
    return 1.0 / (2.0 * (n - 1) * harmonic_number(n - 1))


def sft_loss(
    policy_chosen_logps: Tensor,
    chosen_lengths: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """SFT on chosen (best-of-n) sequences: mean of -log pi_theta(y_w | x) per sequence.

    Gui et al. 2406.00832, SFT-BoN term. The loss is per *sequence* (sum over tokens), matching
    the scale of the IPO term it is mixed with in BoNBoN.

    Args:
        policy_chosen_logps: (B,) sequence log-probs.
        chosen_lengths: optional (B,) completion token counts; adds metric nll/token =
            sum(w * nll) / sum(w * length) (tokens pooled over the batch).
        weights: optional (B,) example weights.

    Returns:
        loss 0-d, metrics: nll/sequence and, with lengths, nll/token.
    """
    if policy_chosen_logps.dim() != 1:
        shape = tuple(policy_chosen_logps.shape)
        raise ValueError(f"policy_chosen_logps must be (B,), got {shape}")
    nll = -policy_chosen_logps  # (B,)
    loss = _mean(nll, weights)
    metrics: Metrics = {"nll/sequence": loss.detach()}
    if chosen_lengths is not None:
        if chosen_lengths.shape != nll.shape:
            raise ValueError(
                f"chosen_lengths must have shape {tuple(nll.shape)}, "
                f"got {tuple(chosen_lengths.shape)}"
            )
        tokens = chosen_lengths.to(nll.dtype)
        w = torch.ones_like(nll) if weights is None else weights.to(nll.dtype)
        metrics["nll/token"] = ((w * nll.detach()).sum() / (w * tokens).sum()).detach()
    return loss, metrics


def bonbon_loss(
    policy_best_logps: Tensor,
    policy_worst_logps: Tensor,
    ref_best_logps: Tensor,
    ref_worst_logps: Tensor,
    n: int,
    alpha: float,
    best_lengths: Tensor | None = None,
    weights: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """BoNBoN (Gui et al. 2406.00832): alpha * L_sft(best) + (1 - alpha) * L_ipo(best, worst).

    The IPO term uses beta = bonbon_beta(n), i.e. target gap (n - 1) H_{n-1}. Best and worst are
    the highest- and lowest-reward of n samples from pi_0 for the same prompt. Only alpha = 1 has
    pi_bon as its exact optimum; alpha < 1 moves most of the way (docs/algorithms.md, BoNBoN).

    Args:
        policy_best_logps, policy_worst_logps, ref_best_logps, ref_worst_logps: (B,) sequence sums.
        n: samples per prompt the pairs were drawn from, >= 2.
        alpha: SFT weight in [0, 1].
        best_lengths: optional (B,) token counts of the best completions (for nll/token).
        weights: optional (B,) example weights.

    Returns:
        loss 0-d, metrics: loss/sft, loss/ipo, beta, and the ``ipo_loss`` / ``sft_loss`` metrics.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    beta = bonbon_beta(n)
    l_sft, m_sft = sft_loss(policy_best_logps, best_lengths, weights)
    l_ipo, m_ipo = ipo_loss(
        policy_best_logps, policy_worst_logps, ref_best_logps, ref_worst_logps, beta, weights
    )
    loss = alpha * l_sft + (1.0 - alpha) * l_ipo
    metrics = {"loss/sft": l_sft.detach(), "loss/ipo": l_ipo.detach(), "beta": torch.tensor(beta)}
    metrics.update(m_sft)
    metrics.update(m_ipo)
    return loss, metrics


def bradley_terry_loss(
    r_chosen: Tensor, r_rejected: Tensor, weights: Tensor | None = None
) -> tuple[Tensor, Metrics]:
    """Bradley-Terry reward-model loss: mean of -log sigmoid(r_c - r_r).

    Ouyang et al. 2203.02155, Eq. 1 (docs/algorithms.md, Bradley-Terry).

    Args:
        r_chosen, r_rejected: (B,) scalar rewards of the preferred / dispreferred completions.
        weights: optional (B,) example weights.

    Returns:
        loss 0-d, metrics: accuracy (fraction r_c > r_r), margin (mean r_c - r_r).
    """
    _check_same_shape(r_chosen=r_chosen, r_rejected=r_rejected)
    diff = r_chosen - r_rejected  # (B,)
    loss = _mean(-F.logsigmoid(diff), weights)
    d = diff.detach()
    return loss, {"accuracy": _mean((d > 0).to(d.dtype), weights), "margin": _mean(d, weights)}


@torch.no_grad()
def soft_update_(ref_params: Iterable[Tensor], params: Iterable[Tensor], alpha: float) -> None:
    """TR-DPO soft reference update (Gorbatovski et al. 2404.09656, soft update), in place.

    theta_ref <- alpha * theta + (1 - alpha) * theta_ref for each pair of tensors. Pure parameter
    math: with ZeRO-3 the caller gathers both parameter sets around this call. alpha = 0 leaves
    the reference bit-for-bit unchanged and alpha = 1 copies exactly.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
    pairs = list(zip(ref_params, params, strict=True))
    if alpha == 0.0:
        return
    for ref, p in pairs:
        # lerp_ is exact at weight 1 (returns end), unlike (1 - a) * ref + a * p.
        ref.lerp_(p.to(ref.dtype), alpha)


@torch.no_grad()
def hard_update_(ref_params: Iterable[Tensor], params: Iterable[Tensor]) -> None:
    """TR-DPO hard reference update (Gorbatovski et al. 2404.09656): theta_ref <- theta in place."""
    for ref, p in zip(ref_params, params, strict=True):
        ref.copy_(p)


def sequence_logps(
    logits: Tensor,
    labels: Tensor,
    loss_mask: Tensor,
    temperature: Tensor | float = 1.0,
    eos_token_id: int | None = None,
    eos_blocked: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum of completion-token log-probs log pi(y | x) = sum_t log pi(y_t | y_<t, x).

    pi is the sampling process the completions came from (``align.math.draw.process_logits``):
    logits / temperature, with ``eos_token_id`` at -inf where ``eos_blocked`` is True. The defaults
    (temperature 1, nothing blocked) give the model's own distribution.

    The usual causal shift: logits at position t predict token t + 1, so we score labels[:, 1:]
    under logits[:, :-1] where loss_mask[:, 1:] is True (completion tokens; prompt and padding are
    False). Computed in float32 as gather(logits) - logsumexp(logits), which never materializes a
    full (B, T, V) log_softmax (float64 logits stay float64, for gradcheck). Labels at masked
    positions may hold anything (e.g. -100).

    Args:
        logits: (B, T, V) any float dtype.
        labels: (B, T) int64 token ids.
        loss_mask: (B, T) bool.
        temperature: a float or (B,) per-row temperatures.
        eos_token_id, eos_blocked: the end token and a (B, T) bool mask, in label coordinates, of the
            tokens drawn while it was blocked (completion positions before min_new_tokens).

    Returns:
        logps (B,) float32 (float64 for float64 logits) and lengths (B,) int64 (scored tokens).
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2] or loss_mask.shape != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V), labels and loss_mask (B, T); got {tuple(logits.shape)}, "
            f"{tuple(labels.shape)}, {tuple(loss_mask.shape)}"
        )
    from align.math.draw import process_logits

    if torch.is_tensor(temperature):
        temperature = temperature.to(logits.device, logits.dtype).view(-1, 1, 1)  # (B, 1, 1)
    blocked = eos_blocked[:, 1:].bool() if eos_blocked is not None else False
    logits = process_logits(logits[:, :-1], temperature, eos_token_id, blocked)  # (B, T-1, V)
    mask = loss_mask[:, 1:].bool()  # (B, T-1)
    targets = torch.where(mask, labels[:, 1:], 0).unsqueeze(-1)  # (B, T-1, 1); 0 is a safe index
    dtype = torch.promote_types(logits.dtype, torch.float32)  # bf16 -> fp32, fp64 stays
    picked = logits.gather(-1, targets).squeeze(-1).to(dtype)  # (B, T-1)
    token_logps = picked - torch.logsumexp(logits.to(dtype), dim=-1)  # (B, T-1)
    # where, not multiply: a -inf logit at a padding position must not turn into NaN.
    logps = torch.where(mask, token_logps, 0.0).sum(-1)
    return logps, mask.sum(-1)


def gathered_logps(
    logits: Tensor,
    src: Tensor,
    targets: Tensor,
    mask: Tensor,
    temperature: Tensor | float = 1.0,
    eos_token_id: int | None = None,
    eos_blocked: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Sum of log-probs of `targets` where each is predicted by logits column `src`: the scoring of a
    prefix-shared row (align.data.pairs.collate_packed_pairs), where one column can predict tokens of both
    sides. Same process as ``sequence_logps`` (temperature, eos blocked per column).

    Args:
        logits: (B, K, V). src, targets: (B, T) int64 (column in K, token id); mask: (B, T) bool.
        temperature: a float or (B,) per-row temperatures. eos_blocked: (B, K) bool per column.

    Returns:
        logps (B,) float32 (float64 for float64 logits) and lengths (B,) int64.
    """
    from align.math.draw import process_logits

    B, K, V = logits.shape
    if torch.is_tensor(temperature):
        temperature = temperature.to(logits.device, logits.dtype).view(-1, 1, 1)
    logits = process_logits(logits, temperature, eos_token_id, eos_blocked.bool() if eos_blocked is not None else False)
    dtype = torch.promote_types(logits.dtype, torch.float32)
    lse = torch.logsumexp(logits.to(dtype), dim=-1)  # (B, K), once per column whichever side uses it
    src, targets = torch.where(mask, src, 0), torch.where(mask, targets, 0)
    picked = logits.reshape(B, K * V).gather(1, src * V + targets).to(dtype)  # (B, T)
    token_logps = picked - lse.gather(1, src)
    return torch.where(mask, token_logps, 0.0).sum(-1), mask.sum(-1)


def model_sequence_logps(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, loss_mask: Tensor, **process
) -> tuple[Tensor, Tensor]:
    """Run a causal LM (HF-style: ``model(...).logits``) and return ``sequence_logps`` of input_ids.

    Args:
        input_ids, attention_mask, loss_mask: (B, T); loss_mask marks completion tokens.
        process: temperature, eos_token_id, eos_blocked, passed to ``sequence_logps``.

    Returns:
        logps (B,) float32, lengths (B,) int64.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits  # (B, T, V)
    return sequence_logps(logits, input_ids, loss_mask.bool() & attention_mask.bool(), **process)
