"""Variational best-of-n (Amini, Vieira, Cotterell 2407.06057): fine-tune pi_theta to minimise the
reverse KL(pi_theta || pi_bon). With log pi_bon(y|x) = log pi_0(y|x) + log n + (n - 1) log F_x(r(x, y))
(F_x: the CDF of the reward under pi_0 on prompt x) this is KL-regularised RL:

    maximise  E_{y ~ pi_theta} [ log F_x(r(x, y)) ]  -  beta * KL(pi_theta || pi_0),   beta = 1 / (n - 1)

F_x is estimated from M rewards of pi_0 samples per prompt (`log_cdf`). The gradient is estimated
with RLOO (k samples per prompt, each one's baseline the mean of the other k - 1) on the
KL-shaped reward log F - beta (log pi_theta - log pi_0), or with PPO's clipped ratio on the same
advantages when the samples came from an older copy of the policy. With the raw reward in place of
log F and any beta, the same loss is the KL-regularised RL baseline.

Plain tensors in, (loss, metrics) out; no Ray, no DeepSpeed (actors/vbon_trainer.py drives them).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def vbon_beta(n: int) -> float:
    """beta = 1 / (n - 1): the KL weight under which maximising E[log F] - beta KL is vBoN's objective."""
    if n < 2:
        raise ValueError(f"n must be >= 2 for vBoN (n = 1 is pi_0 itself), got {n}")
    return 1.0 / (n - 1)


def vbon_objective_at_bon(n: int) -> float:
    """vBoN's objective J(pi) = E_pi[log F_x(r)] - KL(pi || pi_0) / (n - 1) at pi_bon, its maximiser
    (Amini et al. 2407.06057), for continuous rewards: under pi_bon, F_x(r) ~ Beta(n, 1), so
    E[log F] = -1/n, and KL = log n - (n - 1)/n; together J = -log(n) / (n - 1). (At pi_0: -1.)"""
    if n < 2:
        raise ValueError(f"n must be >= 2 for vBoN (n = 1 is pi_0 itself), got {n}")
    return -math.log(n) / (n - 1)


def log_cdf(rewards: Tensor, ref_rewards: Tensor) -> Tensor:
    """log F_x(r): the smoothed empirical CDF of each reward among its prompt's M reference rewards.

    rewards (P, k) or (k,), ref_rewards (P, M) or (M,). F = (#{ref < r} + #{ref == r} / 2 + 1) / (M + 2):
    mid-ranks make a reward equal to every reference sit at 1/2, and the +1 / +2 (a uniform prior
    on the rank) keeps F inside [1/(M+2), (M+1)/(M+2)], so log F stays finite for a reward below or
    above every reference. The mid-rank CDF also matches the discrete BoN distribution best:
    pi_bon(y) = F(y)^n - F(y-)^n ~ n pi_0(y) F_mid(y)^(n-1).
    """
    squeeze = rewards.dim() == 1
    if squeeze:
        rewards, ref_rewards = rewards[None], ref_rewards[None]
    if rewards.dim() != 2 or ref_rewards.dim() != 2 or rewards.shape[0] != ref_rewards.shape[0]:
        raise ValueError(f"rewards (P, k) and ref_rewards (P, M) need the same P; got {tuple(rewards.shape)}, "
                         f"{tuple(ref_rewards.shape)}")
    r, ref = rewards.double()[:, :, None], ref_rewards.double()[:, None, :]  # (P, k, 1), (P, 1, M)
    below = (ref < r).sum(-1).double() + 0.5 * (ref == r).sum(-1).double()
    out = torch.log((below + 1.0) / (ref_rewards.shape[-1] + 2.0))
    return out[0] if squeeze else out


def rloo_advantages(rewards: Tensor) -> Tensor:
    """rewards (P, k), k >= 2 samples per prompt -> R_i - mean_{j != i} R_j = k / (k - 1) (R_i - mean R)."""
    k = rewards.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs k >= 2 samples per prompt, got {k}")
    return (rewards - rewards.mean(-1, keepdim=True)) * (k / (k - 1))


def shaped_rewards(task_reward: Tensor, logp: Tensor, ref_logp: Tensor, beta: float) -> Tensor:
    """r - beta (log pi_theta(y) - log pi_0(y)) per sample (detached): its expectation is the
    objective E[r] - beta KL, and with the score function its gradient."""
    return task_reward.double() - beta * (logp.detach().double() - ref_logp.double())


def policy_gradient_loss(logp: Tensor, ref_logp: Tensor, task_reward: Tensor, beta: float, k: int,
                         old_logp: Tensor | None = None, clip: float = 0.2) -> tuple[Tensor, dict[str, Tensor]]:
    """The loss whose gradient estimates -grad (E[r] - beta KL(pi_theta || pi_0)), for B = P * k
    samples, k consecutive per prompt.

    logp (B,): log pi_theta(y|x) with gradient; ref_logp (B,): log pi_0(y|x); task_reward (B,):
    log F_x(r) for vBoN or the raw reward for the KL-regularised baseline. old_logp None: RLOO,
    -mean(A * logp). old_logp given (the log-probs under the policy that sampled y): PPO-clip,
    -mean(min(rho A, clip(rho, 1 - clip, 1 + clip) A)) with rho = exp(logp - old_logp); at rho = 1
    its gradient equals RLOO's.
    """
    B = logp.shape[0]
    if B % k or logp.shape != ref_logp.shape or logp.shape != task_reward.shape:
        raise ValueError(f"logp, ref_logp, task_reward need the same shape (P * k,) with k = {k}; got "
                         f"{tuple(logp.shape)}, {tuple(ref_logp.shape)}, {tuple(task_reward.shape)}")
    shaped = shaped_rewards(task_reward, logp, ref_logp, beta)
    adv = rloo_advantages(shaped.view(-1, k)).view(-1).to(logp.dtype)
    if old_logp is None:
        loss = -(adv * logp).mean()
        clipped = torch.zeros((), dtype=logp.dtype)
    else:
        rho = torch.exp(logp - old_logp.to(logp.dtype))
        loss = -torch.minimum(rho * adv, rho.clamp(1 - clip, 1 + clip) * adv).mean()
        clipped = ((rho - 1).abs() > clip).to(logp.dtype).mean().detach()
    kl = (logp.detach() - ref_logp).double()
    metrics = {"reward": task_reward.double().mean(), "kl": kl.mean(), "shaped_reward": shaped.mean(),
               "clipped": clipped}
    return loss, metrics


def state_digest(state: dict[str, Tensor]) -> str:
    """A hash of a state dict's names, dtypes, shapes and exact values (float32 on the CPU), so two
    copies of a model can be checked equal bit for bit without moving them next to each other."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu")
        t = t.float() if t.is_floating_point() else t
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def completion_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]], pad_id: int,
                     min_new_tokens: int = 0) -> dict[str, Tensor]:
    """Right-padded rows prompt + completion for scoring sampled completions (align.math.losses.
    model_sequence_logps): input_ids, attention_mask, loss_mask (completion tokens) and eos_blocked
    (completion positions before min_new_tokens, where the sampler blocked end-of-sequence)."""
    rows = [p + c for p, c in zip(prompt_ids, completion_ids)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention = torch.zeros(len(rows), T, dtype=torch.long)
    loss_mask = torch.zeros(len(rows), T, dtype=torch.bool)
    blocked = torch.zeros(len(rows), T, dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention[i, : len(p) + len(c)] = 1
        loss_mask[i, len(p) : len(p) + len(c)] = True
        blocked[i, len(p) : len(p) + min(len(c), min_new_tokens)] = True
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss_mask, "eos_blocked": blocked}
