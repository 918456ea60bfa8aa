"""align/rewards/laplace_posterior.py: Laplace-LoRA reward posterior (Yang et al. 2402.13210).

One module-scoped fixture trains a MiniLM + LoRA reward model in-process (plain torch, Adam, the
Bradley-Terry loss) on synthetic movie-review pairs and fits the KFAC posterior once; the other tests
reuse it. Checked: the variance is larger off the training distribution, the GLM predictive equals
J Sigma J^T and the MAP reward computed by hand, the pair / single-sequence wrapper scores as the
classifier does (GPT-2-style pad == eos included), chunking, a pickle-free save / load round trip,
and argument errors. No Ray.
"""
from __future__ import annotations

import random
import shutil

import pytest
import torch
from torch.testing import assert_close

from align.rewards.laplace_posterior import LaplaceReward, RewardPairModel, pack

LORA_BERT = dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])

SUBJECTS = ["the movie", "this film", "the acting", "the plot", "the soundtrack", "the ending", "the cast",
            "the script", "this sequel", "the story", "the director's new film", "the camera work"]
POSITIVE = ["was wonderful and moving", "is a delight from start to finish", "was brilliant", "felt fresh and funny",
            "is beautifully made", "was great fun", "left me smiling", "is a small masterpiece"]
NEGATIVE = ["was dull and boring", "is a mess from start to finish", "was awful", "felt stale and lifeless",
            "is badly made", "was a waste of time", "left me angry", "is a total disaster"]

# The shifted distribution: text from other domains, cooking instructions and Python source lines,
# that the movie-review reward model never saw; they are also longer (14-30 tokens against 7-12).
SHIFTED = [
    "Preheat the oven to 180 degrees and grease a round baking tin.",
    "Whisk two eggs with a pinch of salt, then fold in the flour.",
    "Simmer the tomatoes for twenty minutes, stirring now and then.",
    "Chop the onions finely and fry them gently in butter until golden.",
    "Knead the dough for ten minutes, cover it and let it rise for an hour.",
    "Season the chicken with pepper and roast it for forty minutes.",
    "Drain the pasta, keeping a cup of the cooking water for the sauce.",
    "Melt the chocolate over a pan of barely simmering water.",
    "def main(): return sum(x * x for x in range(10))",
    "for i in range(n): print(i, values[i])",
    "import numpy as np; a = np.zeros((3, 4), dtype=np.float32)",
    "if x is None: raise ValueError('x must be set')",
    "with open(path) as f: lines = f.read().splitlines()",
    "self.cache = {key: value for key, value in items if value}",
    "return torch.cat([a, b], dim=-1).mean(dim=0)",
    "except KeyError as err: logger.warning('missing %s', err)",
]


def make_pairs(n: int, seed: int = 0):
    """n (prompt, chosen, rejected) triples: a review opening, a positive / a negative continuation."""
    rng = random.Random(seed)
    return [(rng.choice(SUBJECTS), " " + rng.choice(POSITIVE) + ".", " " + rng.choice(NEGATIVE) + ".") for _ in range(n)]


def bt_train(model, tokenizer, chosen, rejected, steps: int, lr: float, batch: int = 16, seed: int = 0):
    """Plain-torch Bradley-Terry training: Adam on -log sigmoid(r_chosen - r_rejected)."""
    from align.data.pairs import pad_right

    rng = random.Random(seed)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        idx = rng.sample(range(len(chosen)), min(batch, len(chosen)))
        ids, attn = pad_right([chosen[i] for i in idx] + [rejected[i] for i in idx], tokenizer.pad_token_id)
        r = model(input_ids=ids, attention_mask=attn).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(r[: len(idx)] - r[len(idx) :]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


def rewards_one_by_one(model, seqs):
    """The classifier's reward of each sequence alone (no padding), attention mask all ones."""
    with torch.no_grad():
        return torch.stack([model(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long)).logits[0, 0]
                            for s in seqs])


