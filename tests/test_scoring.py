"""align/math/scoring.py and align/engine/embeddings.py: hand-worked values, limits in beta, validation."""

import math

import pytest
import torch
from torch.testing import assert_close

from align.math.bon import bon_select
from align.math.scoring import (
    combine_rewards,
    cosine_cost,
    ensemble_reward,
    lsc_transform,
    penalized_reward,
    rbon_kl_select,
    rbon_wd_select,
    reference_reward,
)

F64 = torch.float64
LOG_HALF = math.log(0.5)  # -.693147181


def t(*rows):
    return torch.tensor(rows, dtype=F64)


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# ---------------------------------------------------------------- ensembles (Coste et al.)

# 3 members x 2 samples.  Column 0: [1, 3, 2], mean 2, var (1 + 1 + 0) / 3 = 2/3, min 1.
#                         Column 1: [4, 0, 2], mean 2, var (4 + 4 + 0) / 3 = 8/3, min 0.
MEMBERS = t([1.0, 4.0], [3.0, 0.0], [2.0, 2.0])


def test_ensemble_mean_and_population_var():
    combined, mean, var = ensemble_reward(MEMBERS, "mean")
    assert_close(combined, t(2.0, 2.0))
    assert_close(mean, t(2.0, 2.0))
    assert_close(var, t(2 / 3, 8 / 3))  # unbiased=False: divide by k = 3, not k - 1


def test_ensemble_worst_is_min():
    combined, _, _ = ensemble_reward(MEMBERS, "worst")
    assert_close(combined, t(1.0, 0.0))
    r = _randn(5, 4, 3, seed=0)
    assert_close(ensemble_reward(r, "worst")[0], r.min(dim=0).values, rtol=0, atol=0)


def test_ensemble_uncertainty_weighted_hand_worked():
    # coef .75: [2 - .75 * 2/3, 2 - .75 * 8/3] = [2 - .5, 2 - 2] = [1.5, 0].
    combined, _, _ = ensemble_reward(MEMBERS, "uncertainty_weighted", coef=0.75)
    assert_close(combined, t(1.5, 0.0))
    # coef 0 is the mean.
    assert_close(ensemble_reward(MEMBERS, "uncertainty_weighted")[0], t(2.0, 2.0))


@pytest.mark.parametrize("mode", ["mean", "worst", "uncertainty_weighted"])
def test_ensemble_of_identical_members_is_one_member(mode):
    member = _randn(2, 3, seed=1)  # [prompts, n]
    combined, mean, var = ensemble_reward(member.expand(4, 2, 3), mode, coef=5.0)
    assert_close(combined, member)
    assert_close(mean, member)
    assert_close(var, torch.zeros_like(member))
    # A single member: var is exactly 0 and every mode returns the member exactly.
    combined, mean, var = ensemble_reward(member[None], mode, coef=5.0)
    assert torch.equal(var, torch.zeros_like(member))
    assert torch.equal(combined, member) and torch.equal(mean, member)


# ---------------------------------------------------------------- penalized ranking (Yang et al.)


def test_penalized_reward_hand_worked():
    mean, var = t(1.0, 2.0, 0.5), t(0.25, 4.0, 0.0)
    # std = [.5, 2, 0]; k = 2: [1 - 1, 2 - 4, .5 - 0] = [0, -2, .5].
    assert_close(penalized_reward(mean, var, k=2.0), t(0.0, -2.0, 0.5))
    # var: [1 - 2 * .25, 2 - 2 * 4, .5 - 0] = [.5, -6, .5].
    assert_close(penalized_reward(mean, var, k=2.0, use="var"), t(0.5, -6.0, 0.5))
    # k = 0 is the mean.
    assert_close(penalized_reward(mean, var, k=0.0), mean)


def test_penalized_reward_clamps_rounding_negatives_only():
    mean = t(1.0, 3.0)
    # E[r^2] - E[r]^2 style rounding: -1e-17 is clamped to 0, so sigma = 0 and the score is mu.
    assert_close(penalized_reward(mean, t(-1e-17, 0.0), k=3.0), mean, rtol=0, atol=0)
    with pytest.raises(ValueError, match="var must be >= 0"):
        penalized_reward(mean, t(-0.1, 0.0), k=1.0)


# ---------------------------------------------------------------- LSC transform (Wang et al.)


