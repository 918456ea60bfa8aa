"""Reward scorers against overoptimization: how best-of-n turns raw rewards into a selection score.

A proxy reward is only trustworthy near the data it was fit on, so picking the argmax of n samples
rewards the samples whose score is most inflated by the proxy's errors (reward hacking). Each
function here is a remedy that makes the score more conservative or the selection stay closer to
pi_0; all are pure torch math over reward tensors, work in the input's dtype (float64 for exact
checks), and reject NaN and bad shapes with a ValueError that names the argument.

- reward ensembles (mean, worst case, uncertainty-weighted): Coste et al. 2310.02743;
- uncertainty-penalized ranking mu - k * sigma (or sigma^2): Yang et al. 2402.13210;
- the LSC transform log sigmoid(r - r_ref) and its sum over properties: Wang et al. 2402.00742;
- regularized BoN, RBoN-KL and RBoN-WD: Jinnai et al. 2404.01054.

Shapes: P prompts, n samples per prompt, k reward models or properties, d embedding width.
See docs/algorithms.md, section "Reward scorers against overoptimization".
"""

from __future__ import annotations

import math
from numbers import Real

import torch
import torch.nn.functional as F
from torch import Tensor

ENSEMBLE_MODES = ("mean", "worst", "uncertainty_weighted")
PENALTY_USES = ("std", "var")
COMBINE_METHODS = ("sum_of_lsc", "sum_raw")

# A variance below zero by at most this many ulps of (1 + mean^2) is rounding (e.g. from
# E[r^2] - E[r]^2) and is clamped to 0; anything more negative is a bug upstream.
_VAR_ROUNDING_ULPS = 100


def _check_nonneg(value, name: str) -> float:
    """A finite real number >= 0 (bools are rejected: True is not a coefficient)."""
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value!r}")
    return float(value)


