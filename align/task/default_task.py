"""The embedded default task: a tiny GPT-2 pretrained on generated movie reviews, built offline and cached.

Real users point Sweetspot at a Hugging Face causal LM; the default task needs no download and still
means something. `ensure_default_task()` generates a review corpus (align.task.corpus), trains a byte-level
BPE tokenizer and a small GPT-2 (pi_0) on it, measures pi_0 (per-token loss on held-out reviews, and
the fluency of its samples against a random-weight model of the same shape), and writes sentence
openings as prompts. The gold reward is VADER compound of a completion (the corpus is mixed, so there
is room to steer). Everything lands in `<cache>/default_task-<config hash>/`:

    policy/                 model + tokenizer in HF format (safetensors): AutoModelForCausalLM /
                            AutoTokenizer.from_pretrained(policy_dir) load it like any real model
    prompts/{train,validation,test}.jsonl   {"prompt": ...} per line, for datasets.load_dataset("json")
    heldout.txt             held-out reviews, one a line (the held-out loss is measured on these)
    words.txt               corpus vocabulary (see align.task.corpus.words), one a line
    report.json, config.json, probe.json (the built model's logits on one text, to check a reload)

The tokenizer has one special token, "<|endoftext|>", which is bos, eos and pad; training text is
`<|endoftext|>review<|endoftext|>review...`, and the tokenizer PREPENDS it to every encoded text (a
template post-processor, like Llama's BOS), so a prompt is conditioned as the start of a review. Pass
add_special_tokens=False to encode a completion on its own. Padding side is left, for generation.

The cache root is `cfg.cache_dir`, else $SWEETSPOT_CACHE, else `.sweetspot_cache/` under the output root
(align.runtime.paths: a submitted Ray job's outputs outlive it), else at the repo root.
A build goes into a temporary directory next to its target and is renamed at the end (under a file
lock), so a killed build never leaves a half-done task and concurrent callers build once.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from tqdm.auto import tqdm

from align.runtime.config import require, to_dict
from align.task.corpus import fluency, generate_reviews, words

logger = logging.getLogger(__name__)

# Bump when a code change alters what a build produces: it is part of the cache key.
BUILD_VERSION = 3
SPLITS = ("train", "validation", "test")
EOT = "<|endoftext|>"


@dataclass
class DefaultTaskConfig:
    """Every knob of the default-task build (YAML: configs/build_task.yaml)."""

    cache_dir: str | None = None  # None: $SWEETSPOT_CACHE, else <repo>/.sweetspot_cache
    seed: int = 0  # corpus, tokenizer, init, data order and sampling all derive from it
    num_sentences: int = 100_000  # pretraining corpus size, in generated sentences
    heldout_sentences: int = 4_000  # separately generated; source of the held-out loss and of the prompts
    vocab_size: int = 1024  # byte-level BPE vocabulary, including the one special token
    n_layer: int = 4
    n_embd: int = 128
    n_head: int = 4
    n_positions: int = 128  # context length; pretraining packs reviews into blocks of this many tokens
    train_steps: int = 400  # pretraining budget in optimizer steps (not wall clock: reproducible)
    batch_size: int = 16  # blocks per step
    lr: float = 4e-3  # AdamW peak learning rate (8e-3 trained markedly slower)
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup: int = 20  # linear warm-up steps
    weight_decay: float = 0.01  # on matrices only
    train_prompts: int = 300  # prompt split sizes; prompts are unique openings of held-out reviews
    validation_prompts: int = 50
    test_prompts: int = 50
    prompt_min_words: int = 2
    prompt_max_words: int = 5
    fluency_prompts: int = 64  # fluency report: this many train-split prompts ...
    fluency_new_tokens: int = 24  # ... sampled to this many new tokens (top_k=0, temperature 1)
    fluency_min_new_tokens: int = 16  # end-of-text is suppressed before this many
    # Torch threads during the build; 0: auto_threads(). Not in the cache key: a build is bit-identical
    # at a fixed thread count, and other counts change only float rounding (same loss and fluency).
    num_threads: int = 0

    def __post_init__(self):
        require(self.cache_dir is None or bool(self.cache_dir), "cache_dir", "null or a non-empty path",
                self.cache_dir)
        require(self.seed >= 0, "seed", "an integer >= 0", self.seed)
        require(self.num_sentences >= 1000, "num_sentences", "an integer >= 1000", self.num_sentences)
        require(self.heldout_sentences >= 100, "heldout_sentences", "an integer >= 100", self.heldout_sentences)
        require(300 <= self.vocab_size <= 65536, "vocab_size", "an integer in [300, 65536] (257 byte-level "
                "symbols + merges)", self.vocab_size)
        require(1 <= self.n_layer <= 48, "n_layer", "an integer in [1, 48]", self.n_layer)
        require(self.n_head >= 1, "n_head", "an integer >= 1", self.n_head)
        require(self.n_embd >= 8 and self.n_embd % self.n_head == 0, "n_embd",
                f"an integer >= 8 divisible by n_head={self.n_head}", self.n_embd)
        require(16 <= self.n_positions <= 4096, "n_positions", "an integer in [16, 4096]", self.n_positions)
        require(self.n_positions >= self.fluency_new_tokens + 16, "n_positions",
                f"room for a prompt and fluency_new_tokens={self.fluency_new_tokens} (>= that + 16)",
                self.n_positions)
        require(self.train_steps >= 1, "train_steps", "an integer >= 1", self.train_steps)
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require(0 < self.lr <= 1, "lr", "a number in (0, 1]", self.lr)
        require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", "a number in [0, 1]", self.min_lr_ratio)
        require(0 <= self.warmup < self.train_steps, "warmup", f"an integer in [0, train_steps={self.train_steps})",
                self.warmup)
        require(0 <= self.weight_decay < 1, "weight_decay", "a number in [0, 1)", self.weight_decay)
        for split in SPLITS:
            n = getattr(self, f"{split}_prompts")
            require(n >= 1, f"{split}_prompts", "an integer >= 1", n)
        require(self.prompt_min_words >= 1, "prompt_min_words", "an integer >= 1", self.prompt_min_words)
        require(self.prompt_max_words >= self.prompt_min_words, "prompt_max_words",
                f"an integer >= prompt_min_words={self.prompt_min_words}", self.prompt_max_words)
        require(1 <= self.fluency_prompts <= self.train_prompts, "fluency_prompts",
                f"an integer in [1, train_prompts={self.train_prompts}]", self.fluency_prompts)
        require(self.fluency_new_tokens >= 1, "fluency_new_tokens", "an integer >= 1", self.fluency_new_tokens)
        require(0 <= self.fluency_min_new_tokens <= self.fluency_new_tokens, "fluency_min_new_tokens",
                f"an integer in [0, fluency_new_tokens={self.fluency_new_tokens}]", self.fluency_min_new_tokens)
        require(self.num_threads >= 0, "num_threads", "an integer >= 0 (0: all cores)", self.num_threads)

    @classmethod
    def small(cls, **overrides) -> "DefaultTaskConfig":
        """A reduced build for tests: 2 layers x 128, 300 steps of 24 x 64 tokens, about 30 s on one thread.

        Its bars, checked in tests/test_default_task.py: held-out loss < 1.6 nats/token (it measured
        1.41; uniform is 6.93) and fluency >= 0.95 (measured 0.985; random weights 0.26). One thread,
        because tests share the machine: at load 3-5 on 2 cores, 2 OpenMP threads ran 3-5x slower than 1.
        """
        kw = dict(num_sentences=30_000, heldout_sentences=1_500, n_layer=2, n_embd=128, n_head=4,
                  n_positions=64, train_steps=300, batch_size=24, lr=4e-3, warmup=20,
                  train_prompts=60, validation_prompts=20, test_prompts=20, fluency_prompts=48, num_threads=1)
        kw.update(overrides)
        return cls(**kw)

    @property
    def num_prompts(self) -> int:
        return self.train_prompts + self.validation_prompts + self.test_prompts


def config_hash(cfg: DefaultTaskConfig) -> str:
    """Short hash of everything that changes what a build produces (not cache_dir or num_threads)."""
    d = to_dict(cfg)
    d.pop("cache_dir"), d.pop("num_threads")
    d["build_version"] = BUILD_VERSION
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:10]


def cache_root(cfg: DefaultTaskConfig) -> Path:
    """cfg.cache_dir, else the project cache (align.runtime.paths.cache_dir)."""
    from align.runtime.paths import cache_dir

    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else cache_dir()


@dataclass
class DefaultTask:
    """A built default task on disk (see the module docstring for the layout)."""

    root: Path
    policy_dir: Path
    prompt_files: dict[str, Path]  # split -> JSONL; datasets.load_dataset("json", data_files=...)
    report: dict = field(default_factory=dict)
    reused: bool = False  # True when ensure_default_task found it already built

    @classmethod
    def load(cls, root: str | Path, reused: bool = False) -> "DefaultTask":
        root = Path(root)
        return cls(root=root, policy_dir=root / "policy",
                   prompt_files={s: root / "prompts" / f"{s}.jsonl" for s in SPLITS},
                   report=json.loads((root / "report.json").read_text()), reused=reused)

    def prompts(self, split: str) -> list[str]:
        if split not in self.prompt_files:
            raise KeyError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
        with open(self.prompt_files[split]) as f:
            return [json.loads(line)["prompt"] for line in f if line.strip()]

    def vocabulary(self) -> set[str]:
        """Corpus words (align.task.corpus.words form): what align.task.corpus.fluency counts against."""
        return set((self.root / "words.txt").read_text().split())

    def heldout_reviews(self) -> list[str]:
        return (self.root / "heldout.txt").read_text().splitlines()


def ensure_default_task(cfg: DefaultTaskConfig | None = None, progress: bool = True) -> DefaultTask:
    """The default task for `cfg` (default config if None): loaded from the cache, or built there first."""
    cfg = cfg or DefaultTaskConfig()
    base = cache_root(cfg)
    root = base / f"default_task-{config_hash(cfg)}"
    if (root / "report.json").is_file():
        logger.info("default task: reusing cached build at %s", root)
        return DefaultTask.load(root, reused=True)
    base.mkdir(parents=True, exist_ok=True)
    with open(base / f"{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be building the same task
        if (root / "report.json").is_file():
            logger.info("default task: reusing build at %s (finished by another process)", root)
            return DefaultTask.load(root, reused=True)
        for stale in base.glob(f".{root.name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        logger.info("default task: no build at %s; building (takes a few minutes once)", root)
        return build_default_task(cfg, root, progress)


def auto_threads() -> int:
    """All available cores, less the 1-minute load average in excess of cores - 1.

    OpenMP threads spin-wait for each other, so an oversubscribed machine punishes extra threads: on 2
    cores at load 4-5 a training step took 3 s with 2 threads against 0.55 s with 1; at load 1.5 the
    full build took 60 s with 2 threads against 91-96 s with 1.
    """
    cores = len(os.sched_getaffinity(0))
    excess = math.floor(max(0.0, os.getloadavg()[0] - cores + 1))
    return max(1, min(cores, cores - excess))


@contextmanager
def _threads(n: int) -> Iterator[int]:
    before = torch.get_num_threads()
    n = n or auto_threads()
    torch.set_num_threads(n)
    try:
        yield n
    finally:
        torch.set_num_threads(before)


def _seed(cfg: DefaultTaskConfig, purpose: str) -> int:
    """Independent seeds per purpose, derived from cfg.seed."""
    return int.from_bytes(hashlib.sha256(f"{cfg.seed}/{purpose}".encode()).digest()[:4], "little")


def build_default_task(cfg: DefaultTaskConfig, root: str | Path, progress: bool = True) -> DefaultTask:
    """Build the task into `root` (which must not exist): into a sibling temp dir, renamed at the end."""
    root = Path(root)
    if root.exists():
        raise FileExistsError(f"{root} exists; remove it or call ensure_default_task")
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        # fork_rng: the build seeds torch's global RNG; the caller's random state is left as it was.
        with _threads(cfg.num_threads) as n_threads, torch.random.fork_rng(devices=[]):
            report = _build(cfg, tmp, progress, n_threads)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("default task: built %s in %.1f s", root, report["build_seconds"])
    return DefaultTask.load(root)


def _build(cfg: DefaultTaskConfig, out: Path, progress: bool, n_threads: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str, since: float) -> float:
        timings[name] = round(time.perf_counter() - since, 2)
        return time.perf_counter()

    t = t0
    train = [" ".join(r) for r in generate_reviews(cfg.num_sentences, _seed(cfg, "corpus"))]
    seen = set(train)
    heldout = [r for r in (" ".join(s) for s in generate_reviews(cfg.heldout_sentences, _seed(cfg, "heldout")))
               if r not in seen]  # exact repeats of training reviews would flatter the held-out loss
    vocab = sorted({w for r in train for w in words(r)})
    logger.info("default task: generated %d training reviews (%d sentences, %d words, %d distinct) and %d "
                "held-out reviews", len(train), cfg.num_sentences, sum(len(r.split()) for r in train),
                len(vocab), len(heldout))
    prompts = _prompts(cfg, heldout)
    t = lap("corpus", t)

    tok = train_tokenizer(train, cfg.vocab_size, cfg.n_positions)
    t = lap("tokenizer", t)
    stream = torch.tensor([i for e in tok.backend_tokenizer.encode_batch(train) for i in e.ids], dtype=torch.long)
    held = torch.tensor([i for e in tok.backend_tokenizer.encode_batch(heldout) for i in e.ids], dtype=torch.long)
    logger.info("default task: BPE tokenizer with %d tokens; %d training tokens (%.2f per word), %d held-out",
                len(tok), len(stream), len(stream) / sum(len(r.split()) for r in train), len(held))
    t = lap("tokenize", t)

    model_cfg = GPT2Config(vocab_size=len(tok), n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                           n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                           attn_pdrop=0.0, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                           pad_token_id=tok.pad_token_id)
    torch.manual_seed(_seed(cfg, "init"))
    model = GPT2LMHeadModel(model_cfg)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("default task: pretraining a GPT-2 of %d layers x %d (%d parameters) for %d steps of %d x %d "
                "tokens on %d threads", cfg.n_layer, cfg.n_embd, num_params, cfg.train_steps, cfg.batch_size,
                cfg.n_positions, n_threads)
    train_loss = pretrain(model, stream, cfg, progress)
    t = lap("pretrain", t)
    model.eval()
    heldout_loss = heldout_loss_per_token(model, held, cfg.n_positions)
    logger.info("default task: held-out loss %.3f nats/token (train %.3f; uniform would be %.2f)",
                heldout_loss, train_loss, math.log(len(tok)))
    with torch.no_grad():  # a fingerprint of the in-memory model, to compare a reloaded one against
        probe_ids = tok(heldout[0])["input_ids"]
        probe_logits = model(input_ids=torch.tensor([probe_ids])).logits[0, :, :16].tolist()
    t = lap("heldout_eval", t)

    fl_prompts = prompts["train"][: cfg.fluency_prompts]
    vocab_set = set(vocab)
    samples = sample_completions(model, tok, fl_prompts, cfg.fluency_new_tokens, cfg.fluency_min_new_tokens,
                                 seed=_seed(cfg, "sample"), progress=progress)
    torch.manual_seed(_seed(cfg, "random-init"))
    random_model = GPT2LMHeadModel(model_cfg).eval()
    random_samples = sample_completions(random_model, tok, fl_prompts, cfg.fluency_new_tokens,
                                        cfg.fluency_min_new_tokens, seed=_seed(cfg, "sample"), progress=progress)
    flu, flu_random = fluency(samples, vocab_set), fluency(random_samples, vocab_set)
    logger.info("default task: fluency of pi_0 samples %.3f (random weights %.3f)", flu, flu_random)
    vader = SentimentIntensityAnalyzer()
    gold_heldout = [vader.polarity_scores(r)["compound"] for r in heldout]
    gold_pi0 = [vader.polarity_scores(c)["compound"] for c in samples]
    t = lap("fluency", t)

    policy = out / "policy"
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(policy)
    tok.save_pretrained(policy)
    (out / "prompts").mkdir()
    for split, ps in prompts.items():
        (out / "prompts" / f"{split}.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ps))
    (out / "heldout.txt").write_text("\n".join(heldout) + "\n")
    (out / "words.txt").write_text("\n".join(vocab) + "\n")
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")
    # logits[:, :16] of the in-memory model on the first held-out review, to check a reloaded model against.
    (out / "probe.json").write_text(json.dumps({"text": heldout[0], "input_ids": probe_ids, "logits": probe_logits}))
    lap("save", t)

    report = {
        "config_hash": config_hash(cfg),
        "heldout_loss_per_token": round(heldout_loss, 4),
        "train_loss_last_steps": round(train_loss, 4),
        "uniform_loss_per_token": round(math.log(len(tok)), 4),
        "fluency": round(flu, 4),
        "random_init_fluency": round(flu_random, 4),
        "num_params": num_params,
        "vocab_size": len(tok),
        "corpus_words": len(vocab),
        "train_reviews": len(train),
        "train_tokens": len(stream),
        "heldout_reviews": len(heldout),
        "heldout_tokens": len(held),
        "num_prompts": {s: len(p) for s, p in prompts.items()},
        # Gold reward (VADER compound): held-out reviews and the pi_0 completions sampled above.
        "heldout_compound": {"mean": round(sum(gold_heldout) / len(gold_heldout), 4),
                             "positive_share": round(sum(c > 0.05 for c in gold_heldout) / len(gold_heldout), 4),
                             "negative_share": round(sum(c < -0.05 for c in gold_heldout) / len(gold_heldout), 4)},
        "pi0_compound_mean": round(sum(gold_pi0) / len(gold_pi0), 4),
        "examples": [{"prompt": p, "completion": c} for p, c in zip(fl_prompts[:5], samples[:5])],
        "threads": n_threads,
        "timings_s": timings,
        "build_seconds": round(time.perf_counter() - t0, 1),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _prompts(cfg: DefaultTaskConfig, heldout: list[str]) -> dict[str, list[str]]:
    """Unique openings (prompt_min_words..prompt_max_words words) of held-out reviews, split three ways."""
    rng = random.Random(_seed(cfg, "prompts"))
    order = list(range(len(heldout)))
    rng.shuffle(order)
    out: list[str] = []
    seen: set[str] = set()
    for i in order:
        ws = heldout[i].split()
        k = min(rng.randint(cfg.prompt_min_words, cfg.prompt_max_words), len(ws) - 2)  # leave room to go on
        p = " ".join(ws[:k])
        if k >= cfg.prompt_min_words and p not in seen:
            seen.add(p)
            out.append(p)
            if len(out) == cfg.num_prompts:
                break
    if len(out) < cfg.num_prompts:
        raise RuntimeError(f"only {len(out)} unique prompts from {len(heldout)} held-out reviews; raise "
                           f"heldout_sentences or lower the prompt split sizes")
    a, b = cfg.train_prompts, cfg.train_prompts + cfg.validation_prompts
    return {"train": out[:a], "validation": out[a:b], "test": out[b:]}


def train_tokenizer(texts: list[str], vocab_size: int, model_max_length: int):
    """Byte-level BPE trained on `texts`, wrapped as a transformers fast tokenizer (see module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer)
    eot = bpe.token_to_id(EOT)
    bpe.post_processor = processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B",
                                                       special_tokens=[(EOT, eot)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOT, eos_token=EOT, pad_token=EOT,
                                   padding_side="left", model_max_length=model_max_length)