def test_reference_reward_quantile_by_hand():
    ref = t([1.0, 2.0, 3.0, 4.0], [10.0, 0.0, 5.0, 5.0])
    # Linear interpolation at position q * (m - 1) of the sorted row.
    # q = .5: position 1.5 -> [2.5, (5 + 5) / 2 = 5].
    assert_close(reference_reward(ref, 0.5), t(2.5, 5.0))
    # q = .25: position .75 -> [1 + .75 * 1 = 1.75, 0 + .75 * 5 = 3.75].
    assert_close(reference_reward(ref, 0.25), t(1.75, 3.75))
    assert_close(reference_reward(ref, 0.0), t(1.0, 0.0))  # min
    assert_close(reference_reward(ref, 1), t(4.0, 10.0))  # max


def test_lsc_transform_hand_worked():
    r_ref = t(0.0, 1.0)
    r = t([0.0, 1.0, -1.0], [1.0, 3.0, 0.0])
    # r - r_ref = [[0, 1, -1], [0, 2, -1]]
    # log sigmoid(0) = log 1/2 = -.693147181
    # log sigmoid(1) = -log(1 + e^-1) = -.3132616875
    # log sigmoid(-1) = -log(1 + e) = -1 - log(1 + e^-1) = -1.3132616875
    # log sigmoid(2) = -log(1 + e^-2) = -.1269280110
    expected = t(
        [LOG_HALF, -0.3132616875, -1.3132616875], [LOG_HALF, -0.1269280110, -1.3132616875]
    )
    assert_close(lsc_transform(r, r_ref), expected, rtol=0, atol=1e-9)
    # [prompts] rewards: one sample per prompt, r == r_ref -> log 1/2 each.
    assert_close(lsc_transform(r_ref, r_ref), t(LOG_HALF, LOG_HALF))


def test_lsc_transform_monotone_nonpositive_and_stable():
    r = torch.linspace(-50, 50, 1001, dtype=F64)[None, :]  # step .1
    u = lsc_transform(r, t(0.0))
    assert (u <= 0).all()
    assert (u[0, 1:] > u[0, :-1]).all()  # strictly increasing, even where it saturates
    # No overflow far from r_ref: log sigmoid(1000) = 0, log sigmoid(-1000) = -1000.
    assert_close(lsc_transform(t([1000.0, -1000.0]), t(0.0)), t([0.0, -1000.0]))


def test_sum_of_lsc_prefers_good_on_both_over_great_and_bad():
    # k = 2 properties, 1 prompt, 2 samples; r_ref = 0 for both.
    #   sample 0: good on both,            r = (1, 1)
    #   sample 1: great on one, bad on two, r = (6, -3)
    rewards = t([[1.0, 6.0]], [[1.0, -3.0]])  # [k=2, prompts=1, n=2]
    r_refs = t([0.0], [0.0])  # [k=2, prompts=1]
    raw = combine_rewards(rewards, "sum_raw")
    # sum_raw: [1 + 1, 6 - 3] = [2, 3] -> sample 1 (the lopsided one).
    assert_close(raw, t([2.0, 3.0]))
    lsc = combine_rewards(rewards, "sum_of_lsc", r_refs=r_refs)
    # sum_of_lsc: sample 0: 2 * log sigmoid(1) = 2 * -.3132616875 = -.6265233750
    #             sample 1: log sigmoid(6) + log sigmoid(-3)
    #                     = -log(1 + e^-6) - (3 + log(1 + e^-3)) = -.0024756851 - 3.0485873516
    #                     = -3.0510630367 -> sample 0.
    assert_close(lsc, t([-0.6265233750, -3.0510630367]), rtol=0, atol=1e-9)
    assert bon_select(raw).tolist() == [1]
    assert bon_select(lsc).tolist() == [0]


def test_sum_of_lsc_is_sum_of_lsc_transforms():
    rewards, r_refs = _randn(3, 4, 5, seed=2), _randn(3, 4, seed=3)
    expected = sum(lsc_transform(rewards[i], r_refs[i]) for i in range(3))
    assert_close(combine_rewards(rewards, "sum_of_lsc", r_refs), expected)
    assert_close(combine_rewards(rewards, "sum_raw"), rewards.sum(0))


# ---------------------------------------------------------------- costs and RBoN (Jinnai et al.)

