"""Preference data: BoN samples -> (prompt, best, worst) pairs for BoNBoN and DPO, gold-labelled
random pairs for reward models, and the padded tensors the trainers consume.

A pair dataset is a `datasets.Dataset` with at least the columns prompt, chosen, rejected (any
source with those columns works). Pairs made from BoN samples also carry the sampled token ids
(prompt_ids, chosen_ids, rejected_ids, with the fingerprint of their tokenizer) and the sampling
process (temperature, min_new_tokens): a trainer with the same tokenizer trains on exactly the tokens
that were sampled and scored, end-of-sequence included, and takes log-probs under the same process;
text is only re-tokenized for another tokenizer. BoN pairs also carry chosen_reward,
rejected_reward and n.
"""
from __future__ import annotations

import random

import torch


PAIR_COLUMNS = ("prompt", "chosen", "rejected")
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids", "tokenizer", "temperature", "min_new_tokens")


def _pair(r: dict, i: int, j: int) -> dict:
    """Sample i of record r as chosen and sample j as rejected, with their ids and process."""
    return {"prompt": r["prompt"], "chosen": r["completions"][i], "rejected": r["completions"][j],
            "prompt_ids": r["prompt_ids"], "chosen_ids": r["completion_ids"][i], "rejected_ids": r["completion_ids"][j],
            "tokenizer": r["tokenizer"], "temperature": float(r["temperature"]), "min_new_tokens": int(r["min_new_tokens"]),
            "chosen_reward": float(r["rewards"][i]), "rejected_reward": float(r["rewards"][j])}


def _columns(pairs: list[dict], keys) -> dict[str, list]:
    return {k: [p[k] for p in pairs] for k in keys}


def bon_pairs(rows: list[dict], n: int | None = None) -> dict[str, list]:
    """Best vs worst of each prompt's n samples (docs/algorithms.md, BoNBoN). Rows whose samples all
    tie in reward carry no preference and are dropped. `rows`: jobs/bon samples.jsonl records."""
    pairs = []
    for r in rows:
        rewards = r["rewards"][:n] if n else r["rewards"]
        best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))  # lowest index among ties
        worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
        if rewards[best] == rewards[worst]:
            continue
        pairs.append({**_pair(r, best, worst), "n": len(rewards)})
    return _columns(pairs, (*PAIR_COLUMNS, *ID_COLUMNS, "chosen_reward", "rejected_reward", "n"))


def random_pairs(rows: list[dict], pairs_per_prompt: int = 1, seed: int = 0) -> dict[str, list]:
    """Two distinct random samples per pair, labelled by the reward (chosen = higher); ties dropped.
    These are the honest pairs for reward-model training and held-out agreement."""
    rng = random.Random(seed)
    pairs = []
    for r in rows:
        for _ in range(pairs_per_prompt):
            i, j = rng.sample(range(len(r["rewards"])), 2)
            if r["rewards"][i] == r["rewards"][j]:
                continue
            if r["rewards"][i] < r["rewards"][j]:
                i, j = j, i
            pairs.append(_pair(r, i, j))
    return _columns(pairs, (*PAIR_COLUMNS, *ID_COLUMNS, "chosen_reward", "rejected_reward"))


def check_pair_columns(column_names, source: str) -> None:
    missing = [c for c in PAIR_COLUMNS if c not in column_names]
    if missing:
        raise ValueError(f"data.source: {source} lacks column(s) {missing}; a pair dataset needs {list(PAIR_COLUMNS)}")


def tokenize_pair_batch(tokenizer, batch: dict[str, list], max_length: int, fingerprint: str | None = None,
                        for_reward_model: bool = False) -> dict[str, list]:
    """Token ids of prompt + completion for both sides, the prompt's length, and the sampling process.

    When the batch carries sampled ids from a tokenizer with this `fingerprint`, those ids are used
    as they are. Otherwise prompt (with the tokenizer's special tokens, e.g. BOS; a conversation
    through the chat template) and completion (without; after a conversation, ended by eos) are
    tokenized separately and concatenated so the boundary is exact, and the process is plain
    (temperature 1, nothing blocked): a foreign tokenizer's positions mean nothing here.
    for_reward_model: a conversation is read whole as the reward tokenizer's template renders it
    (`reward_input_ids`), what the classifier reward scores.
    Sequences longer than max_length lose completion tokens from the end; the prompt is kept whole.
    """
    rows = len(batch["prompt"])
    own_ids = "chosen_ids" in batch and fingerprint is not None
    use = [own_ids and batch["tokenizer"][i] == fingerprint for i in range(rows)]
    p_ids = prompt_ids(tokenizer, batch["prompt"], [not u for u in use])
    p_ids = [batch["prompt_ids"][i] if use[i] else p_ids[i] for i in range(rows)]
    out = {"temperature": [float(batch["temperature"][i]) if use[i] else 1.0 for i in range(rows)],
           "min_new_tokens": [int(batch["min_new_tokens"][i]) if use[i] else 0 for i in range(rows)]}
    for side in ("chosen", "rejected"):
        if for_reward_model:  # a reward model reads a conversation as its own template renders it whole
            seqs = [batch["prompt_ids"][i] + batch[f"{side}_ids"][i] if use[i]
                    else reward_input_ids(tokenizer, batch["prompt"][i], batch[side][i]) for i in range(rows)]
            out[f"{side}_input_ids"] = [s[: max(max_length, min(len(p), len(s) - 1) + 1)] for p, s in zip(p_ids, seqs)]
            out[f"{side}_prompt_len"] = [min(len(p), len(s) - 1) for p, s in zip(p_ids, seqs)]
            continue
        c_ids = [batch[f"{side}_ids"][i] if use[i] else completion_ids(tokenizer, batch["prompt"][i], batch[side][i], side)
                 for i in range(rows)]
        out[f"{side}_input_ids"] = [(p + c)[: max(max_length, len(p) + 1)] for p, c in zip(p_ids, c_ids)]
        out[f"{side}_prompt_len"] = [len(p) for p in p_ids]
    return out


