"""Reward kind `classifier`: r(x, y) is the single logit of any HF AutoModelForSequenceClassification
(one label) on prompt + completion, the form trained reward models take (jobs.train_rm writes them)."""
from __future__ import annotations

import torch

from align.rewards.base import PointScorer
from align.rewards.registry import register_reward


class SequenceClassifierReward:
    """r(x, y) = the single logit of an HF AutoModelForSequenceClassification on prompt + completion."""

    def __init__(self, name_or_path: str, device: str = "auto", batch_size: int = 32):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from align.engine.models import pick_device, tokenizer_fingerprint

        self.device = pick_device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(name_or_path).to(self.device).eval()
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size
        self.fingerprint = tokenizer_fingerprint(self.tokenizer)

    @torch.no_grad()
    def __call__(self, prompts: list[str], completions: list[str], ids=None, tokenizer=None) -> torch.Tensor:
        from align.data.pairs import concat_token_ids, pad_right

        if not completions:
            return torch.zeros(0, dtype=torch.float64)
        if ids is not None and tokenizer == self.fingerprint:
            seqs = ids  # the very tokens that were sampled (end-of-sequence included), as jobs/train_rm trains
        else:  # another tokenizer: prompt and completion tokenized apart and concatenated, as train_rm does
            seqs = concat_token_ids(self.tokenizer, prompts, completions)
        out = []
        for i in range(0, len(seqs), self.batch_size):
            ids, attn = pad_right(seqs[i : i + self.batch_size], self.tokenizer.pad_token_id)
            out.append(self.model(input_ids=ids.to(self.device), attention_mask=attn.to(self.device)).logits[:, 0].double().cpu())
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


@register_reward("classifier", needs_path=True)
def build(params, path, device) -> PointScorer:
    return PointScorer(SequenceClassifierReward(path, device=device))