# e0 = (1, 0), e1 = (0, 2), e2 = (1, 1): cos(e0, e1) = 0, cos(e0, e2) = cos(e1, e2) = 1/sqrt 2.
EMB3 = t([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])  # [1, 3, 2]
C = 1 - 1 / math.sqrt(2)  # .292893219


def test_cosine_cost_hand_worked():
    expected = t([[0.0, 1.0, C], [1.0, 0.0, C], [C, C, 0.0]])
    assert_close(cosine_cost(EMB3), expected)
    # Opposite directions cost 2.
    assert_close(cosine_cost(t([[1.0, 0.0], [-3.0, 0.0]])), t([[0.0, 2.0], [2.0, 0.0]]))


def test_cosine_cost_zero_diagonal_and_symmetric():
    cost = cosine_cost(_randn(4, 6, 8, seed=4))
    assert cost.shape == (4, 6, 6)
    assert torch.equal(torch.diagonal(cost, dim1=1, dim2=2), torch.zeros(4, 6, dtype=F64))
    assert torch.equal(cost, cost.transpose(1, 2))
    assert ((cost >= 0) & (cost <= 2)).all()


def test_rbon_kl_hand_worked():
    rewards, logps = t([2.0, 1.0, 0.0]), t([-10.0, -4.0, -3.0])
    # beta .1: [2 - 1, 1 - .4, 0 - .3] = [1, .6, -.3] -> 0.
    assert rbon_kl_select(rewards, logps, 0.1).tolist() == [0]
    # beta .5: [2 - 5, 1 - 2, 0 - 1.5] = [-3, -1, -1.5] -> 1.
    assert rbon_kl_select(rewards, logps, 0.5).tolist() == [1]
    # beta 1: [-8, -3, -3], a tie -> the lowest index, 1.
    assert rbon_kl_select(rewards, logps, 1.0).tolist() == [1]


@pytest.mark.parametrize("seed", range(5))
def test_rbon_kl_limits(seed):
    rewards, logps = _randn(8, 6, seed=seed), -_randn(8, 6, seed=seed + 100).abs() * 20
    # beta = 0 is plain BoN, also where pi_0 gave a sample probability 0 (log p = -inf).
    logps_inf = logps.clone()
    logps_inf[:, 0] = -math.inf
    assert torch.equal(rbon_kl_select(rewards, logps_inf, 0.0), bon_select(rewards))
    assert torch.equal(rbon_kl_select(rewards, logps, 0), torch.argmax(rewards, dim=1))
    # beta -> infinity: the sample most likely under pi_0.
    assert torch.equal(rbon_kl_select(rewards, logps, 1e6), torch.argmax(logps, dim=1))


def test_rbon_wd_hand_worked():
    rewards = t([1.0, 1.2, 0.9])
    # Mean costs (1/3) sum_j c(i, j): [(1 + C) / 3, (1 + C) / 3, 2C / 3]
    #                              = [.430964, .430964, .195262].
    # beta 1: [1 - .430964, 1.2 - .430964, .9 - .195262] = [.569036, .769036, .704738] -> 1.
    assert rbon_wd_select(rewards, cosine_cost(EMB3), 1.0).tolist() == [1]
    # beta 2: [.138071, .338071, .509476] -> 2.
    assert rbon_wd_select(rewards, cosine_cost(EMB3), 2.0).tolist() == [2]
    # Samples 1 and 2 swap where 1.2 - .3 = beta * (mean cost 1 - mean cost 2) = beta * (1 - C) / 3
    # = beta * sqrt(2) / 6, i.e. beta* = 1.8 / sqrt 2 = .9 sqrt 2 = 1.272792.
    b_star = 0.9 * math.sqrt(2)
    assert rbon_wd_select(rewards, cosine_cost(EMB3), b_star - 1e-6).tolist() == [1]
    assert rbon_wd_select(rewards, cosine_cost(EMB3), b_star + 1e-6).tolist() == [2]


@pytest.mark.parametrize("seed", range(5))
def test_rbon_wd_limits(seed):
    rewards, cost = _randn(8, 6, seed=seed), cosine_cost(_randn(8, 6, 4, seed=seed + 100))
    assert torch.equal(rbon_wd_select(rewards, cost, 0.0), bon_select(rewards))
    # beta -> infinity: the medoid, the sample with the smallest mean cost to the others.
    assert torch.equal(rbon_wd_select(rewards, cost, 1e6), torch.argmin(cost.mean(-1), dim=1))