def prompt_ids(tokenizer, prompts, needed=None) -> list[list[int] | None]:
    """Each prompt's ids (`align.engine.chat`: text with the tokenizer's special tokens, a conversation
    through its chat template); None where `needed` says the ids are not wanted."""
    from align.engine.chat import PromptEncoder

    encoder = PromptEncoder(tokenizer)
    needed = [True] * len(prompts) if needed is None else needed
    wanted = [p for p, k in zip(prompts, needed) if k]
    it = iter(encoder.batch_ids(wanted) if wanted else [])
    return [next(it) if k else None for k in needed]


def completion_ids(tokenizer, prompt, completion, where: str = "completion") -> list[int]:
    """A completion's ids after `prompt`: its text without special tokens, and for a conversation (an
    answer, TRL's [{role: assistant, content}] or text) the tokenizer's eos after it, as a chat model ends
    its turn; the same boundary the sampler's ids have."""
    from align.engine.chat import PromptEncoder, completion_text, is_conversation

    return PromptEncoder(tokenizer).completion_ids(completion_text(completion, where), ended=is_conversation(prompt))


def reward_input_ids(tokenizer, prompt, completion) -> list[int]:
    """What a reward model reads for (prompt, completion), in its own tokenizer. Text: prompt ids +
    completion ids, as the policy's boundary. A conversation: the whole exchange, the completion as the
    assistant's turn, rendered by the reward tokenizer's own chat template (as chat reward models such
    as Skywork-Reward are trained to read it); without a template, as "role: content" lines."""
    from align.engine.chat import completion_text, is_conversation

    if not is_conversation(prompt):
        return prompt_ids(tokenizer, [prompt])[0] + completion_ids(tokenizer, prompt, completion)
    turns = [*prompt, {"role": "assistant", "content": completion_text(completion)}]
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(turns, tokenize=True, return_dict=True)["input_ids"])
    return list(tokenizer("\n".join(f"{m['role']}: {m['content']}" for m in turns))["input_ids"])


