"""jobs/overopt.py's analysis on hand-made scores: nested blocks, every remedy's pick, the closed-form
KL axis, and the two-reward comparison; and its config errors. (The whole study trains three reward
models: it runs as `python -m jobs.overopt`, not in CI.)"""
import pytest
import torch

from align.runtime.config import ConfigError, load_config
from jobs.overopt import OveroptConfig, RemedyParams, TwoRewardParams, blocks, overopt_curves, two_reward_rows

F64 = dict(dtype=torch.float64)


def scores(P=3, N=8, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    gold = torch.randn(P, N, generator=g, **F64)
    emb = torch.nn.functional.normalize(torch.randn(P, N, 5, generator=g), dim=-1)
    return {"gold": gold, "logp": -torch.rand(P, N, generator=g, **F64) * 10,
            "words": torch.randint(8, 20, (P, N), generator=g).double(),
            "members": torch.randn(k, P, N, generator=g, **F64), "lap_mean": torch.randn(P, N, generator=g, **F64),
            "lap_var": torch.rand(P, N, generator=g, **F64), "emb": emb}


def test_blocks_are_disjoint_consecutive_groups():
    x = torch.arange(2 * 8).view(2, 8)
    assert blocks(x, 4).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]


def test_curves_by_hand():
    d = scores()
    rows = {(r["remedy"], r["n"]): r for r in overopt_curves(d, [1, 2, 8], RemedyParams())}
    # n = 1: every remedy takes every sample, so each reports the mean gold reward.
    for name in ("proxy", "ensemble worst", "rbon-wd", "laplace mu - k sigma"):
        assert rows[(name, 1)]["gold"] == pytest.approx(d["gold"].mean().item())
        assert rows[(name, 1)]["kl_bon"] == 0.0
    # n = 8 = N: one block per prompt; the oracle takes each prompt's max gold, the proxy its member-0 argmax.
    assert rows[("gold (oracle)", 8)]["gold"] == pytest.approx(d["gold"].max(1).values.mean().item())
    idx = d["members"][0].argmax(1)
    assert rows[("proxy", 8)]["gold"] == pytest.approx(d["gold"].gather(1, idx[:, None]).mean().item())
    assert rows[("proxy", 8)]["proxy"] == pytest.approx(d["members"][0].max(1).values.mean().item())
    worst = d["members"].min(0).values.argmax(1)
    assert rows[("ensemble worst", 8)]["gold"] == pytest.approx(d["gold"].gather(1, worst[:, None]).mean().item())
    lap = (d["lap_mean"] - d["lap_var"].sqrt()).argmax(1)
    assert rows[("laplace mu - k sigma", 8)]["gold"] == pytest.approx(d["gold"].gather(1, lap[:, None]).mean().item())
    # n = 2: blocks (0,1), (2,3), ...: the oracle's mean of pairwise maxima.
    assert rows[("gold (oracle)", 2)]["gold"] == pytest.approx(d["gold"].view(3, 4, 2).max(-1).values.mean().item())
    assert rows[("gold (oracle)", 2)]["kl_bon"] == pytest.approx(torch.log(torch.tensor(2.0)).item() - 0.5)


def test_rbon_curves_at_the_limits():
    d = scores(seed=1)
    plain = {r["n"]: r["gold"] for r in overopt_curves(d, [2, 4], RemedyParams()) if r["remedy"] == "proxy"}
    zero = {(r["remedy"], r["n"]): r["gold"] for r in overopt_curves(d, [2, 4], RemedyParams(rbon_kl_beta=0, rbon_wd_beta=0))}
    assert zero[("rbon-kl", 4)] == plain[4] and zero[("rbon-wd", 2)] == plain[2]
    big = {(r["remedy"], r["n"]): r["gold"] for r in overopt_curves(d, [8], RemedyParams(rbon_kl_beta=1e9))}
    most_likely = d["logp"].argmax(1)
    assert big[("rbon-kl", 8)] == pytest.approx(d["gold"].gather(1, most_likely[:, None]).mean().item())


def test_two_reward_rows_by_hand():
    # One prompt, 4 samples. Sentiment proxy r1 = [3, 0.2, 0.1, -1], words = [30, 10, 9, 8], max_words 10,
    # so brevity r2 = [-20, 0, 1, 2]; gold = [0.9, 0.5, -0.2, 0.3]: good on both = [no, yes, no, yes].
    d = {"gold": torch.tensor([[0.9, 0.5, -0.2, 0.3]], **F64), "words": torch.tensor([[30.0, 10, 9, 8]], **F64),
         "members": torch.tensor([[[3.0, 0.2, 0.1, -1.0]]], **F64)}
    rows = {r["combination"]: r for r in two_reward_rows(d, [4], TwoRewardParams(max_words=10, reference_quantile=0.5))}
    # sum_raw = [-17, 0.2, 1.1, 1] -> sample 2 (9 words but gold -0.2): not good on both.
    assert rows["sum_raw"]["good_on_both"] == 0.0 and rows["sum_raw"]["words"] == 9
    # LSC with medians r1_ref = 0.15, r2_ref = 0.5: sample 1 = logsig(0.05) + logsig(-0.5) = -0.669 - 0.974 = -1.643,
    # sample 2 = logsig(-0.05) + logsig(0.5) = -0.719 - 0.474 = -1.193, sample 0 = logsig(2.85) + logsig(-20.5) ~ -20.56,
    # sample 3 = logsig(-1.15) + logsig(1.5) = -1.415 - 0.201 = -1.616: the largest is sample 2 (-1.193) again.
    assert rows["sum_of_lsc"]["words"] == 9
    assert rows["sentiment only"]["words"] == 30 and rows["brevity only"]["words"] == 8
    assert rows["brevity only"]["good_on_both"] == 1.0 and rows["brevity only"]["worst_prompts"] == 1.0


@pytest.mark.parametrize("override, field", [
    ("ns=[3]", "ns"), ("ns=[]", "ns"), ("proxy.ensemble.members=1", "proxy.ensemble.members"),
    ("proxy.laplace.enabled=false", "proxy.laplace.enabled"), ("remedies.laplace_k=-1", "remedies.laplace_k"),
    ("two_reward.max_words=0", "two_reward.max_words"),
])
def test_config_errors(override, field):
    with pytest.raises(ConfigError) as err:
        load_config(OveroptConfig, "configs/overopt.yaml", [override])
    assert err.value.field == field
