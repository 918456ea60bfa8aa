"""Draw kernels: the distribution a token is drawn from (`process_logits`: temperature, with 0 the
greedy point mass, a blocked end-of-sequence, the `nucleus` for top_p < 1) and exact inverse-CDF
draws from it, over materialised logits (`draw_tokens`) or fused with the LM head (`draw_from_hidden`,
plain sampling only).

Pure tensor functions: the sampling loop (align.engine.sampling), the trainers' log-probs
(align.math.losses) and DeRa all call these, so every stored log-prob describes the same process.
"""
from __future__ import annotations

import torch


def end_ids(eos_token_id) -> tuple[int, ...]:
    """The ids that end a sequence: None -> (), an id -> (id,), a sequence of ids -> a tuple of them.
    Every `eos_token_id` below takes any of the three (a chat model ends its turn on several ids)."""
    if eos_token_id is None:
        return ()
    if isinstance(eos_token_id, int) or (torch.is_tensor(eos_token_id) and eos_token_id.dim() == 0):
        return (int(eos_token_id),)
    return tuple(int(i) for i in eos_token_id)


def process_logits(logits: torch.Tensor, temperature=1.0, eos_token_id: int | tuple[int, ...] | None = None,
                   eos_blocked: torch.Tensor | bool = False, top_p: float = 1.0) -> torch.Tensor:
    """The logits of the distribution a token is actually drawn from: logits / temperature, with the
    end-of-sequence token at -inf where it is blocked (completion positions before min_new_tokens),
    then, for top_p < 1, every token outside the nucleus at -inf (`nucleus`: its softmax is the
    nucleus distribution renormalised). Temperature 0 is greedy decoding: the point mass on the
    argmax (0 there, -inf elsewhere; ties to the lowest id), so its log-probs are 0, the limit of
    top_p -> 0 and of temperature -> 0.

    Every log-prob the project stores or compares (sampler, reference log-probs, trainers' log-ratios,
    the KL in jobs/evaluate) goes through this one transform, so both sides of a KL or a log-ratio
    describe the same sampling process (docs/algorithms.md, "What KL(pi || pi_0) measures").

    logits: (..., V). temperature: a float >= 0, or a tensor > 0 broadcastable to logits[..., :1]
    (e.g. (B, 1, 1)). eos_token_id: an end id, several (blocked together), or None. eos_blocked: a bool
    or a bool tensor of logits.shape[:-1]. top_p: in (0, 1].
    Returns a new tensor, or `logits` itself when there is nothing to change.
    """
    ends = end_ids(eos_token_id)
    blocked = bool(ends) and (eos_blocked.any().item() if torch.is_tensor(eos_blocked) else eos_blocked)
    greedy = not torch.is_tensor(temperature) and temperature == 0
    if not blocked and not torch.is_tensor(temperature) and temperature == 1.0 and top_p >= 1.0:
        return logits
    out = logits.clone() if greedy else logits / temperature
    for end in ends if blocked else ():
        col = out[..., end]  # a view: the in-place fill below edits `out`
        if torch.is_tensor(eos_blocked):
            col.masked_fill_(eos_blocked, float("-inf"))
        else:
            col.fill_(float("-inf"))
    if greedy:
        return torch.full_like(out, float("-inf")).scatter_(-1, out.argmax(-1, keepdim=True), 0.0)
    return nucleus(out, top_p) if top_p < 1.0 else out