def jacobian_rows(la, model, seqs):
    """d reward / d (trainable params), one row per sequence, by plain autograd on the sequence alone,
    in laplace-torch's parameter order."""
    rows = []
    for s in seqs:
        r = model(input_ids=torch.tensor([s]), attention_mask=torch.ones(1, len(s), dtype=torch.long)).logits[0, 0]
        grads = torch.autograd.grad(r, la.params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows).double()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module, restored after. On a shared 2-core machine two OpenMP
    threads spin-wait whenever a neighbour takes a core: this file measured 16 s on an idle machine
    with 2 threads, 180 s with 2 threads beside another job, 26 s with 1 thread beside it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained():
    """MiniLM + LoRA (74k trainable) trained 30 Adam steps on 96 synthetic pairs, and its KFAC posterior
    (marginal-likelihood prior precision)."""
    from align.engine.models import build_model_for, load_tokenizer
    from align.data.pairs import concat_token_ids

    torch.manual_seed(0)
    tok = load_tokenizer("minilm")
    model = build_model_for("reward_model", "minilm", tok, lora=LORA_BERT)
    triples = make_pairs(96)
    prompts = [p for p, _, _ in triples]
    chosen = concat_token_ids(tok, prompts, [c for _, c, _ in triples])
    rejected = concat_token_ids(tok, prompts, [r for _, _, r in triples])
    loss = bt_train(model, tok, chosen, rejected, steps=30, lr=3e-3)
    assert loss < 0.1, loss
    lr = LaplaceReward.fit(model, tok, chosen, rejected)
    return {"lr": lr, "tok": tok, "model": model, "chosen": chosen, "rejected": rejected}


def test_fit_covers_only_the_trainable_weights(trained):
    lr, model = trained["lr"], trained["model"]
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert lr.la.n_params == sum(p.numel() for p in trainable.values()) == 74113
    assert all(".lora_" in n or ".modules_to_save." in n for n in trainable)
    assert sum(p.numel() for p in model.parameters()) > 20_000_000  # the frozen backbone is not in it
    assert lr.hessian_structure == "kron" and lr.num_pairs == 96
    assert isinstance(lr.prior_precision, float) and lr.prior_precision > 0
    assert lr.prior_precision != 1.0  # marglik moved it
    assert lr.tokenizer is trained["tok"]


def test_variance_is_higher_off_distribution(trained):
    """The key property. Training distribution: the first 16 chosen and 16 rejected training sequences
    (short movie-review sentences, 7-12 tokens). Shifted distribution: SHIFTED, 8 cooking instructions
    and 8 Python source lines (other domains, 14-30 tokens). The mean predictive variance over the
    shifted set must exceed the training set's by a clear factor (seen at these seeds: ~5000x with
    KFAC; 360x-5000x over training seeds 0-3, and 37x-9000x for 4-8 token recipe / code snippets, so
    not a length effect). Held-out in-domain sentences (review openings and continuations recombined,
    not in the training set) stay near the training variance: the variance tracks the domain."""
    from align.data.pairs import concat_token_ids

    lr, tok = trained["lr"], trained["tok"]
    train_seqs = trained["chosen"][:16] + trained["rejected"][:16]
    shifted = [tok(s)["input_ids"] for s in SHIFTED]
    held = make_pairs(48, seed=1000)
    held = concat_token_ids(tok, [p for p, _, _ in held], [c for _, c, _ in held])
    held = [s for s in held if s not in trained["chosen"]][:8]
    assert len(held) == 8
    _, var_train = lr.predict(train_seqs, chunk_size=8)
    _, var_shift = lr.predict(shifted, chunk_size=8)
    _, var_held = lr.predict(held, chunk_size=8)
    assert (var_train > 0).all() and (var_shift > 0).all()
    ratio = (var_shift.mean() / var_train.mean()).item()
    print(f"mean predictive variance: training {var_train.mean():.4g}, held-out in-domain {var_held.mean():.4g}, "
          f"shifted {var_shift.mean():.4g}, shifted / training {ratio:.4g}")
    assert ratio > 10, ratio
    # Not just a few outliers: most shifted sequences are above the training median.
    assert (var_shift > var_train.median()).float().mean() >= 0.75
    assert var_held.mean() < 3 * var_train.mean() and var_shift.mean() > 10 * var_held.mean()


def test_mean_is_the_map_reward_and_chunking_does_not_matter(trained):
    lr, model = trained["lr"], trained["model"]
    seqs = trained["chosen"][:6] + trained["rejected"][:6]  # lengths differ: padding in every chunk
    mean32, var32 = lr.predict(seqs, chunk_size=32)
    mean4, var4 = lr.predict(seqs, chunk_size=4)
    assert mean32.dtype == var32.dtype == torch.float64 and mean32.shape == var32.shape == (12,)
    assert_close(mean4, mean32, rtol=1e-6, atol=1e-6)
    # var ~ 20 computed in float32 (the model's dtype): chunks pad differently, which moves it by
    # float32 rounding, ~1e-6 relative.
    assert_close(var4, var32, rtol=1e-5, atol=1e-6)
    assert_close(mean32, rewards_one_by_one(model, seqs).double(), rtol=1e-5, atol=1e-5)
    assert (mean32[:6] > mean32[6:]).all()  # the model learned the preference


def test_empty_predict(trained):
    mean, var = trained["lr"].predict([])
    assert mean.shape == var.shape == (0,) and mean.dtype == var.dtype == torch.float64


