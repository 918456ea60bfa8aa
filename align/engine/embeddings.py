"""Sentence embeddings for sample-to-sample costs (RBoN-WD's 1 - cosine similarity).

A plain transformers re-implementation of what sentence-transformers computes for
all-MiniLM-L6-v2 (Transformer -> mean pooling over the attention mask -> L2 normalize), so the
selection code needs only AutoModel and AutoTokenizer. Defaults to the shipped "minilm" encoder,
which loads offline (align.engine.models.resolve_model_path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from align.engine.models import resolve_model_path


def mean_pool(last_hidden_state: Tensor, attention_mask: Tensor) -> Tensor:
    """Mean of the token states over real (mask == 1) tokens: [B, T, d], [B, T] -> [B, d].

    The 1e-9 floor on the token count is sentence-transformers' own (an all-padding row gives 0,
    not NaN).
    """
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)  # [B, T, 1]
    summed = (last_hidden_state * mask).sum(dim=1)
    return summed / mask.sum(dim=1).clamp_min(1e-9)


class SentenceEmbedder:
    """Unit-norm sentence embeddings from an encoder (BERT-style AutoModel) directory or name.

    Args:
        name_or_path: "minilm" (the shipped all-MiniLM-L6-v2), a hub name or a local directory.
        device: where the encoder runs; embeddings always come back on CPU.
        batch_size: texts per forward pass, >= 1.
        max_length: tokens per text, >= 1; longer texts are truncated. (sentence-transformers
            uses 256 for all-MiniLM-L6-v2; the two agree on texts of at most max_length tokens.)
    """

    def __init__(
        self,
        name_or_path: str = "minilm",
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        max_length: int = 128,
    ):
        from transformers import AutoModel, AutoTokenizer

        for name, value in (("batch_size", batch_size), ("max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        self.path = resolve_model_path(name_or_path)
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length
        self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        # float32: the cosine costs compare embeddings to ~1e-6, which bf16 would not hold.
        self.model = AutoModel.from_pretrained(self.path, dtype=torch.float32)
        self.model.to(self.device).eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: list[str]) -> Tensor:
        """[N] texts -> [N, d] float32 CPU tensor of unit-norm embeddings ([0, d] for no texts)."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a list of str")
        texts = list(texts)
        if not texts:
            return torch.empty(0, self.dim, dtype=torch.float32)
        out = []
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                texts[start : start + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(self.device)
            hidden = self.model(**enc).last_hidden_state
            pooled = mean_pool(hidden.float(), enc["attention_mask"])
            out.append(F.normalize(pooled, p=2, dim=1).cpu())
        return torch.cat(out)
