"""align/data/pairs: best/worst and random pairs keep the sampled token ids and process; the trainers'
batches hold exactly the sampled tokens, and their log-probs are the sampler's own."""
import json

import pytest
import torch

from align.engine.models import load_tokenizer, tokenizer_fingerprint
from align.data.pairs import bon_pairs, collate_pairs, random_pairs, tokenize_pair_batch


def row(rewards, prompt="the plot", fp="fp"):
    k = len(rewards)
    return {"prompt": prompt, "prompt_ids": [0, 7], "completions": [f"c{i}" for i in range(k)],
            "completion_ids": [[10 + i, 20 + i] for i in range(k)], "rewards": rewards, "temperature": 0.9,
            "min_new_tokens": 1, "tokenizer": fp}


def test_bon_pairs_best_and_worst_with_ids_and_ties():
    rows = [row([0.1, 0.5, -0.2, 0.5]), row([0.3, 0.3, 0.3]), row([-1.0, 2.0], prompt="a")]
    p = bon_pairs(rows)
    assert p["prompt"] == ["the plot", "a"], "the all-tied row carries no preference"
    assert p["chosen"] == ["c1", "c1"] and p["rejected"] == ["c2", "c0"], "lowest index among tied best"
    assert p["chosen_ids"] == [[11, 21], [11, 21]] and p["rejected_ids"] == [[12, 22], [10, 20]]
    assert p["prompt_ids"] == [[0, 7], [0, 7]] and p["n"] == [4, 2]
    assert p["chosen_reward"] == [0.5, 2.0] and p["rejected_reward"] == [-0.2, -1.0]
    assert p["temperature"] == [0.9, 0.9] and p["min_new_tokens"] == [1, 1] and p["tokenizer"] == ["fp", "fp"]
    assert bon_pairs(rows, n=2)["chosen"] == ["c1", "c1"]  # only the first n samples count


def test_random_pairs_are_labelled_by_reward_and_reproducible():
    rows = [row([0.1, 0.5, -0.2, 0.4]) for _ in range(20)]
    a, b = random_pairs(rows, 3, seed=1), random_pairs(rows, 3, seed=1)
    assert a == b and len(a["prompt"]) == 60
    assert all(c > r for c, r in zip(a["chosen_reward"], a["rejected_reward"]))
    for cid, c, cr in zip(a["chosen_ids"], a["chosen"], a["chosen_reward"]):
        i = int(c[1:])
        assert cid == [10 + i, 20 + i] and cr == [0.1, 0.5, -0.2, 0.4][i]
    assert random_pairs(rows, 3, seed=2) != a
    assert random_pairs([row([0.3, 0.3])], 5)["prompt"] == [], "ties are dropped"


def test_tokenize_uses_sampled_ids_only_for_the_same_tokenizer(tiny_lm_dir):
    tok = load_tokenizer(str(tiny_lm_dir))
    fp = tokenizer_fingerprint(tok)
    batch = {"prompt": ["the movie"], "chosen": [" was great"], "rejected": [" was bad"],
             "prompt_ids": [[5, 6]], "chosen_ids": [[7, 8, 0]], "rejected_ids": [[9, 0]],
             "tokenizer": [fp], "temperature": [0.5], "min_new_tokens": [2]}
    same = tokenize_pair_batch(tok, batch, max_length=64, fingerprint=fp)
    assert same["chosen_input_ids"] == [[5, 6, 7, 8, 0]] and same["rejected_input_ids"] == [[5, 6, 9, 0]]
    assert same["chosen_prompt_len"] == [2] and same["temperature"] == [0.5] and same["min_new_tokens"] == [2]
    other = tokenize_pair_batch(tok, batch, max_length=64, fingerprint="another")
    p = tok(["the movie"])["input_ids"][0]
    assert other["chosen_input_ids"] == [p + tok([" was great"], add_special_tokens=False)["input_ids"][0]]
    assert other["temperature"] == [1.0] and other["min_new_tokens"] == [0], "a foreign process is not replayed"
    text_only = {k: batch[k] for k in ("prompt", "chosen", "rejected")}
    assert tokenize_pair_batch(tok, text_only, 64, fp)["chosen_input_ids"] == other["chosen_input_ids"]
    assert tokenize_pair_batch(tok, batch, max_length=3, fingerprint=fp)["chosen_input_ids"] == [[5, 6, 7]]


