"""Preference data: BoN samples -> (prompt, best, worst) pairs for BoNBoN and DPO, gold-labelled
random pairs for reward models, tokenized into the padded tensors the trainers consume.

A pair dataset is a `datasets.Dataset` with at least the columns prompt, chosen, rejected (any
source with those columns works); BoN pairs also carry chosen_reward, rejected_reward and n. Reference
log-probs of a frozen reference, once computed, are stored as ref_chosen_logps / ref_rejected_logps.
"""
from __future__ import annotations

import random

import torch

PAIR_COLUMNS = ("prompt", "chosen", "rejected")


def bon_pairs(rows: list[dict], n: int | None = None) -> dict[str, list]:
    """Best vs worst of each prompt's n samples (ALGORITHMS.md section 2). Rows whose samples all tie
    in reward carry no preference and are dropped. `rows`: jobs/bon samples.jsonl records."""
    out = {k: [] for k in (*PAIR_COLUMNS, "chosen_reward", "rejected_reward", "n")}
    for r in rows:
        rewards = r["rewards"][:n] if n else r["rewards"]
        best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))  # lowest index among ties
        worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
        if rewards[best] == rewards[worst]:
            continue
        out["prompt"].append(r["prompt"])
        out["chosen"].append(r["completions"][best])
        out["rejected"].append(r["completions"][worst])
        out["chosen_reward"].append(float(rewards[best]))
        out["rejected_reward"].append(float(rewards[worst]))
        out["n"].append(len(rewards))
    return out


def random_pairs(rows: list[dict], pairs_per_prompt: int = 1, seed: int = 0) -> dict[str, list]:
    """Two distinct random samples per pair, labelled by the reward (chosen = higher); ties dropped.
    These are the honest pairs for reward-model training and held-out agreement."""
    rng = random.Random(seed)
    out = {k: [] for k in (*PAIR_COLUMNS, "chosen_reward", "rejected_reward")}
    for r in rows:
        for _ in range(pairs_per_prompt):
            i, j = rng.sample(range(len(r["rewards"])), 2)
            if r["rewards"][i] == r["rewards"][j]:
                continue
            if r["rewards"][i] < r["rewards"][j]:
                i, j = j, i
            out["prompt"].append(r["prompt"])
            out["chosen"].append(r["completions"][i])
            out["rejected"].append(r["completions"][j])
            out["chosen_reward"].append(float(r["rewards"][i]))
            out["rejected_reward"].append(float(r["rewards"][j]))
    return out


def check_pair_columns(column_names, source: str) -> None:
    missing = [c for c in PAIR_COLUMNS if c not in column_names]
    if missing:
        raise ValueError(f"data.source: {source} lacks column(s) {missing}; a pair dataset needs {list(PAIR_COLUMNS)}")


def tokenize_pair_batch(tokenizer, prompts, chosen, rejected, max_length: int) -> dict[str, list]:
    """Token ids of prompt + completion for both sides, with the completion's token count.

    Prompt (with the tokenizer's special tokens, e.g. BOS) and completion (without) are tokenized
    separately and concatenated so the boundary is exact (the loss mask covers completion tokens only). Sequences longer than max_length lose completion tokens
    from the end; the prompt is kept whole.
    """
    p_ids = tokenizer(list(prompts))["input_ids"]  # with BOS where the tokenizer adds one
    out = {}
    for side, texts in (("chosen", chosen), ("rejected", rejected)):
        c_ids = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        ids = [(p + c)[: max(max_length, len(p) + 1)] for p, c in zip(p_ids, c_ids)]
        out[f"{side}_input_ids"] = ids
        out[f"{side}_prompt_len"] = [len(p) for p in p_ids]
    return out


def concat_token_ids(tokenizer, prompts, completions, max_length: int | None = None) -> list[list[int]]:
    """Prompt ids + completion ids, tokenized separately (the same boundary the trainers use)."""
    p_ids = tokenizer(list(prompts))["input_ids"]  # with BOS where the tokenizer adds one
    c_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    return [(p + c)[:max_length] if max_length else p + c for p, c in zip(p_ids, c_ids)]


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), right-padded."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        attn[i, : len(s)] = 1
    return ids, attn


def pad_side(examples: list[dict], side: str, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (input_ids, attention_mask, loss_mask) for one side ("chosen" / "rejected")."""
    seqs = [e[f"{side}_input_ids"] for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, e) in enumerate(zip(seqs, examples)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        loss[i, e[f"{side}_prompt_len"] : len(s)] = True
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss}


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Chosen and rejected stacked into one batch of 2B rows (chosen first), so a single forward
    pass serves both sides; stored reference log-probs ride along when present."""
    c, r = pad_side(examples, "chosen", pad_id), pad_side(examples, "rejected", pad_id)
    width = max(c["input_ids"].shape[1], r["input_ids"].shape[1])

    def widen(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    batch = {k: torch.cat([widen(c[k], v), widen(r[k], v)]) for k, v in (("input_ids", pad_id), ("attention_mask", 0), ("loss_mask", False))}
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        if k in examples[0]:
            batch[k] = torch.tensor([e[k] for e in examples], dtype=torch.float32)
    return batch
