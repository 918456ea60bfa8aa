"""Prefix-shared pairs (one row per pair, the prompt computed once, the LM head only where the loss
needs it) against the two-sequence layout: the same log-probs, DPO loss and gradients to 1e-5, for
GPT-2 and Llama, with prompts and completions of different lengths, temperature and early-EOS blocking."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from align.objectives.base import pair_logps
from align.math.losses import dpo_loss
from align.data.pairs import collate_packed_pairs, collate_pairs

V, EOS = 53, 1


def gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_layer=2, n_embd=32, n_head=4, n_positions=64,
                                      bos_token_id=EOS, eos_token_id=EOS, attn_pdrop=0, resid_pdrop=0, embd_pdrop=0))


def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=0))


def examples():
    g = torch.Generator().manual_seed(3)

    def toks(n):
        return torch.randint(2, V, (n,), generator=g).tolist()

    rows = []
    for lp, lc, lr, temp, min_new in ((3, 5, 2, 1.0, 0), (6, 1, 7, 0.7, 3), (1, 4, 4, 1.3, 2)):
        p = toks(lp)
        c, r = toks(lc), toks(lr - 1) + [EOS]  # a rejected side that ends with EOS
        rows.append({"chosen_input_ids": p + c, "chosen_prompt_len": lp, "rejected_input_ids": p + r,
                     "rejected_prompt_len": lp, "temperature": temp, "min_new_tokens": min_new})
    return rows


@pytest.mark.parametrize("make", [gpt2, llama], ids=["gpt2", "llama-gqa"])
def test_packed_pairs_equal_two_sequences(make):
    model, data = make().train(), examples()
    packed, plain = collate_packed_pairs(data, 0), collate_pairs(data, 0)
    assert packed["input_ids"].shape[0] == 3 and plain["input_ids"].shape[0] == 6
    assert int(packed["num_tokens"]) == int(plain["num_tokens"])  # throughput counts the same tokens
    results = []
    for batch in (packed, plain):
        model.zero_grad()
        c, r, lengths = pair_logps(model, batch, EOS)
        loss, _ = dpo_loss(c, r, torch.zeros(3), torch.full((3,), -0.5), beta=0.1)
        loss.backward()
        results.append((c.detach(), r.detach(), lengths, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (c1, r1, l1, loss1, g1), (c2, r2, l2, loss2, g2) = results
    torch.testing.assert_close(c1, c2, atol=1e-5, rtol=0)
    torch.testing.assert_close(r1, r2, atol=1e-5, rtol=0)
    assert l1.tolist() == l2.tolist() == [5, 1, 4]
    torch.testing.assert_close(loss1, loss2, atol=1e-5, rtol=0)
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=1e-4, msg=name)


def test_packed_layout_by_hand():
    # Prompt [5, 6] (P = 2 after padding the other prompt to it), chosen [7], rejected [8, 9].
    data = [{"chosen_input_ids": [5, 6, 7], "chosen_prompt_len": 2, "rejected_input_ids": [5, 6, 8, 9],
             "rejected_prompt_len": 2, "min_new_tokens": 1},
            {"chosen_input_ids": [4, 3], "chosen_prompt_len": 1, "rejected_input_ids": [4, 2], "rejected_prompt_len": 1}]
    b = collate_packed_pairs(data, 0)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [0, 4, 3, 2, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 2, 3], [0, 0, 1, 1, 0]]
    assert int(b["logits_to_keep"]) == 4  # columns 1..4
    # Row 0: chosen 7 is predicted at column 1 (kept 0); rejected 8 at column 1 too, 9 at column 3 (kept 2).
    assert b["chosen_src"][0].tolist() == [0] and b["rejected_src"][0].tolist() == [0, 2]
    assert b["rejected_targets"][0].tolist() == [8, 9] and b["rejected_mask"][1].tolist() == [True, False]
    assert b["blocked"][0].tolist() == [True, False, False, False]  # min_new_tokens 1: only the first token
    allowed = b["attention_4d"][0, 0].int().tolist()
    assert allowed[3] == [1, 1, 0, 1, 0]  # rejected 8 sees the prompt and itself, not chosen 7
    assert allowed[4] == [1, 1, 0, 1, 1]
    assert b["attention_4d"][1, 0, 0].int().tolist() == [1, 0, 0, 0, 0]  # padding attends to itself only
    with pytest.raises(ValueError, match="share their prompt"):
        collate_packed_pairs([{**data[0], "rejected_input_ids": [9, 6, 8, 9]}], 0)
