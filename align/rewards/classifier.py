"""Reward kind `classifier`: r(x, y) is the single logit of any HF AutoModelForSequenceClassification
(one label) on prompt + completion, the form trained reward models take (jobs.train_rm writes them).

It reads the very ids that were sampled when it shares the policy's tokenizer. With its own tokenizer
it reads text prompts as prompt + completion, and a conversation whole, the completion as the
assistant's turn, through its own chat template (`align.data.pairs.reward_input_ids`; jobs.train_rm
trains on the same). An input longer than the model's context keeps its end (the completion, where a
causal reward model reads its score; a leading special token such as BERT's [CLS] stays first), and
the first such cut is logged once."""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger("sweetspot.rewards")


def fit_context(seq: list[int], limit: int | None, keep_first: bool) -> list[int]:
    """`seq` cut to at most `limit` tokens from its end; `keep_first` keeps its first token too."""
    if limit is None or len(seq) <= limit:
        return seq
    return seq[:1] + seq[len(seq) - limit + 1 :] if keep_first else seq[len(seq) - limit :]

from align.rewards.base import PointScorer
from align.rewards.registry import register_reward
from align.runtime.config import require


class SequenceClassifierReward:
    """r(x, y) = the single logit of an HF AutoModelForSequenceClassification on prompt + completion."""

    def __init__(self, name_or_path: str, device: str = "auto", batch_size: int = 32, dtype: str = "auto"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from align.engine.models import pick_device, pick_dtype, tokenizer_fingerprint

        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.dtype = pick_dtype(dtype, self.device)  # auto: bf16 on GPU (half the memory of fp32), fp32 on CPU
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path, dtype=self.dtype).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)
        cfg = self.model.config
        self.context = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        self.warned = False

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], ids=None, tokenizer=None) -> torch.Tensor:
        from align.data.pairs import pad_right, reward_input_ids

        if not completions:
            return torch.zeros(0, dtype=torch.float64)
        if ids is not None and tokenizer == self.fingerprint:
            seqs = ids  # the very tokens that were sampled (end-of-sequence included), as jobs/train_rm trains
        else:  # its own tokenizer (and chat template), as jobs/train_rm reads pairs
            seqs = [reward_input_ids(self.tokenizer, p, c) for p, c in zip(prompts, completions)]
        long = sum(len(q) > self.context for q in seqs) if self.context else 0
        if long:
            if not self.warned:
                log.warning("classifier reward: %d of %d inputs exceed the model's context of %d tokens; each keeps its "
                            "last tokens (the completion's end)%s", long, len(seqs), self.context,
                            " and its first, special, token" if self.keeps_first(seqs) else "")
                self.warned = True
            seqs = [fit_context(q, self.context, self.keeps_first([q])) for q in seqs]
        out = []
        for i in range(0, len(seqs), self.batch_size):
            ids, attn = pad_right(seqs[i : i + self.batch_size], self.tokenizer.pad_token_id)
            out.append(self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits[:, 0].double().cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


    def keeps_first(self, seqs) -> bool:
        """Whether inputs start with a special token the model reads its score from or needs ([CLS], BOS)."""
        return bool(seqs) and bool(seqs[0]) and seqs[0][0] in set(self.tokenizer.all_special_ids)


@dataclass
class ClassifierParams:
    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    batch_size: int = 32  # sequences per forward pass

    def __post_init__(self):
        require(self.dtype in ("auto", "float32", "bfloat16", "float16"), "dtype", "auto | float32 | bfloat16 | float16", self.dtype)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)


@register_reward("classifier", params=ClassifierParams, needs_path=True)
def build(params: ClassifierParams, path, device) -> PointScorer:
    return PointScorer(SequenceClassifierReward(path, device=device, batch_size=params.batch_size, dtype=params.dtype))
