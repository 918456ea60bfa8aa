"""DeRa (align/math/dera.py and the Generator's lam): the one-step closed form pi_0 exp(lam r / beta), and
the generator at lam = 0 / 1 drawing the reference's / aligned model's own samples token for token."""
import pytest
import torch
from torch.testing import assert_close

from align.math.dera import dera_logits, dera_mix

F64 = dict(dtype=torch.float64)


@pytest.mark.parametrize("lam", [0.0, 0.5, 1.0, 2.0])
def test_one_step_mix_is_the_realigned_policy(lam):
    """pi_beta = pi_0 exp(r / beta) / Z, so logits_beta = log pi_0 + r / beta (+ a constant); the mix
    must be exactly pi_0 exp(lam r / beta) / Z(lam) (Liu et al. 2402.02992, eq. 6)."""
    g = torch.Generator().manual_seed(0)
    pi0 = torch.softmax(torch.randn(3, 7, generator=g, **F64), -1)
    r, beta = torch.randn(3, 7, generator=g, **F64), 0.7
    logits_ref = pi0.log() + 3.0  # logits are defined up to a per-row constant
    logits_aligned = torch.log_softmax(pi0.log() + r / beta, -1)
    got = torch.softmax(dera_logits(logits_ref, logits_aligned, lam).double(), -1)
    want = pi0 * torch.exp(lam * r / beta)
    assert_close(got, want / want.sum(-1, keepdim=True), rtol=0, atol=1e-6)


def test_per_row_lambdas_and_mix():
    ref, aligned = torch.randn(4, 5), torch.randn(4, 5)
    lam = torch.tensor([0.0, 1.0, 0.5, 2.0])
    out = dera_logits(ref, aligned, lam)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], aligned[1])
    assert_close(out[2], (ref[2] + aligned[2]) / 2) and assert_close(out[3], 2 * aligned[3] - ref[3])
    # dera_mix maps the sampler's current rows (after some were dropped) to their original lambdas.
    mix = dera_mix([0.0, 0.0, 1.0, 1.0, 2.0, 2.0])
    assert torch.equal(mix([ref[:3], aligned[:3]], torch.tensor([1, 2, 5])), dera_logits(ref[:3], aligned[:3], torch.tensor([0.0, 1.0, 2.0])))


@pytest.mark.parametrize("lam", [-0.1, float("nan"), float("inf"), [0.5, -1.0]])
def test_bad_lambdas_name_the_field(lam):
    with pytest.raises(ValueError, match="lambda must be finite numbers >= 0"):
        dera_logits(torch.zeros(2, 3), torch.zeros(2, 3), lam)
    with pytest.raises(ValueError, match="one per row"):
        dera_logits(torch.zeros(2, 3), torch.zeros(2, 3), [0.5, 0.5, 0.5])


@pytest.fixture(scope="module")
def two_models(tiny_lm_dir, tmp_path_factory):
    """The tiny LM (reference) and another with the same tokenizer and different weights (aligned)."""
    from conftest import save_tiny_lm

    return str(tiny_lm_dir), str(save_tiny_lm(tmp_path_factory.mktemp("aligned_lm"), seed=7))


def test_generator_at_lambda_0_and_1_draws_each_models_samples(two_models):
    from actors.generator import Generator

    ref_dir, aligned_dir = two_models
    prompts, kw = ["the movie was", "a good film", "the plot"], dict(n=4, max_new_tokens=8, min_new_tokens=2, seed=3)
    dera = Generator(ref_dir, device="cpu", aligned_path=aligned_dir)
    ref = Generator(ref_dir, device="cpu").sample(prompts, **kw)["samples"]
    aligned = Generator(aligned_dir, device="cpu").sample(prompts, **kw)["samples"]
    at0, at1 = dera.sample(prompts, lam=0.0, **kw)["samples"], dera.sample(prompts, lam=1.0, **kw)["samples"]
    assert [s.completion_ids for s in at0] == [s.completion_ids for s in ref]
    assert [s.completion_ids for s in at1] == [s.completion_ids for s in aligned]
    assert [s.completion_ids for s in at0] != [s.completion_ids for s in at1]
    for a, b in zip(at0, ref):  # at lam = 0 the process is the reference's: log-probs agree
        assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)
        assert_close(torch.tensor(a.ref_logprobs), torch.tensor(b.logprobs), rtol=0, atol=1e-4)
    # One pass, one lambda per prompt: each prompt's rows draw what a pass at its own lambda draws.
    mixed = dera.sample(prompts, lam=[0.0, 1.0, 0.0], **kw)["samples"]
    assert [s.completion_ids for s in mixed] == [at0[0].completion_ids, at1[1].completion_ids, at0[2].completion_ids]


def test_generator_lambda_errors(two_models):
    from actors.generator import Generator

    with pytest.raises(ValueError, match="aligned_path"):
        Generator(two_models[0], device="cpu").sample(["a"], 2, 4, lam=0.5)
    with pytest.raises(ValueError, match="one per prompt"):
        Generator(two_models[0], device="cpu", aligned_path=two_models[1]).sample(["a", "b"], 2, 4, lam=[0.5])


@pytest.mark.ray
def test_dera_job_sweeps_lambdas_in_one_pass(ray_session, two_models, tiny_ensemble_dir, tmp_path):
    import json

    from align.runtime.config import load_config
    from jobs.dera import DeraConfig, run

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ["the movie was", "a good film", "the plot"]))
    out = tmp_path / "dera"
    result = run(load_config(DeraConfig, "configs/dera.yaml", [
        f"reference={two_models[0]}", f"aligned={two_models[1]}", "lambdas=[1.0, 2.0]", f"prompts.source={prompts}",
        "sampling.n=2", "sampling.max_new_tokens=6", "sampling.min_new_tokens=2", "pool.num_actors=1",
        "pool.batch_size=4", f"output_dir={out}", f"proxy={{kind: ensemble, path: {tiny_ensemble_dir}}}"]))
    by_lam = {m["lambda"]: m for m in result["lambdas"]}
    assert sorted(by_lam) == [0.0, 1.0, 2.0]  # lambda 0 is added: the pi_0 baseline
    assert by_lam[0.0]["win_rate_vs_pi0"] == 0.5 and abs(by_lam[0.0]["kl"]) < 1e-4  # pi_0 against itself
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 9 and all(len(r["completions"]) == 2 for r in rows)
    gold = torch.tensor([g for r in rows if r["lambda"] == 2.0 for g in r["gold"]], dtype=torch.float64)
    assert by_lam[2.0]["gold"] == pytest.approx(gold.mean().item())
    assert (out / "dera.png").stat().st_size > 0 and "win rate vs pi_0" in (out / "results.md").read_text()
    assert all("proxy" in m for m in result["lambdas"])


def test_dera_config_errors(tmp_path):
    from align.runtime.config import ConfigError, load_config
    from jobs.dera import DeraConfig, run

    with pytest.raises(ConfigError, match="lambdas"):
        load_config(DeraConfig, "configs/dera.yaml", ["lambdas=[0.5, -1]"])
    with pytest.raises(ConfigError, match="'aligned'.*does not exist"):
        run(load_config(DeraConfig, "configs/dera.yaml", [f"aligned={tmp_path / 'no' / 'model'}"]))
