"""align/rewards/vader.py and classifier.py: VADER's exact compound scores, a tiny sequence-classifier reward
matched against a hand-computed forward (padding and batch size must not change a score), and building
them by kind through the registry."""

import pytest
import torch
from torch.testing import assert_close

from align.rewards.classifier import SequenceClassifierReward
from align.rewards.registry import build_scorer
from align.rewards.vader import VaderReward
from align.runtime.config import ConfigError
from tests.conftest import save_tiny_lm

COMPLETIONS = [
    " a wonderful, moving film. I loved every minute!",
    " awful. The worst two hours of my life.",
    " a movie.",
    "",
]

# Prompts and completions of different token lengths, so padding is exercised in every batch.
RM_PROMPTS = ["the movie was", "a good film with a bad ending .", "the plot", "the story is fine , the music is lovely ,"]
RM_COMPLETIONS = [" great and the acting was wonderful .", " awful", " was terrible and the pacing was awful and weak .", " the cast is weak ."]


# --- VADER -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vader():
    return VaderReward()


def test_vader_equals_analyzer_compound(vader):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    expected = [analyzer.polarity_scores(c)["compound"] for c in COMPLETIONS]
    got = vader(["The movie was"] * len(COMPLETIONS), COMPLETIONS)
    assert got.dtype == torch.float64
    assert got.shape == (len(COMPLETIONS),)
    assert got.tolist() == expected  # exact
    assert got[0] > 0.5 and got[1] < -0.5 and got[3] == 0.0  # sanity: the judge is sentiment
    assert ((got >= -1) & (got <= 1)).all()


def test_vader_ignores_prompt(vader):
    c = " a wonderful, moving film."
    got = vader(["I hated it, terrible, awful:", "I loved it, wonderful:", ""], [c, c, c])
    assert got[0] == got[1] == got[2]
    assert got[0] != 0.0


def test_vader_empty(vader):
    got = vader([], [])
    assert got.dtype == torch.float64 and got.shape == (0,)


# --- sequence classifier -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_rm_dir(tmp_path_factory):
    """A random GPT2ForSequenceClassification (one label) with the tiny tokenizer, saved in HF format."""
    from transformers import AutoTokenizer, GPT2Config, GPT2ForSequenceClassification

    lm_dir = save_tiny_lm(tmp_path_factory.mktemp("tiny_lm_for_rm"))
    tok = AutoTokenizer.from_pretrained(lm_dir)
    cfg = GPT2Config.from_pretrained(lm_dir)
    cfg.num_labels = 1
    torch.manual_seed(1)
    model = GPT2ForSequenceClassification(cfg)
    model.config.pad_token_id = tok.pad_token_id
    with torch.no_grad():  # a score head big enough that different inputs give clearly different scores
        model.score.weight.normal_(0.0, 1.0)
    out = tmp_path_factory.mktemp("tiny_rm")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def expected_scores(path, prompts, completions):
    """One unpadded forward per example: the logit at the last token of prompt ids + completion ids."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for p, c in zip(prompts, completions):
            ids = tok(p)["input_ids"] + tok(c, add_special_tokens=False)["input_ids"]
            assert tok.pad_token_id not in ids  # so the model's last-non-pad rule picks the true last token
            logits = model(input_ids=torch.tensor([ids])).logits
            assert logits.shape == (1, 1)
            out.append(float(logits[0, 0]))
    return torch.tensor(out, dtype=torch.float64)


def test_classifier_matches_hand_forward(tiny_rm_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_rm_dir)
    lengths = {len(tok(p)["input_ids"]) + len(tok(c, add_special_tokens=False)["input_ids"]) for p, c in zip(RM_PROMPTS, RM_COMPLETIONS)}
    assert len(lengths) == len(RM_PROMPTS)  # every sequence a different length: padding is needed

    reward = SequenceClassifierReward(str(tiny_rm_dir), device="cpu", batch_size=4)
    got = reward(RM_PROMPTS, RM_COMPLETIONS)
    want = expected_scores(tiny_rm_dir, RM_PROMPTS, RM_COMPLETIONS)
    assert got.dtype == torch.float64 and got.shape == (len(RM_PROMPTS),)
    assert_close(got, want, rtol=0, atol=1e-6)
    assert len({round(v, 4) for v in want.tolist()}) == len(want)  # the scores really differ


def test_classifier_prompt_completion_boundary(tiny_rm_dir):
    """Prompt and completion are tokenized apart: the score is that of the concatenated ids, not of the
    re-tokenized concatenated text."""
    prompts, completions = ["the movie"], [" was great"]
    reward = SequenceClassifierReward(str(tiny_rm_dir), device="cpu")
    assert_close(reward(prompts, completions), expected_scores(tiny_rm_dir, prompts, completions), rtol=0, atol=1e-6)


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
def test_classifier_independent_of_batch_size(tiny_rm_dir, batch_size):
    prompts, completions = RM_PROMPTS * 2, RM_COMPLETIONS[::-1] + RM_COMPLETIONS  # 8 rows, uneven last batch
    one = SequenceClassifierReward(str(tiny_rm_dir), device="cpu", batch_size=1)(prompts, completions)
    got = SequenceClassifierReward(str(tiny_rm_dir), device="cpu", batch_size=batch_size)(prompts, completions)
    assert got.shape == (8,)
    assert_close(got, one, rtol=0, atol=1e-6)
    assert_close(got, expected_scores(tiny_rm_dir, prompts, completions), rtol=0, atol=1e-6)


def test_classifier_empty_input(tiny_rm_dir):
    got = SequenceClassifierReward(str(tiny_rm_dir), device="cpu")([], [])
    assert got.dtype == torch.float64 and got.shape == (0,)


# --- built by kind ---------------------------------------------------------------------------------


def test_make_reward_vader():
    r = build_scorer({"kind": "vader"}).reward
    assert isinstance(r, VaderReward)
    assert r([""], [" wonderful"]).tolist() == VaderReward()([""], [" wonderful"]).tolist()


def test_make_reward_classifier(tiny_rm_dir):
    r = build_scorer({"kind": "classifier", "path": str(tiny_rm_dir), "device": "cpu"}).reward
    assert isinstance(r, SequenceClassifierReward)
    assert r.device == torch.device("cpu")
    assert_close(r(RM_PROMPTS, RM_COMPLETIONS), expected_scores(tiny_rm_dir, RM_PROMPTS, RM_COMPLETIONS), rtol=0, atol=1e-6)


def test_make_reward_unknown_kind():
    with pytest.raises(ConfigError) as err:
        build_scorer({"kind": "bogus"})
    msg = str(err.value)
    assert "reward.kind" in msg and "'bogus'" in msg