def test_diag_variance_equals_j_sigma_jt(trained):
    """Diagonal posterior on a float64 copy of the trained model (float64 so that the comparison tests
    the algebra, not float32 summation over 74k terms, which alone moves laplace-torch's variance by
    ~1e-4 relative): var = sum_p J_p^2 Sigma_pp with J from plain autograd on each sequence alone, and
    mean = the model's reward."""
    import copy

    model, tok = copy.deepcopy(trained["model"]).double(), trained["tok"]
    lr = LaplaceReward.fit(model, tok, trained["chosen"][:8], trained["rejected"][:8], batch_size=2,
                           hessian_structure="diag")
    assert lr.hessian_structure == "diag" and lr.num_pairs == 8
    seqs = trained["chosen"][-3:] + [tok(s)["input_ids"] for s in SHIFTED[:3]]
    mean, var = lr.predict(seqs)
    J = jacobian_rows(lr.la, model, seqs)
    assert J.shape == (6, 74113)
    assert_close(var, (J * J * lr.la.posterior_variance).sum(1), rtol=1e-8, atol=0)
    assert_close(mean, rewards_one_by_one(model, seqs), rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_lm_dir):
    """A random 2-layer GPT-2 (pad == eos) as a LoRA reward model, ~550 trainable parameters."""
    from align.engine.models import build_model_for, load_tokenizer

    torch.manual_seed(1)
    tok = load_tokenizer(str(tiny_lm_dir))
    assert tok.pad_token_id == tok.eos_token_id
    model = build_model_for("reward_model", str(tiny_lm_dir), tok,
                            lora=dict(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["c_attn"]))
    with torch.no_grad():  # LoRA B starts at zero; make the adapter matter
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return model.eval(), tok


def gpt2_seqs(tok):
    """Sequences with an eos (== pad) inside and at the end, so a mask built from ids == pad is wrong."""
    eos = tok.eos_token_id
    a = tok("the movie was great and the acting was wonderful .")["input_ids"]
    b = tok("the plot was awful")["input_ids"]
    c = tok("a good film with a bad ending .")["input_ids"]
    return [a, b + [eos] + c, c + [eos], b, a[:3] + [eos, eos] + b]


def test_wrapper_scores_as_the_classifier_with_pad_equal_eos(tiny_gpt2):
    model, tok = tiny_gpt2
    seqs = gpt2_seqs(tok)
    expected = rewards_one_by_one(model, seqs)
    wrapper = RewardPairModel(model, tok.pad_token_id)
    with torch.no_grad():
        single = wrapper(pack(seqs))
        width = max(len(s) for s in seqs) + 3  # extra padding too
        pairs = wrapper(torch.stack([pack(seqs[:2], width), pack(seqs[2:4], width)]))
    assert single.shape == (5, 1) and pairs.shape == (2, 2)
    assert_close(single[:, 0], expected, rtol=1e-5, atol=1e-6)
    assert_close(pairs.reshape(-1), expected[:4], rtol=1e-5, atol=1e-6)
    # A mask taken from ids != pad would drop the inner eos and change those rewards.
    from align.data.pairs import pad_right

    ids, _ = pad_right(seqs, tok.pad_token_id)
    with torch.no_grad():
        wrong = model(input_ids=ids, attention_mask=(ids != tok.pad_token_id).long()).logits[:, 0]
    assert (wrong[1] - expected[1]).abs() > 1e-4 and (wrong[4] - expected[4]).abs() > 1e-4


