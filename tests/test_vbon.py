"""Variational BoN math (align/math/vbon.py) against closed forms: the smoothed log-CDF, RLOO advantages,
the exact expected gradient of the estimator, and the one-step problem where the optimum is pi_bon."""
import json
import math

import pytest
import torch

from align.math.vbon import log_cdf, policy_gradient_loss, rloo_advantages, vbon_beta, vbon_objective_at_bon


def test_log_cdf_closed_forms_and_edges():
    refs = torch.tensor([0.0, 1.0, 2.0, 3.0])  # M = 4: F = (below + ties / 2 + 1) / 6
    got = log_cdf(torch.tensor([-1.0, 0.0, 1.5, 3.0, 9.0]), refs).exp()
    want = torch.tensor([1 / 6, 1.5 / 6, 3 / 6, 4.5 / 6, 5 / 6], dtype=torch.float64)
    torch.testing.assert_close(got, want)
    # every reference equal to the reward: the median, exactly 1/2
    assert log_cdf(torch.tensor([2.0]), torch.full((3,), 2.0)).exp().item() == 0.5
    # below or above every reference: finite, 1 / (M + 2) and (M + 1) / (M + 2)
    edge = log_cdf(torch.tensor([[-1e9, 1e9]]), torch.randn(1, 98)).exp()
    torch.testing.assert_close(edge, torch.tensor([[0.01, 0.99]], dtype=torch.float64))
    # per prompt: each row against its own references
    two = log_cdf(torch.tensor([[1.0], [1.0]]), torch.tensor([[0.0, 0.5], [2.0, 3.0]])).exp()
    torch.testing.assert_close(two, torch.tensor([[0.75], [0.25]], dtype=torch.float64))
    with pytest.raises(ValueError, match="same P"):
        log_cdf(torch.zeros(2, 3), torch.zeros(3, 5))


@pytest.mark.parametrize("n", [2, 8])
def test_vbon_objective_is_largest_at_pi_bon(n):
    """J(pi) = E_pi[log F] - KL(pi || pi_0) / (n - 1) on a fine discrete space (F the mid-rank CDF):
    pi_bon's value is the closed form -log(n) / (n - 1) in the limit, and perturbing pi_bon, or pi_0
    itself (J = -1 in the limit), scores lower (Jensen: pi_bon maximises it)."""
    from align.math.bon import bon_distribution, kl_divergence

    V = 20_000
    p0 = torch.full((V,), 1.0 / V, dtype=torch.float64)
    rewards = torch.arange(V, dtype=torch.float64)
    log_f = torch.log((torch.arange(V, dtype=torch.float64) + 0.5) / V)

    def objective(pi):
        return (pi * log_f).sum().item() - kl_divergence(pi, p0) / (n - 1)

    bon = bon_distribution(p0, rewards, n)
    assert objective(bon) == pytest.approx(vbon_objective_at_bon(n), abs=1e-3)
    assert objective(p0) == pytest.approx(-1.0, abs=1e-3) and -1.0 < vbon_objective_at_bon(n)
    g = torch.Generator().manual_seed(n)
    for _ in range(5):
        tilted = bon * torch.exp(0.3 * torch.randn(V, generator=g, dtype=torch.float64))
        assert objective(tilted / tilted.sum()) < objective(bon)
    with pytest.raises(ValueError, match="n must be >= 2"):
        vbon_objective_at_bon(1)


def test_rloo_advantages_leave_one_out():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0]])
    want = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 3 - 3.0, 6 - 2.0]])
    torch.testing.assert_close(rloo_advantages(r), want)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(torch.zeros(3, 1))
    assert vbon_beta(4) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="n must be >= 2"):
        vbon_beta(1)


def one_step_problem(v: int = 16, seed: int = 0):
    """One prompt, single-token completions y in 0..v-1 with distinct rewards, pi_0 random."""
    g = torch.Generator().manual_seed(seed)
    pi0 = torch.softmax(torch.randn(v, generator=g, dtype=torch.float64), 0)
    rewards = torch.randperm(v, generator=g).double()
    return pi0, rewards


def mid_cdf(pi0, rewards):
    """The exact mid-rank CDF of the reward under pi_0, per token."""
    below = (pi0[None, :] * (rewards[None, :] < rewards[:, None])).sum(1)
    return below + pi0 / 2


def objective(theta, pi0, rewards, n):
    """E_{pi_theta}[log F(r)] - beta KL(pi_theta || pi_0), exactly."""
    pi = torch.softmax(theta, 0)
    return (pi * mid_cdf(pi0, rewards).log()).sum() - vbon_beta(n) * (pi * (pi.log() - pi0.log())).sum()


def kl(p, q):
    return float((p * (p.log() - q.log())).sum())