# ---------------------------------------------------------------- validation

R2 = t([1.0, 2.0])  # [prompts=1, n=2]


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: ensemble_reward(MEMBERS, "avg"),
         r"mode must be one of mean \| worst \| uncertainty_weighted, got 'avg'"),
        (lambda: ensemble_reward(MEMBERS, "uncertainty_weighted", coef=-1.0),
         "coef must be >= 0"),
        (lambda: ensemble_reward(torch.tensor(1.0), "mean"),
         r"member_rewards .*\[members, \.\.\.\]"),
        (lambda: ensemble_reward(t([1.0, math.nan]), "mean"),
         "member_rewards must not contain NaN"),
        (lambda: penalized_reward(R2, R2, k=-0.5), "k must be >= 0"),
        (lambda: penalized_reward(R2, R2, k=1.0, use="sd"), r"use must be one of std \| var, got .sd."),
        (lambda: penalized_reward(R2, t(1.0), k=1.0), "var must have the same shape as mean"),
        (lambda: reference_reward(R2, 1.5), r"quantile must be in \[0, 1\]"),
        (lambda: reference_reward(R2, -0.1), r"quantile must be in \[0, 1\]"),
        (lambda: reference_reward(t(1.0, 2.0), 0.5), r"ref_rewards .*\[prompts, m\]"),
        (lambda: lsc_transform(R2, t(0.0, 1.0)), r"r_ref must have shape \[prompts\] = \(1,\)"),
        (lambda: lsc_transform(R2, t([[0.0]])), r"r_ref .*\[prompts\]"),
        (lambda: combine_rewards(R2[None], "sum_of_lsc"), "r_refs .* is required for sum_of_lsc"),
        (lambda: combine_rewards(R2[None], "sum_of_lsc", t([0.0, 0.0])),
         r"r_refs must have shape \[k, prompts\] = \(1, 1\)"),
        (lambda: combine_rewards(R2, "sum_raw"), r"rewards .*\[k, prompts, n\]"),
        (lambda: combine_rewards(R2[None], "product"),
         r"method must be one of sum_of_lsc \| sum_raw, got .product."),
        (lambda: cosine_cost(R2), r"embeddings .*\[prompts, n, d\]"),
        (lambda: rbon_kl_select(R2, R2, -1.0), "beta must be >= 0"),
        (lambda: rbon_kl_select(R2, R2, math.inf), "beta must be a finite number"),
        (lambda: rbon_kl_select(t(1.0, 2.0), t(1.0, 2.0), 1.0), r"rewards .*\[prompts, n\]"),
        (lambda: rbon_kl_select(R2, t([0.0]), 1.0), "logps must have the same shape as rewards"),
        (lambda: rbon_kl_select(t([1.0, math.nan]), R2, 1.0), "rewards must not contain NaN"),
        (lambda: rbon_wd_select(R2, torch.zeros(1, 2, 2, dtype=F64), -2), "beta must be >= 0"),
        (lambda: rbon_wd_select(R2, torch.zeros(1, 3, 3, dtype=F64), 1.0),
         r"cost must have shape \[prompts, n, n\] = \(1, 2, 2\)"),
    ],
)
def test_validation_errors_name_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---------------------------------------------------------------- sentence embeddings


def test_sentence_embedder_matches_sentence_transformers():
    from sentence_transformers import SentenceTransformer

    from align.engine.embeddings import SentenceEmbedder
    from align.engine.models import resolve_model_path

    texts = [
        "A man is playing a guitar.",
        "A man plays the guitar.",
        "The central bank raised interest rates again this quarter.",
    ]
    ours = SentenceEmbedder("minilm", batch_size=2)  # 2 batches: padding must not leak in
    emb = ours.embed(texts)
    assert emb.shape == (3, 384) and emb.dtype == torch.float32 and emb.device.type == "cpu"
    st = SentenceTransformer(resolve_model_path("minilm"), device="cpu")
    ref = st.encode(texts, convert_to_tensor=True).cpu()
    assert_close(emb, ref, rtol=0, atol=1e-5)
    assert_close(emb.norm(dim=1), torch.ones(3), rtol=0, atol=1e-5)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # paraphrase pair well above the unrelated pair
    assert ours.embed([]).shape == (0, 384)