def pretrain(model, stream: torch.Tensor, cfg: DefaultTaskConfig, progress: bool) -> float:
    """AdamW with warm-up and cosine decay on shuffled blocks of `stream`; returns the last steps' mean loss."""
    T, B = cfg.n_positions, cfg.batch_size
    blocks = stream[: len(stream) // T * T].view(-1, T)  # (N, T)
    gen = torch.Generator().manual_seed(_seed(cfg, "data"))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        frac = (step - cfg.warmup) / max(1, cfg.train_steps - cfg.warmup)
        return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))

    model.train()
    order, pos, recent = torch.randperm(len(blocks), generator=gen), 0, []
    bar = tqdm(range(cfg.train_steps), desc="pretrain pi_0", disable=not progress, mininterval=1.0)
    for step in bar:
        if pos + B > len(order):  # next epoch
            order, pos = torch.randperm(len(blocks), generator=gen), 0
        x = blocks[order[pos: pos + B]]  # (B, T)
        pos += B
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-20:]
        bar.set_postfix(loss=f"{recent[-1]:.3f}", refresh=False)
    model.eval()
    return sum(recent) / len(recent)


@torch.no_grad()
def heldout_loss_per_token(model, stream: torch.Tensor, n_positions: int, batch_size: int = 32) -> float:
    """Mean next-token cross-entropy (nats) over `stream` cut into blocks of n_positions tokens."""
    blocks = stream[: max(len(stream) // n_positions, 1) * n_positions].view(-1, min(len(stream), n_positions))
    total, count = 0.0, 0
    for i in range(0, len(blocks), batch_size):
        x = blocks[i: i + batch_size]  # (b, T)
        logits = model(input_ids=x).logits[:, :-1]  # (b, T-1, V)
        total += torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), x[:, 1:].flatten(),
                                                   reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


@torch.no_grad()
def sample_completions(model, tokenizer, prompts: list[str], max_new_tokens: int, min_new_tokens: int,
                       seed: int, batch_size: int = 64, progress: bool = False) -> list[str]:
    """Plain HF `generate` ancestral samples (top_k=0, temperature 1), decoded without special tokens.

    Prompts are grouped by token length so that no row is padded (exact and simple; a report, not the
    fast path). The global torch RNG is forked, so callers' random state is untouched.
    """
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    out = [""] * len(prompts)
    chunks = [idx[j: j + batch_size] for _, idx in sorted(by_len.items()) for j in range(0, len(idx), batch_size)]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for idx in tqdm(chunks, desc="sample", disable=not progress, leave=False):
            x = torch.tensor([encoded[i] for i in idx])  # (b, P)
            y = model.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=True, top_k=0,
                               temperature=1.0, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
                               pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
            for i, row in zip(idx, y[:, x.shape[1]:]):
                out[i] = tokenizer.decode(row, skip_special_tokens=True)
    return out


def default_policy_dir() -> str:
    """The default task's pi_0 directory, built on first use: what the model name "default" resolves to
    (align.engine.models.NAMED_MODELS)."""
    return str(ensure_default_task().policy_dir)