def test_rloo_gradient_is_unbiased_for_the_objective():
    """The estimator's gradient averaged over every pair (y1, y2) ~ pi_theta (k = 2, exact
    enumeration, weights detached) equals the exact gradient of the vBoN objective."""
    n, v = 4, 6
    pi0, rewards = one_step_problem(v)
    theta = torch.randn(v, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    exact, = torch.autograd.grad(-objective(theta, pi0, rewards, n), theta)

    logpi = torch.log_softmax(theta, 0)
    y1, y2 = torch.cartesian_prod(torch.arange(v), torch.arange(v)).T
    weights = (logpi[y1] + logpi[y2]).exp().detach()
    logf = mid_cdf(pi0, rewards).log()
    total = 0
    for w, a, b in zip(weights, y1, y2):
        ys = torch.stack([a, b])
        loss, _ = policy_gradient_loss(logpi[ys], pi0.log()[ys], logf[ys], vbon_beta(n), k=2)
        total = total + w * loss
    expected, = torch.autograd.grad(total, theta, retain_graph=True)
    torch.testing.assert_close(expected, exact, atol=1e-12, rtol=1e-9)

    # PPO-clip with the sampling policy's own log-probs has the same gradient (rho = 1, nothing clipped)
    ys = torch.tensor([0, 3, 1, 1])
    rloo, _ = policy_gradient_loss(logpi[ys], pi0.log()[ys], logf[ys], 0.3, k=2)
    ppo, m = policy_gradient_loss(logpi[ys], pi0.log()[ys], logf[ys], 0.3, k=2, old_logp=logpi[ys].detach())
    g1, = torch.autograd.grad(rloo, theta, retain_graph=True)
    g2, = torch.autograd.grad(ppo, theta, retain_graph=True)
    torch.testing.assert_close(g1, g2)
    assert m["clipped"].item() == 0.0


def test_ppo_clip_stops_the_gradient_past_the_clip():
    logp = torch.tensor([0.0, 0.0], dtype=torch.float64, requires_grad=True)
    old = torch.tensor([-1.0, 0.0], dtype=torch.float64)  # rho = e for sample 0, 1 for sample 1
    reward = torch.tensor([1.0, 0.0], dtype=torch.float64)  # sample 0 has the positive advantage
    loss, m = policy_gradient_loss(logp, torch.zeros(2, dtype=torch.float64), reward, 0.0, k=2, old_logp=old, clip=0.2)
    grad, = torch.autograd.grad(loss, logp)
    assert grad[0].item() == 0.0 and grad[1].item() != 0.0 and m["clipped"].item() == 0.5


def test_exact_gradient_ascent_reaches_pi_bon():
    """Maximising the objective exactly lands on pi_0 F^(n-1) / Z, within KL 0.05 of pi_bon (n = 4)."""
    from align.math.bon import bon_distribution

    n = 4
    pi0, rewards = one_step_problem()
    theta = pi0.log().clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(3000):
        opt.zero_grad()
        (-objective(theta, pi0, rewards, n)).backward()
        opt.step()
    pi = torch.softmax(theta.detach(), 0)
    target = bon_distribution(pi0, rewards, n)
    optimum = pi0 * mid_cdf(pi0, rewards) ** (n - 1)
    assert kl(pi, optimum / optimum.sum()) < 1e-4
    assert kl(pi, target) < 0.05 and kl(pi0, target) > 10 * kl(pi, target)


def test_sampled_rloo_loop_reaches_pi_bon():
    """The same problem learned from samples: k completions per step from pi_theta, log F estimated
    from M pi_0 rewards (log_cdf), the RLOO loss: KL(pi_theta || pi_bon) < 0.05 for n = 4."""
    from align.math.bon import bon_distribution

    n, k, m = 4, 16, 4000
    pi0, rewards = one_step_problem()
    g = torch.Generator().manual_seed(2)
    ref = rewards[torch.multinomial(pi0, m, replacement=True, generator=g)]
    logf = log_cdf(rewards, ref)  # log F per token, estimated
    theta = pi0.log().clone().requires_grad_()
    opt = torch.optim.Adam([theta], lr=0.03)
    for _ in range(2500):
        logpi = torch.log_softmax(theta, 0)
        ys = torch.multinomial(logpi.exp().detach(), k, replacement=True, generator=g)
        loss, _ = policy_gradient_loss(logpi[ys], pi0.log()[ys], logf[ys], vbon_beta(n), k=k)
        opt.zero_grad()
        loss.backward()
        opt.step()
    pi = torch.softmax(theta.detach(), 0)
    target = bon_distribution(pi0, rewards, n)
    assert kl(pi, target) < 0.05, (kl(pi, target), kl(pi0, target))
    assert math.isfinite(kl(pi, target))


def vbon_config(tmp_path, tiny_lm_dir, name, *overrides):
    from align.runtime.config import load_config
    from jobs.train_vbon import VbonJobConfig

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the movie was\na bad\nthe plot\na good film\n")
    return load_config(VbonJobConfig, "configs/train_vbon.yaml", [
        f"model={tiny_lm_dir}", f"prompts.source={prompts}", "vbon.n=4", "vbon.k=2", "vbon.reference_samples=8",
        "sampling.max_new_tokens=4", "sampling.min_new_tokens=0", "pool.num_cpus_per_actor=0.5", "reward.kind=brevity",
        "reward.params.max_words=3", "evaluate.reward.kind=brevity", "evaluate.reward.params.max_words=3",
        "train.steps=4", "train.batch_size=2", "train.optim.lr=1e-3", "train.workers.cpus_per_worker=1",
        "train.workers.collective_timeout_s=30", "train.run.checkpoint_every=2", "train.run.log_every=1",
        f"train.run.name={name}", f"train.run.storage_path={tmp_path / 'runs'}", f"evaluate.prompts.source={prompts}",
        "evaluate.n=2", f"output_dir={tmp_path / name}", *overrides])


@pytest.fixture(scope="module")
def zero3_run(ray_session, tiny_lm_dir, tmp_path_factory):
    """vBoN under ZeRO-3 with 2 workers and 1 generator, uninterrupted: (output dir, result)."""
    from jobs.train_vbon import run

    tmp = tmp_path_factory.mktemp("vbon_z3")
    return tmp / "z3", run(vbon_config(tmp, tiny_lm_dir, "z3", "train.deepspeed.zero_stage=3"))


@pytest.mark.ray
@pytest.mark.slow
def test_vbon_job_zero3_syncs_exactly_and_evaluates(zero3_run):
    """1 generator actor and 2 DeepSpeed workers under ZeRO-3: every step logs reward, log F, KL,
    sync time and share; the generator's weights after the last push equal the saved model's bit for
    bit; the run ends with its gold win rate and KL against pi_0."""
    import json

    out, result = zero3_run
    assert result["sync_exact"] == 1.0
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["log_f"] < 0 and r["sync_s"] > 0 and 0 < r["sync_share"] < 1 and r["samples_per_s"] > 0
        assert math.isfinite(r["kl"]) and math.isfinite(r["reward"])
    ev = json.loads((out / "eval_metrics.json").read_text())
    assert 0 <= ev["win_rate_vs_pi0"] <= 1 and ev["samples"] == 8 and ev["kl_to_pi0"] != 0
    assert (out / "reference_rewards.pt").is_file()


@pytest.mark.ray
@pytest.mark.slow
def test_vbon_generator_killed_resumes_bit_identical(zero3_run, tiny_lm_dir, tmp_path):
    """ZeRO-3: rank 0's generator actor is killed during step 3. Ray restarts it with pi_0's weights; it
    refuses to sample with them (StaleWeightsError), so the group restarts from the step-2 checkpoint
    and pushes those weights to the generator; the run ends bit-identical to the uninterrupted one,
    with the generator holding the final weights."""
    from align.engine.models import load_causal_lm
    from align.math.vbon import state_digest
    from jobs.train_vbon import run

    clean_dir, clean = zero3_run
    killed = run(vbon_config(tmp_path, tiny_lm_dir, "killed", "train.deepspeed.zero_stage=3", "train.step_hook.target=tests.plugins.faults:fail_once",
                             "train.step_hook.args={at_step: 3, fail_rank: 0, mode: kill_generator}"))
    assert (tmp_path / "killed" / ".failed_once").exists() and killed["sync_exact"] == 1.0 == clean["sync_exact"]
    steps = [json.loads(line)["step"] for line in (tmp_path / "killed" / "train_log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    digests = [state_digest(load_causal_lm(str(d / "model"), device="cpu")[0].state_dict()) for d in (clean_dir, tmp_path / "killed")]
    assert digests[0] == digests[1]


def test_completion_batch_scores_what_the_generator_drew(tiny_lm_dir):
    """The trainer's log-probs of sampled ids (right-padded rows, end-of-sequence blocked where the
    sampler blocked it) equal the sampler's own, so PPO's ratio starts at exactly 1."""
    from actors.generator import Generator
    from align.math.losses import model_sequence_logps
    from align.math.vbon import completion_batch

    gen = Generator(str(tiny_lm_dir), device="cpu")
    drawn = gen.sample(["the movie was", "a bad"], 3, 6, temperature=0.8, min_new_tokens=2, seed=4)["samples"]
    batch = completion_batch([s.prompt_ids for s in drawn for _ in s.completion_ids],
                             [c for s in drawn for c in s.completion_ids], gen.tokenizer.pad_token_id, 2)
    with torch.no_grad():
        logp, lengths = model_sequence_logps(gen.model, batch["input_ids"], batch["attention_mask"], batch["loss_mask"],
                                             temperature=0.8, eos_token_id=gen.tokenizer.eos_token_id,
                                             eos_blocked=batch["eos_blocked"])
    torch.testing.assert_close(logp, torch.tensor([lp for s in drawn for lp in s.logprobs]), atol=1e-5, rtol=0)
    assert lengths.tolist() == [len(c) for s in drawn for c in s.completion_ids]
