"""The embedded default task at its small size: the session's (tests/conftest.py small_task, built once
into the repository's cache, from scratch on a clean clone as in CI).

Checks that pi_0 is a real LM of its corpus (held-out loss, fluency against random weights), that it
loads back through the Auto classes with the same logits, the prompt splits, the corpus's VADER
sentiment mix, determinism, cache reuse, atomic builds and config validation.
"""
from __future__ import annotations

import json
import logging
import math

import pytest
import torch

from align.task import corpus
from align.runtime.config import ConfigError, load_config
from align.task.default_task import (DefaultTaskConfig, build_default_task, config_hash, ensure_default_task,
                                heldout_loss_per_token, sample_completions)

# The small build's bars (DefaultTaskConfig.small docstring); it measured 1.41 nats/token, fluency 0.985.
SMALL_HELDOUT_BAR = 1.6
FLUENCY_BAR = 0.95
RANDOM_FLUENCY_BAR = 0.6


@pytest.fixture(scope="module")
def built(small_task):
    return DefaultTaskConfig.small(), small_task


@pytest.fixture(scope="module")
def loaded(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, task = built
    return AutoModelForCausalLM.from_pretrained(task.policy_dir).eval(), AutoTokenizer.from_pretrained(task.policy_dir)


def test_policy_loads_back_with_the_same_logits(built, loaded):
    _, task = built
    model, tok = loaded
    probe = json.loads((task.root / "probe.json").read_text())
    ids = tok(probe["text"])["input_ids"]
    assert ids == probe["input_ids"]  # the tokenizer round-trips, bos prepended
    assert ids[0] == tok.bos_token_id == tok.eos_token_id == tok.pad_token_id
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :, : len(probe["logits"][0])]
    torch.testing.assert_close(logits, torch.tensor(probe["logits"]), rtol=0, atol=1e-5)


def test_pi0_is_a_language_model_of_its_corpus(built, loaded):
    cfg, task = built
    model, tok = loaded
    r = task.report
    assert r["heldout_loss_per_token"] < SMALL_HELDOUT_BAR < 0.5 * math.log(r["vocab_size"])
    assert r["fluency"] >= FLUENCY_BAR and r["random_init_fluency"] < RANDOM_FLUENCY_BAR
    # Recomputed from the saved files: the same loss, so the report describes the saved model.
    held = torch.tensor([i for e in tok(task.heldout_reviews())["input_ids"] for i in e])
    assert heldout_loss_per_token(model, held, cfg.n_positions) == pytest.approx(r["heldout_loss_per_token"], abs=1e-4)


def test_fluency_separates_trained_from_random_weights(built, loaded):
    from transformers import AutoConfig, AutoModelForCausalLM

    _, task = built
    model, tok = loaded
    prompts, vocab = task.prompts("validation")[:16], task.vocabulary()
    trained = sample_completions(model, tok, prompts, 24, 16, seed=1)
    torch.manual_seed(1)
    random_model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(task.policy_dir)).eval()
    rand = sample_completions(random_model, tok, prompts, 24, 16, seed=1)
    assert all(len(tok(c, add_special_tokens=False)["input_ids"]) >= 12 for c in trained)
    assert corpus.fluency(trained, vocab) >= FLUENCY_BAR - 0.03  # 16 prompts: a noisier estimate
    assert corpus.fluency(rand, vocab) < RANDOM_FLUENCY_BAR


def test_prompt_splits(built):
    import datasets

    cfg, task = built
    splits = {s: task.prompts(s) for s in ("train", "validation", "test")}
    assert {s: len(p) for s, p in splits.items()} == {"train": cfg.train_prompts, "validation": cfg.validation_prompts,
                                                       "test": cfg.test_prompts}
    every = [p for ps in splits.values() for p in ps]
    assert len(set(every)) == len(every)  # unique, hence disjoint splits
    heldout = task.heldout_reviews()
    for p in every[:50]:
        assert cfg.prompt_min_words <= len(p.split()) <= cfg.prompt_max_words
        assert any(r.startswith(p + " ") for r in heldout)
    ds = datasets.load_dataset("json", data_files={s: str(f) for s, f in task.prompt_files.items()})
    assert ds["test"]["prompt"] == splits["test"]


def test_corpus_has_vader_sentiment_of_both_signs(built):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    vader = SentimentIntensityAnalyzer()
    lexicon = vader.lexicon
    vocab = built[1].vocabulary()
    assert sum(lexicon.get(w, 0) > 0.5 for w in vocab) >= 30 and sum(lexicon.get(w, 0) < -0.5 for w in vocab) >= 20
    assert all(lexicon[w] > 0 for w in corpus.POS_ADJ + corpus.POS_VERB)
    assert all(lexicon[w] < 0 for w in corpus.NEG_ADJ + corpus.NEG_VERB)
    assert [w for w in corpus.NEUTRAL_WORDS if w in lexicon] == []  # fillers carry no score
    compound = torch.tensor([vader.polarity_scores(s)["compound"] for s in corpus.generate_corpus(2000, seed=3)])
    assert (compound > 0.05).float().mean() > 0.25 and (compound < -0.05).float().mean() > 0.2
    assert compound.unique().numel() > 100  # varied: completions rarely tie in reward


def test_generate_corpus_is_deterministic_in_its_seed():
    a = corpus.generate_corpus(500, seed=0)
    assert len(a) == 500 and a == corpus.generate_corpus(500, seed=0)
    assert a != corpus.generate_corpus(500, seed=1)
    assert sum(len(r) for r in corpus.generate_reviews(500, seed=0)) == 500


def test_words_and_fluency_by_hand():
    assert corpus.words("Great, isn't it? The Silent Harbor!") == ["great", "isn't", "it", "the", "silent", "harbor"]
    # 4 words, 3 in the vocabulary ("x" is not): 3/4.
    assert corpus.fluency(["a b.", "C x"], {"a", "b", "c"}) == 0.75
    assert corpus.fluency([], {"a"}) == 1.0


def test_second_call_reuses_the_cache(built, caplog):
    cfg, task = built
    mtime = (task.root / "report.json").stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="align.task.default_task"):
        again = ensure_default_task(cfg, progress=False)
    assert again.reused and again.root == task.root
    assert (task.root / "report.json").stat().st_mtime_ns == mtime
    assert "reusing" in caplog.text
    assert json.loads((task.root / "config.json").read_text())["train_steps"] == cfg.train_steps


def test_cache_key_follows_the_build_config_only(tmp_path):
    base = DefaultTaskConfig.small()
    assert config_hash(DefaultTaskConfig.small(cache_dir=str(tmp_path), num_threads=1)) == config_hash(base)
    assert config_hash(DefaultTaskConfig.small(train_steps=base.train_steps + 1)) != config_hash(base)


def test_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    import align.task.default_task as dt

    def boom(*args, **kwargs):
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(dt, "pretrain", boom)
    cfg = DefaultTaskConfig.small(num_sentences=2000, heldout_sentences=400, train_prompts=10,
                                  validation_prompts=5, test_prompts=5, fluency_prompts=4)
    with pytest.raises(RuntimeError, match="killed"):
        build_default_task(cfg, tmp_path / "task", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("override, field", [("vocab_size=10", "vocab_size"), ("train_steps=0", "train_steps"),
                                             ("n_embd=130", "n_embd"), ("warmup=1000", "warmup"),
                                             ("prompt_max_words=1", "prompt_max_words"), ("bogus=1", "bogus")])
def test_config_errors_name_the_field(override, field):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        load_config(DefaultTaskConfig, None, [override])