def test_collate_layout_and_eos_blocked_positions():
    ex = [{"chosen_input_ids": [1, 2, 3, 4], "chosen_prompt_len": 2, "rejected_input_ids": [1, 2, 5], "rejected_prompt_len": 2,
           "temperature": 0.5, "min_new_tokens": 1},
          {"chosen_input_ids": [6, 7], "chosen_prompt_len": 1, "rejected_input_ids": [6, 8, 9, 9, 9], "rejected_prompt_len": 1,
           "temperature": 1.0, "min_new_tokens": 3, "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0}]
    ex[0].update(ref_chosen_logps=-3.0, ref_rejected_logps=-4.0)
    b = collate_pairs(ex, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 2, 3, 4, 0], [6, 7, 0, 0, 0], [1, 2, 5, 0, 0], [6, 8, 9, 9, 9]]
    assert b["loss_mask"].int().tolist() == [[0, 0, 1, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]
    assert b["eos_blocked"].int().tolist() == [[0, 0, 1, 0, 0], [0, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 1, 1, 1, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert b["temperature"].tolist() == [0.5, 1.0, 0.5, 1.0]
    assert b["ref_chosen_logps"].tolist() == [-3.0, -1.0] and b["ref_rejected_logps"].tolist() == [-4.0, -2.0]


def test_trainer_log_probs_are_the_samplers(tiny_lm_dir):
    """Samples drawn with temperature and early EOS blocking, through pairs and collation, score
    under the trainer's log-prob (align.math.losses) exactly as the sampler recorded them."""
    from actors.generator import Generator
    from align.objectives.base import pair_logps

    gen = Generator(str(tiny_lm_dir), device="cpu")
    out = gen.sample(["the movie was", "a good film", "the plot"], n=8, max_new_tokens=30, temperature=0.8,
                     min_new_tokens=4, seed=5)
    rows = [{"prompt": s.prompt, "prompt_ids": s.prompt_ids, "completions": s.completions, "completion_ids": s.completion_ids,
             "rewards": [float(len(c)) + 0.01 * i for i, c in enumerate(s.completions)], "temperature": 0.8,
             "min_new_tokens": 4, "tokenizer": s.tokenizer} for s in out["samples"]]
    logp = {(tuple(s.prompt_ids), tuple(c)): lp for s in out["samples"] for c, lp in zip(s.completion_ids, s.logprobs)}
    assert any(len(c) < 30 and c[-1] == gen.tokenizer.eos_token_id for s in out["samples"] for c in s.completion_ids)
    pairs = random_pairs(rows, 4, seed=0)
    tok = tokenize_pair_batch(gen.tokenizer, pairs, 64, gen.fingerprint)
    ex = [{k: tok[k][i] for k in tok} for i in range(len(pairs["prompt"]))]
    with torch.no_grad():
        c, r, _ = pair_logps(gen.model, collate_pairs(ex, gen.tokenizer.pad_token_id), gen.tokenizer.eos_token_id)
    want_c = [logp[(tuple(p), tuple(y))] for p, y in zip(pairs["prompt_ids"], pairs["chosen_ids"])]
    want_r = [logp[(tuple(p), tuple(y))] for p, y in zip(pairs["prompt_ids"], pairs["rejected_ids"])]
    torch.testing.assert_close(c, torch.tensor(want_c), atol=1e-4, rtol=0)
    torch.testing.assert_close(r, torch.tensor(want_r), atol=1e-4, rtol=0)


@pytest.mark.ray
@pytest.mark.slow
def test_trainer_sees_exactly_the_sampled_ids(small_task, small_pairs):
    """jobs.make_pairs -> the tokenized data the training workers read: every pair's completion ids
    are the ids that were sampled and scored (end-of-sequence included where sampled)."""
    from align.engine.models import load_tokenizer
    from jobs.sections import PairDataConfig
    from jobs.training import load_pair_dataset, tokenize_pairs

    sampled = {}
    for line in (small_pairs / "samples_train" / "samples.jsonl").read_text().splitlines():
        r = json.loads(line)
        sampled.setdefault(r["prompt"], []).extend(tuple(c) for c in r["completion_ids"])
    for source in ("bonbon", "random"):
        pairs = load_pair_dataset(PairDataConfig(source=str(small_pairs / source)))
        ds = tokenize_pairs(pairs, load_tokenizer(str(small_task.policy_dir)), 64)
        assert len(ds) > 0
        for e in ds:
            for side in ("chosen", "rejected"):
                ids = e[f"{side}_input_ids"]
                assert ids[: e[f"{side}_prompt_len"]] == e["prompt_ids"]
                assert tuple(ids[e[f"{side}_prompt_len"] :]) in sampled[e["prompt"]]
                assert tuple(ids[e[f"{side}_prompt_len"] :]) == tuple(e[f"{side}_ids"])