def nucleus(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus (top-p) filtering: `logits` with -inf for every token outside the nucleus of
    softmax(logits). With the tokens ranked by probability (descending; ties by lower id first), a
    token is kept iff the probability of the tokens ranked before it is < top_p: the smallest prefix
    of the ranking whose mass reaches top_p. The most likely token is always kept (top_p -> 0 is the
    argmax). The softmax of the result is the nucleus distribution renormalised."""
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p: expected 0 < top_p <= 1, got {top_p}")
    ranked, order = logits.sort(dim=-1, descending=True, stable=True)
    probs = ranked.softmax(-1)
    before = probs.cumsum(-1) - probs  # the mass ranked before each token (0 exactly for the first)
    drop = torch.empty_like(before, dtype=torch.bool).scatter_(-1, order, before >= top_p)
    return logits.masked_fill(drop, float("-inf"))


def top_tokens(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely tokens of softmax(logits) per row (B, V) and their log-probs: (B, k) ids and
    (B, k) float32 log-probs, descending (-inf where the distribution has fewer than k tokens)."""
    values, ids = torch.log_softmax(logits.float(), -1).topk(k, -1)
    return ids, values


def draw_tokens(logits: torch.Tensor, temperature=1.0, eos_token_id: int | None = None, eos_blocked: bool = False,
                generator: torch.Generator | None = None, chunk_rows: int | None = None,
                block: int = 256, u: torch.Tensor | None = None, top_p: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row of logits (B, V) from softmax(`process_logits`), and its log-prob under that
    distribution: (B,) ids and (B,) float32 (under top_p, the renormalised nucleus distribution's;
    at temperature 0, the argmax with log-prob 0).

    Exact inverse-CDF sampling in two levels: the unnormalised probabilities are summed in blocks of
    `block` tokens, a block is picked by searching the running sum of the block sums, and a token
    inside it by searching that block's own running sum. This replaces a sequential scan over the
    whole vocabulary with a vectorised reduction. One uniform per row is drawn up front (the same stream
    whatever the chunking), or passed as u (B, 1); rows are processed in chunks so the (rows, V)
    temporaries stay small.
    """
    B, V = logits.shape
    nb = -(-V // block)
    if u is None:
        u = torch.rand(B, 1, device=logits.device, generator=generator, dtype=torch.float32)
    chunk = chunk_rows or max(1, (1 << 22) // V)  # about 16 MB of float32 per temporary
    tokens = torch.empty(B, dtype=torch.long, device=logits.device)
    logps = torch.empty(B, dtype=torch.float32, device=logits.device)
    for i in range(0, B, chunk):
        scaled = process_logits(logits[i : i + chunk], temperature, eos_token_id, eos_blocked, top_p)  # (c, V)
        c = scaled.shape[0]
        top = scaled.amax(-1, keepdim=True)  # (c, 1)
        probs = scaled.new_empty(c, nb * block)  # unnormalised; the padding past V has probability 0
        probs[:, V:] = 0.0
        torch.sub(scaled, top, out=probs[:, :V]).exp_()
        blocks = probs.view(c, nb, block)
        block_cdf = blocks.sum(-1).cumsum_(-1)  # (c, nb)
        total = block_cdf[:, -1:]  # (c, 1)
        target = u[i : i + chunk] * total
        b = torch.searchsorted(block_cdf, target, right=True)  # first block whose running sum exceeds target
        last_block = torch.where(block_cdf > torch.cat([torch.zeros_like(total), block_cdf[:, :-1]], 1),
                                 torch.arange(nb, device=b.device), 0).amax(-1, keepdim=True)
        b = torch.minimum(b, last_block)  # u * total rounding up to total must not land past the last mass
        inside = blocks.gather(1, b[:, :, None].expand(c, 1, block))[:, 0]  # (c, block)
        before = torch.where(b > 0, block_cdf.gather(1, (b - 1).clamp(min=0)), 0.0)
        j = torch.searchsorted(inside.cumsum(-1), target - before, right=True)
        last = torch.where(inside > 0, torch.arange(block, device=b.device), 0).amax(-1, keepdim=True)
        tok = b * block + torch.minimum(j, last)  # (c, 1), never a token of probability 0
        tokens[i : i + chunk] = tok[:, 0]
        logps[i : i + chunk] = (scaled.gather(-1, tok) - top - total.log())[:, 0]
    return tokens, logps


@torch.no_grad()
def draw_from_hidden(weight: torch.Tensor, bias: torch.Tensor | None, hidden: torch.Tensor, u: torch.Tensor,
                     temperature=1.0, eos_token_id: int | None = None, eos_blocked: bool = False, block: int = 256,
                     chunk: int = 4096, buffer: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`draw_tokens` fused with the LM head: one token per row from softmax((hidden @ W^T + b) / T)
    without materialising the (B, V) logits. Exact, and on a CPU much cheaper for a large vocabulary.

    The head runs over chunks of the vocabulary (W_c @ h^T, (chunk, B), written into `buffer`, a
    (ceil(V/block)*block, B) tensor whose padding rows are 0); while a chunk is in cache it is
    exponentiated against its own maximum m_c and summed in blocks. The block sums are then rescaled
    by exp(m_c - m) to the global maximum m, a block is picked by inverse CDF over them, and a token
    inside it from its stored values. The chosen token's logit is recomputed as one dot product per row
    for its log-prob: logit/T - m - log(sum exp(logit/T - m)).
    weight (V, d), bias (V,) or None, hidden (B, d), u (B, 1) uniforms. Returns (B,) ids and log-probs.
    """
    V, B = weight.shape[0], hidden.shape[0]
    ends = end_ids(eos_token_id)
    nb = -(-V // block)
    chunk = max(block, chunk // block * block)  # chunks hold whole blocks
    if buffer is None or buffer.shape != (nb * block, B):
        buffer = hidden.new_zeros(nb * block, B)
    hT = hidden.t()
    sums = hidden.new_empty(nb, B)
    maxes, spans = [], []
    for c0 in range(0, V, chunk):
        c1 = min(c0 + chunk, V)
        x = torch.mm(weight[c0:c1], hT, out=buffer[c0:c1])  # (c, B) logits of this chunk
        if bias is not None:
            x.add_(bias[c0:c1, None])
        if temperature != 1.0:
            x.div_(temperature)
        for end in ends if eos_blocked else ():
            if c0 <= end < c1:
                x[end - c0].fill_(float("-inf"))
        m = x.amax(0)  # (B,)
        x.sub_(m.nan_to_num(neginf=0.0)).exp_()
        b0, b1 = c0 // block, -(-c1 // block)
        sums[b0:b1] = buffer[c0 : b1 * block].view(b1 - b0, block, B).sum(1)  # the padding rows add 0
        maxes.append(m)
        spans.append(b1 - b0)
    M = torch.stack(maxes)  # (chunks, B)
    top = M.amax(0)  # (B,)
    scale = torch.where(torch.isneginf(M), 0.0, torch.exp(M - top))  # a chunk with no mass scales to 0
    block_scale = scale.repeat_interleave(torch.tensor(spans, device=scale.device), 0)  # (nb, B)
    block_cdf = (sums * block_scale).cumsum_(0)  # (nb, B)
    total = block_cdf[-1]  # (B,)
    target = u[:, 0] * total
    blocks = torch.arange(nb, device=hidden.device)[:, None]
    b = (block_cdf <= target).sum(0)  # the first block whose running sum exceeds the target
    has_mass = torch.cat([block_cdf[:1], block_cdf[1:] - block_cdf[:-1]]) > 0
    b = torch.minimum(b, torch.where(has_mass, blocks, 0).amax(0))  # rounding must not land past the last mass
    offsets = torch.arange(block, device=hidden.device)[:, None]
    inside = buffer.gather(0, b[None] * block + offsets) * block_scale.gather(0, b[None])  # (block, B)
    before = torch.where(b > 0, block_cdf.gather(0, (b - 1).clamp(min=0)[None])[0], 0.0)
    j = (inside.cumsum(0) <= (target - before)[None]).sum(0)
    j = torch.minimum(j, torch.where(inside > 0, offsets, 0).amax(0))  # never a token of probability 0
    tok = b * block + j
    logit = (weight[tok] * hidden).sum(-1)
    if bias is not None:
        logit = logit + bias[tok]
    return tok, logit / temperature - top - total.log()