def test_kron_variance_equals_j_sigma_jt_on_a_tiny_model(tiny_gpt2, tmp_path):
    """KFAC posterior on ~550 parameters (GPT-2: LoRA on Conv1D c_attn, `score` head, pad == eos),
    dense covariance from laplace-torch's Kronecker factors; then a save / load round trip of it."""
    model, tok = tiny_gpt2
    seqs = gpt2_seqs(tok)
    chosen, rejected = [seqs[0], seqs[2], seqs[1]] * 3, [seqs[3], seqs[4], seqs[2]] * 3
    lr = LaplaceReward.fit(model, tok, chosen, rejected, batch_size=4, prior_optimization="none", prior_precision=2.0)
    assert lr.prior_precision == 2.0 and lr.num_pairs == 9
    n = lr.la.n_params
    assert n == sum(p.numel() for p in model.parameters() if p.requires_grad) < 1000
    sigma = lr.la.posterior_precision.to_matrix(exponent=-1).double()
    assert sigma.shape == (n, n)
    mean, var = lr.predict(seqs, chunk_size=2)
    J = jacobian_rows(lr.la, model, seqs)
    assert_close(var, torch.einsum("np,pq,nq->n", J, sigma, J), rtol=1e-5, atol=1e-8)
    assert_close(mean, rewards_one_by_one(model, seqs).double(), rtol=1e-5, atol=1e-6)

    loaded = LaplaceReward.load(lr.save(tmp_path / "gpt2"))
    again = loaded.predict(seqs, chunk_size=2)
    assert torch.equal(again[0], mean) and torch.equal(again[1], var)
    assert loaded.prior_precision == 2.0 and loaded.num_pairs == 9

    # Weights moved after the fit: the posterior is stale and is not saved.
    head = model.get_submodule("base_model.model.score.modules_to_save.default").weight
    kept = head.detach().clone()
    with torch.no_grad():
        head.add_(0.1)
    try:
        with pytest.raises(ValueError, match="not the ones the posterior was fit at"):
            lr.save(tmp_path / "stale")
    finally:
        with torch.no_grad():
            head.copy_(kept)


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory):
    directory = tmp_path_factory.mktemp("laplace_rm") / "posterior"
    trained["lr"].save(directory)
    return directory


def test_save_load_round_trip(trained, saved, tmp_path):
    import json

    from safetensors.torch import load_file

    # Another path, and the base model's original directory gone (as on another machine): the saved
    # directory is self-contained.
    moved = tmp_path / "elsewhere"
    shutil.copytree(saved, moved)
    adapter_config = moved / "adapter" / "adapter_config.json"
    adapter_config.write_text(json.dumps({**json.loads(adapter_config.read_text()),
                                          "base_model_name_or_path": "/nonexistent/minilm"}))
    meta = json.loads((moved / "laplace_reward.json").read_text())
    assert meta["hessian_structure"] == "kron" and meta["num_pairs"] == 96
    assert not list(moved.rglob("*.bin")) and not list(moved.rglob("*.pt")) and not list(moved.rglob("*.pkl"))
    posterior = load_file(str(moved / "posterior.safetensors"))
    assert {"mean", "prior_precision", "H.0.0"} <= set(posterior)

    lr, tok = trained["lr"], trained["tok"]
    seqs = trained["chosen"][:4] + [tok(s)["input_ids"] for s in SHIFTED[:4]]
    before = lr.predict(seqs, chunk_size=8)
    loaded = LaplaceReward.load(moved)
    after = loaded.predict(seqs, chunk_size=8)
    assert torch.equal(before[0], after[0]) and torch.equal(before[1], after[1])
    assert loaded.num_pairs == 96 and loaded.prior_precision == lr.prior_precision
    assert loaded.hessian_structure == "kron"
    assert loaded.tokenizer(SHIFTED[0])["input_ids"] == tok(SHIFTED[0])["input_ids"]


@pytest.mark.parametrize("missing", ["posterior.safetensors", "adapter/adapter_model.safetensors",
                                     "base/model.safetensors", "laplace_reward.json"])
def test_load_names_a_missing_file(saved, tmp_path, missing):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    (broken / missing).unlink()
    with pytest.raises(FileNotFoundError, match=missing.replace(".", r"\.")):
        LaplaceReward.load(broken)


def test_bad_arguments(tiny_gpt2):
    model, tok = tiny_gpt2
    seqs = gpt2_seqs(tok)
    with pytest.raises(ValueError, match="hessian_structure"):
        LaplaceReward.fit(model, tok, seqs[:2], seqs[2:4], hessian_structure="full")
    with pytest.raises(ValueError, match="prior_optimization"):
        LaplaceReward.fit(model, tok, seqs[:2], seqs[2:4], prior_optimization="gridsearch")
    with pytest.raises(ValueError, match="batch_size"):
        LaplaceReward.fit(model, tok, seqs[:2], seqs[2:4], batch_size=0)
    with pytest.raises(ValueError, match="differ in length"):
        LaplaceReward.fit(model, tok, seqs[:2], seqs[2:5])
    with pytest.raises(ValueError, match="empty"):
        LaplaceReward.fit(model, tok, [], [])
    with pytest.raises(ValueError, match=r"rejected\[1\] is empty"):
        LaplaceReward.fit(model, tok, seqs[:2], [seqs[0], []])
    with pytest.raises(ValueError, match="negative"):
        LaplaceReward.fit(model, tok, seqs[:2], [seqs[0], [3, -1]])
    pad = model.config.pad_token_id
    model.config.pad_token_id = None
    try:
        with pytest.raises(ValueError, match="pad_token_id"):
            LaplaceReward.fit(model, tok, seqs[:2], seqs[2:4])
    finally:
        model.config.pad_token_id = pad
