"""Shared fixtures: one Ray per test session, tiny models saved to disk, the small default task."""
from __future__ import annotations

import os

# Quiet, offline, and no token-auth file under ~/.ray; set before ray/transformers are imported.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

TINY_TEXTS = [
    "the movie was great and the acting was wonderful .",
    "the plot was awful and the pacing was terrible .",
    "a good film with a bad ending .",
    "the story is fine , the music is lovely , the cast is weak .",
]


def save_tiny_lm(path, vocab_size: int = 64, seed: int = 0):
    """A random 2-layer GPT-2 and a word-level tokenizer, saved in HF format at `path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TINY_TEXTS * 4, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<unk>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=fast.vocab_size, n_layer=2, n_embd=32, n_head=2, n_positions=128,
                     bos_token_id=fast.eos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory):
    return save_tiny_lm(tmp_path_factory.mktemp("tiny_lm"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray for the whole session: small object store, quiet logs."""
    import ray

    ray.init(num_cpus=4, object_store_memory=100 * 1024**2, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR", configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def small_task():
    """The default task at its reduced test size, cached in the repo's .sweetspot_cache across runs."""
    from align.default_task import DefaultTaskConfig, ensure_default_task

    return ensure_default_task(DefaultTaskConfig.small(), progress=False)


@pytest.fixture(scope="session")
def small_pairs(ray_session, small_task, tmp_path_factory):
    """jobs.make_pairs on the small default task: best/worst and random pair datasets, train and test."""
    from align.config import load_config
    from jobs.make_pairs import MakePairsConfig, run

    out = tmp_path_factory.mktemp("pairs")
    cfg = load_config(MakePairsConfig, "configs/make_pairs.yaml", [
        f"bon.model.path={small_task.policy_dir}", f"bon.prompts.source={small_task.root / 'prompts'}",
        "bon.prompts.limit=16", "bon.prompts.repeats=1", "bon.sampling.n=4", "bon.sampling.max_new_tokens=16",
        "bon.pool.num_actors=2", "bon.pool.batch_size=8", f"output_dir={out}",
    ])
    run(cfg)
    return out