def concat_token_ids(tokenizer, prompts, completions, max_length: int | None = None) -> list[list[int]]:
    """Prompt ids + completion ids, tokenized separately (the same boundary the trainers use)."""
    p_ids = prompt_ids(tokenizer, list(prompts))
    c_ids = [completion_ids(tokenizer, p, c) for p, c in zip(prompts, completions)]
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
    """Right-padded input_ids, attention_mask, loss_mask (completion tokens) and eos_blocked (the
    completion tokens drawn while end-of-sequence was blocked: the first min_new_tokens) for one
    side ("chosen" / "rejected")."""
    seqs = [e[f"{side}_input_ids"] for e in examples]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    loss = torch.zeros((len(seqs), width), dtype=torch.bool)
    blocked = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, e) in enumerate(zip(seqs, examples)):
        start = e[f"{side}_prompt_len"]
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        loss[i, start : len(s)] = True
        blocked[i, start : min(len(s), start + e.get("min_new_tokens", 0))] = True
    return {"input_ids": ids, "attention_mask": attn, "loss_mask": loss, "eos_blocked": blocked}


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Chosen and rejected stacked into one batch of 2B rows (chosen first), so a single forward
    pass serves both sides; stored reference log-probs ride along when present."""
    c, r = pad_side(examples, "chosen", pad_id), pad_side(examples, "rejected", pad_id)
    width = max(c["input_ids"].shape[1], r["input_ids"].shape[1])

    def widen(t, value):
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    batch = {k: torch.cat([widen(c[k], v), widen(r[k], v)])
             for k, v in (("input_ids", pad_id), ("attention_mask", 0), ("loss_mask", False), ("eos_blocked", False))}
    batch["temperature"] = torch.tensor([e.get("temperature", 1.0) for e in examples] * 2, dtype=torch.float32)
    batch["num_tokens"] = batch["attention_mask"].sum()
    for k in ("ref_chosen_logps", "ref_rejected_logps"):
        if k in examples[0]:
            batch[k] = torch.tensor([e[k] for e in examples], dtype=torch.float32)
    return batch


def collate_packed_pairs(examples: list[dict], pad_id: int) -> dict:
    """Prefix sharing (Wang et al., "Accelerating Direct Preference Optimization with Prefix Sharing",
    arXiv 2410.20305): each pair is one row [prompt | chosen | rejected], so the prompt is computed once
    for both sides.

    Prompts are left-padded to end at the same column P, so every position the loss needs is in the
    last `logits_to_keep` = W - P + 1 columns and the LM head runs only there. Rejected tokens restart
    their positions after the prompt and attend to the prompt and to earlier rejected tokens, never to
    chosen ones (`attention_4d`, (B, 1, W, W), True where a query may attend a key), so each side sees
    exactly what it would in its own sequence. For each side, `<side>_src` (B, T) says which kept
    column predicts each of its tokens `<side>_targets`; `blocked` (B, keep) marks kept columns whose
    prediction was drawn with end-of-sequence blocked (the first min_new_tokens of either side).
    """
    B = len(examples)
    prompts = [e["chosen_input_ids"][: e["chosen_prompt_len"]] for e in examples]
    sides = {side: [e[f"{side}_input_ids"][e[f"{side}_prompt_len"] :] for e in examples] for side in ("chosen", "rejected")}
    for e, p in zip(examples, prompts):
        if e["rejected_input_ids"][: e["rejected_prompt_len"]] != p:
            raise ValueError("prefix sharing needs chosen and rejected to share their prompt tokens")
    P = max(len(p) for p in prompts)
    W = P + max(len(c) + len(r) for c, r in zip(sides["chosen"], sides["rejected"]))
    keep = W - P + 1
    ids = torch.full((B, W), pad_id, dtype=torch.long)
    pos = torch.zeros((B, W), dtype=torch.long)
    seg = torch.full((B, W), -1, dtype=torch.long)  # 0 prompt, 1 chosen, 2 rejected, -1 padding
    widths = {side: max(1, max(len(c) for c in sides[side])) for side in sides}
    out = {f"{side}_{k}": torch.zeros((B, widths[side]), dtype=dt) for side in sides
           for k, dt in (("src", torch.long), ("targets", torch.long), ("mask", torch.bool))}
    blocked = torch.zeros((B, keep), dtype=torch.bool)
    for i, (p, e) in enumerate(zip(prompts, examples)):
        c, r, lp = sides["chosen"][i], sides["rejected"][i], len(p)
        ids[i, P - lp : P], pos[i, P - lp : P], seg[i, P - lp : P] = torch.tensor(p, dtype=torch.long), torch.arange(lp), 0
        for side, toks, start, label in (("chosen", c, P, 1), ("rejected", r, P + len(c), 2)):
            n = len(toks)
            if n == 0:
                continue
            ids[i, start : start + n] = torch.tensor(toks, dtype=torch.long)
            pos[i, start : start + n] = lp + torch.arange(n)
            seg[i, start : start + n] = label
            # Token j of a side is predicted at column P - 1 (the prompt's last) for j = 0, else at the
            # side's own column start + j - 1; kept columns are counted from P - 1.
            src = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(start, start + n - 1) - (P - 1)])
            out[f"{side}_src"][i, :n], out[f"{side}_targets"][i, :n], out[f"{side}_mask"][i, :n] = src, torch.tensor(toks), True
            blocked[i, src[: e.get("min_new_tokens", 0)]] = True
    q, k = seg[:, :, None], seg[:, None, :]  # (B, W, 1), (B, 1, W)
    causal = torch.ones(W, W, dtype=torch.bool).tril()
    allowed = causal & (k >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(W, dtype=torch.bool) & (q < 0)  # padding attends to itself: no empty softmax row
    out.update(input_ids=ids, position_ids=pos, attention_4d=allowed[:, None], blocked=blocked,
               logits_to_keep=torch.tensor(keep), packed=torch.tensor(True),
               num_tokens=torch.tensor(sum(len(e["chosen_input_ids"]) + len(e["rejected_input_ids"]) for e in examples)))
    out["temperature"] = torch.tensor([e.get("temperature", 1.0) for e in examples], dtype=torch.float32)
    for key in ("ref_chosen_logps", "ref_rejected_logps"):
        if key in examples[0]:
            out[key] = torch.tensor([e[key] for e in examples], dtype=torch.float32)
    return out