def _check_choice(value, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {' | '.join(allowed)}, got {value!r}")
    return value


def _check_tensor(x, name: str, dims: int | tuple[int, ...] | None, shape_doc: str) -> Tensor:
    """A non-empty tensor with an allowed number of dims (None: any) and no NaN.

    Integer tensors are promoted to the default float dtype so that means and logsigmoid work.
    """
    dims = (dims,) if isinstance(dims, int) else dims
    bad_dim = isinstance(x, Tensor) and dims is not None and x.dim() not in dims
    if not isinstance(x, Tensor) or bad_dim or x.numel() == 0:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a non-empty tensor of shape {shape_doc}, got {got}")
    if not x.is_floating_point():
        x = x.to(torch.get_default_dtype())
    if torch.isnan(x).any():
        raise ValueError(f"{name} must not contain NaN")
    return x


def ensemble_reward(
    member_rewards: Tensor, mode: str, coef: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Combine k reward models' scores of the same samples into one (Coste et al. 2310.02743).

    With r_1..r_k the members' rewards, mean = (1/k) sum_i r_i and the intra-ensemble variance
    var = (1/k) sum_i (r_i - mean)^2 (population variance, as in the paper's UWO objective):

        mean:                  mean
        worst:                 min_i r_i                  (WCO, worst-case optimization)
        uncertainty_weighted:  mean - coef * var          (UWO, uncertainty-weighted optimization)

    Disagreement between members marks samples where the proxy is extrapolating; the worst case
    and the variance penalty both refuse to reward such samples on the optimistic members' word.

    Args:
        member_rewards: [members, ...] rewards, one row per member (any trailing shape, e.g.
            [members, prompts, n]); members >= 1.
        mode: "mean" | "worst" | "uncertainty_weighted".
        coef: the variance weight lambda >= 0 (used only by "uncertainty_weighted").

    Returns:
        (combined, mean, var), each of shape member_rewards.shape[1:]. One member gives var == 0
        and combined == that member exactly, for every mode; identical members give the same
        up to the rounding of their mean.
    """
    _check_choice(mode, "mode", ENSEMBLE_MODES)
    coef = _check_nonneg(coef, "coef")
    r = _check_tensor(member_rewards, "member_rewards", None, "[members, ...]")
    if r.dim() == 0:
        raise ValueError(
            "member_rewards must be a non-empty tensor of shape [members, ...], got ()"
        )
    var, mean = torch.var_mean(r, dim=0, correction=0)
    if mode == "mean":
        combined = mean
    elif mode == "worst":
        combined = r.min(dim=0).values
    else:
        combined = mean - coef * var
    return combined, mean, var


def penalized_reward(mean: Tensor, var: Tensor, k: float, use: str = "std") -> Tensor:
    """Pessimistic ranking score from a predictive mean and variance (Yang et al. 2402.13210).

    With a Bayesian (e.g. Laplace-LoRA) reward model's predictive mu(x, y) and sigma^2(x, y):

        use="std":  mu - k * sigma
        use="var":  mu - k * sigma^2

    A lower confidence bound: samples the reward model is unsure about (far from its training
    data, where hacking happens) must beat the others by k standard deviations to be chosen.

    Args:
        mean: [...] predictive means.
        var: [...] predictive variances, same shape as mean; >= 0 (negatives within rounding,
            100 ulps of 1 + mean^2, are clamped to 0).
        k: penalty weight >= 0; k = 0 gives back mean.
        use: "std" | "var".

    Returns:
        [...] tensor, the same shape as mean.
    """
    _check_choice(use, "use", PENALTY_USES)
    k = _check_nonneg(k, "k")
    mu = _check_tensor(mean, "mean", None, "[...]")
    v = _check_tensor(var, "var", None, "[...] (same as mean)")
    if v.shape != mu.shape:
        raise ValueError(
            f"var must have the same shape as mean {tuple(mu.shape)}, got {tuple(v.shape)}"
        )
    tol = _VAR_ROUNDING_ULPS * torch.finfo(v.dtype).eps * (1 + mu.to(v.dtype) ** 2)
    if (v < -tol).any():
        raise ValueError(f"var must be >= 0, got min {v.min().item():.6g}")
    v = v.clamp_min(0)
    penalty = v.sqrt() if use == "std" else v
    return mu - k * penalty


def reference_reward(ref_rewards: Tensor, quantile: float) -> Tensor:
    """Per-prompt reference reward r_ref(x): a quantile of pi_0's rewards (Wang et al. 2402.00742).

    The LSC transform is centred at r_ref(x); the paper takes it as a quantile of the rewards of
    pi_0 samples for the same prompt, so "good" means "better than what pi_0 already does here".
    torch.quantile with linear interpolation: quantile 0.5 of [1, 2, 3, 4] is 2.5.

    Args:
        ref_rewards: [prompts, m] rewards of m >= 1 pi_0 samples per prompt.
        quantile: in [0, 1] (0 is the min, 1 the max).

    Returns:
        [prompts] tensor.
    """
    if (
        isinstance(quantile, bool)
        or not isinstance(quantile, Real)
        or not 0.0 <= float(quantile) <= 1.0
    ):
        raise ValueError(f"quantile must be in [0, 1], got {quantile!r}")
    r = _check_tensor(ref_rewards, "ref_rewards", 2, "[prompts, m]")
    return torch.quantile(r, float(quantile), dim=1, interpolation="linear")


def lsc_transform(r: Tensor, r_ref: Tensor) -> Tensor:
    """u = log sigmoid(r - r_ref(x)), the LSC transform (Wang et al. 2402.00742).

    Under Bradley-Terry, sigmoid(r - r_ref) is the probability that y beats the reference, so u is
    a log-probability: always <= 0, monotone in r, log(1/2) at r == r_ref. It saturates at 0 for
    r >> r_ref, so once a sample is clearly good, pushing its reward higher (where the proxy is
    least reliable) earns almost nothing. F.logsigmoid keeps it finite for large |r - r_ref|.

    Args:
        r: [prompts, n] (or [prompts]) rewards.
        r_ref: [prompts] reference reward per prompt, broadcast over the sample dim.

    Returns:
        tensor of r's shape.
    """
    r = _check_tensor(r, "r", (1, 2), "[prompts, n] or [prompts]")
    ref = _check_tensor(r_ref, "r_ref", 1, "[prompts]")
    if ref.shape[0] != r.shape[0]:
        raise ValueError(
            f"r_ref must have shape [prompts] = ({r.shape[0]},) to match r, got {tuple(ref.shape)}"
        )
    ref = ref[:, None] if r.dim() == 2 else ref
    return F.logsigmoid(r - ref)


def combine_rewards(rewards: Tensor, method: str, r_refs: Tensor | None = None) -> Tensor:
    """Combine k properties' rewards into one score per sample (Wang et al. 2402.00742).

        sum_of_lsc:  sum_i log sigmoid(r_i - r_ref,i)   log P(good on every property), an AND
        sum_raw:     sum_i r_i                          the baseline

    With the raw sum a sample can buy a terrible score on one property with a huge (possibly
    hacked) score on another; with the LSC sum the huge score saturates near 0 while the terrible
    one costs about r_i - r_ref,i, so the sample that is good on all properties wins.

    Args:
        rewards: [k, prompts, n] rewards of k properties.
        method: "sum_of_lsc" | "sum_raw".
        r_refs: [k, prompts] reference rewards (see reference_reward); required for
            "sum_of_lsc", ignored by "sum_raw".

    Returns:
        [prompts, n] tensor.
    """
    _check_choice(method, "method", COMBINE_METHODS)
    r = _check_tensor(rewards, "rewards", 3, "[k, prompts, n]")
    if method == "sum_raw":
        return r.sum(0)
    if r_refs is None:
        raise ValueError("r_refs ([k, prompts] reference rewards) is required for sum_of_lsc")
    refs = _check_tensor(r_refs, "r_refs", 2, "[k, prompts]")
    if refs.shape != r.shape[:2]:
        raise ValueError(
            f"r_refs must have shape [k, prompts] = {tuple(r.shape[:2])}, got {tuple(refs.shape)}"
        )
    return F.logsigmoid(r - refs[:, :, None]).sum(0)  # lsc_transform per property, summed


def cosine_cost(embeddings: Tensor) -> Tensor:
    """Pairwise cost c(y_i, y_j) = 1 - cos(e_i, e_j) between a prompt's samples (for RBoN-WD).

    Jinnai et al. 2404.01054 use this cost on sentence embeddings. The result is made exactly
    symmetric with an exactly zero diagonal (c(y, y) = 0, even for a zero embedding), so that
    rounding in the matmul cannot break ties between otherwise equal samples.

    Args:
        embeddings: [prompts, n, d].

    Returns:
        [prompts, n, n] tensor with values in [0, 2].
    """
    e = _check_tensor(embeddings, "embeddings", 3, "[prompts, n, d]")
    unit = F.normalize(e, p=2, dim=-1)
    sim = unit @ unit.transpose(-1, -2)  # [P, n, n]
    sim = 0.5 * (sim + sim.transpose(-1, -2))
    cost = (1 - sim).clamp(0, 2)
    eye = torch.eye(e.shape[1], dtype=torch.bool, device=e.device)
    return cost.masked_fill(eye, 0.0)


def _check_beta_and_rewards(rewards: Tensor, beta: float) -> tuple[Tensor, float]:
    beta = _check_nonneg(beta, "beta")
    return _check_tensor(rewards, "rewards", 2, "[prompts, n]"), beta


def rbon_kl_select(rewards: Tensor, logps: Tensor, beta: float) -> Tensor:
    """RBoN-KL: argmax_i r(x, y_i) + beta * log pi_0(y_i | x) (Jinnai et al. 2404.01054).

    The paper's KL-regularized selection, argmax_y r(y) - beta * KL(1_y || pi_0), where the KL of
    a point mass at y is -log pi_0(y|x). Samples pi_0 finds unlikely are where the reward model
    has seen least data, so the bonus on log pi_0 keeps the choice near pi_0; beta -> infinity
    picks the most likely sample.

    Args:
        rewards: [prompts, n] rewards.
        logps: [prompts, n] log pi_0(y_i | x), summed over completion tokens (-inf allowed).
        beta: >= 0; beta = 0 is exactly bon_select (argmax, ties to the lowest index), even when
            logps holds -inf.

    Returns:
        [prompts] int64 indices in [0, n).
    """
    r, beta = _check_beta_and_rewards(rewards, beta)
    lp = _check_tensor(logps, "logps", 2, "[prompts, n] (same as rewards)")
    if lp.shape != r.shape:
        raise ValueError(
            f"logps must have the same shape as rewards {tuple(r.shape)}, got {tuple(lp.shape)}"
        )
    if beta == 0:
        return torch.argmax(r, dim=1)  # no 0 * -inf = NaN; documented: first maximal index
    return torch.argmax(r + beta * lp, dim=1)


def rbon_wd_select(rewards: Tensor, cost: Tensor, beta: float) -> Tensor:
    """RBoN-WD: argmax_i r(x, y_i) - beta * (1/n) sum_j c(y_i, y_j) (Jinnai et al. 2404.01054).

    The Wasserstein distance between a point mass at y_i and the empirical pi_0 distribution of
    the n samples is the mean cost (1/n) sum_j c(y_i, y_j) (j = i included, with c = 0). The
    penalty favours samples typical of pi_0's output rather than outliers that the proxy reward
    happens to love; beta -> infinity picks the medoid (smallest mean cost).

    Args:
        rewards: [prompts, n] rewards.
        cost: [prompts, n, n] pairwise costs, e.g. cosine_cost of sentence embeddings.
        beta: >= 0; beta = 0 is exactly bon_select (argmax, ties to the lowest index).

    Returns:
        [prompts] int64 indices in [0, n).
    """
    r, beta = _check_beta_and_rewards(rewards, beta)
    c = _check_tensor(cost, "cost", 3, "[prompts, n, n]")
    p, n = r.shape
    if c.shape != (p, n, n):
        raise ValueError(
            f"cost must have shape [prompts, n, n] = {(p, n, n)}, got {tuple(c.shape)}"
        )
    if beta == 0:
        return torch.argmax(r, dim=1)
    return torch.argmax(r - beta * c.mean(dim=-1), dim=1)
