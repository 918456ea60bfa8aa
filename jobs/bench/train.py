"""Training throughput: the project's DPO step with pairs as two sequences and with prefix sharing,
against TRL's DPOTrainer at equal settings, timed in one run.

    python -m jobs.bench.train --config configs/bench/train.yaml                         # project only
    make bench-env && python -m jobs.bench.train --config configs/bench/train.yaml trl_python=.venv-bench/bin/python
    python -m jobs.bench.train --config configs/bench/train.yaml quick=true              # smoke run

All methods train the same random-weight GPT-2 (saved once, loaded by each) on the same pairs of
random token ids (prompt_len + completion_len per side, the completion ending in EOS), fp32, the same
threads, dropout off, reference log-probs precomputed (untimed), AdamW, no gradient clipping and no
gradient checkpointing. Each method runs in a fresh process; the first `warmup_steps` are not timed.

- two_sequences: the trainer's per-step work (collate, objective, backward, optimizer step) with
  chosen and rejected as 2B separate rows (`align.data.pairs.collate_pairs`);
- prefix_sharing: the same with one row per pair, the prompt computed once and the LM head run only
  on completion positions (`align.data.pairs.collate_packed_pairs`, the trainers' default);
- trl: TRL's DPOTrainer (`jobs/bench/train_trl.py`), run by `trl_python`, an interpreter of an
  environment with TRL installed (`make bench-env`); TRL is never a dependency of the project.

The project's rows leave out the DeepSpeed engine and Ray Train around the step: on one CPU worker
they add an optimizer wrapper and, since ray.train.report is only called with checkpoints, nothing
per step. Tokens are the real (non-pad) tokens of prompt + completion on both sides, as TRL sees them.
Writes results.json, results.md and config.yaml.
"""
from __future__ import annotations

import json
import logging
import statistics
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from multiprocessing import get_context
from pathlib import Path

import torch

from align.runtime.config import OutputPath, require, run_job

log = logging.getLogger("sweetspot.bench_train")

EOS = 0  # id of "<eos>" in the word-level tokenizer below


@dataclass
class BenchTrainConfig:
    n_layer: int = 4
    n_embd: int = 256
    n_head: int = 4
    vocab_size: int = 1024
    pairs_per_step: int = 8
    prompt_len: int = 32
    completion_len: int = 32  # per side, EOS included
    steps: int = 20  # timed steps per method
    warmup_steps: int = 3
    num_threads: int = 1
    lr: float = 1e-6
    beta: float = 0.1
    methods: list[str] = field(default_factory=lambda: ["two_sequences", "prefix_sharing", "trl"])
    trl_python: str | None = None  # an interpreter with TRL installed (make bench-env); null skips TRL
    quick: bool = False  # a 1x32 model, vocab 512, 2 pairs of 4 + 4 tokens, 2 steps
    seed: int = 0
    output_dir: OutputPath = "outputs/bench_train"

    def __post_init__(self):
        require(self.n_layer >= 1 and self.n_embd % self.n_head == 0, "n_embd", f"a multiple of n_head ({self.n_head})", self.n_embd)
        require(self.vocab_size >= 4, "vocab_size", "an integer >= 4", self.vocab_size)
        require(self.pairs_per_step >= 1, "pairs_per_step", "an integer >= 1", self.pairs_per_step)
        require(self.prompt_len >= 1 and self.completion_len >= 2, "completion_len", "an integer >= 2 (with prompt_len >= 1)", self.completion_len)
        require(self.steps >= 1 and self.warmup_steps >= 0, "steps", "an integer >= 1 (warmup_steps >= 0)", self.steps)
        require(self.num_threads >= 1, "num_threads", "an integer >= 1", self.num_threads)
        bad = [m for m in self.methods if m not in ("two_sequences", "prefix_sharing", "trl")]
        require(not bad and len(self.methods) >= 1, "methods", "a non-empty list of two_sequences, prefix_sharing, trl", self.methods)


QUICK = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=512, pairs_per_step=2, prompt_len=4, completion_len=4,
             steps=2, warmup_steps=1)


def make_pairs(cfg: BenchTrainConfig) -> list[dict]:
    """Random token pairs, one step's worth per step: prompt ids, chosen and rejected ids ending in EOS."""
    g = torch.Generator().manual_seed(cfg.seed)
    total = cfg.pairs_per_step * (cfg.steps + cfg.warmup_steps)

    def ids(n):
        return torch.randint(1, cfg.vocab_size, (n,), generator=g).tolist()

    return [{"prompt_ids": ids(cfg.prompt_len), "chosen_ids": ids(cfg.completion_len - 1) + [EOS],
             "rejected_ids": ids(cfg.completion_len - 1) + [EOS]} for _ in range(total)]


def save_model(cfg: BenchTrainConfig, path: Path) -> None:
    """The random GPT-2 and a word-level tokenizer ("t<id>" -> id, "<eos>" -> 0) both sides load."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {"<eos>": EOS, **{f"t{i}": i for i in range(1, cfg.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")
    torch.manual_seed(cfg.seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head,
                                       n_positions=cfg.prompt_len + 2 * cfg.completion_len, bos_token_id=EOS,
                                       eos_token_id=EOS, pad_token_id=EOS))
    model.save_pretrained(path)
    fast.save_pretrained(path)


def text(ids: list[int]) -> str:
    return " ".join("<eos>" if i == EOS else f"t{i}" for i in ids)


def project_run(cfg_dict: dict, model_dir: str, pairs: list[dict], packed: bool) -> dict:
    """Runs in a fresh process: the trainer's per-step work on one CPU; per-step seconds and tokens."""
    from transformers import AutoModelForCausalLM

    from align.objectives.base import reference_logps
    from align.objectives.preference import PreferenceObjective
    from align.data.pairs import collate_packed_pairs, collate_pairs

    cfg = BenchTrainConfig(**cfg_dict)
    torch.set_num_threads(cfg.num_threads)
    from align.engine.models import fuse_gelu

    model = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="sdpa").train()
    fuse_gelu(model)  # as align.engine.models.build_model_for does for the trainers
    for m in model.modules():  # as the trainer (train.disable_dropout) and TRL (disable_dropout) do
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    examples = [{"chosen_input_ids": p["prompt_ids"] + p["chosen_ids"], "chosen_prompt_len": len(p["prompt_ids"]),
                 "rejected_input_ids": p["prompt_ids"] + p["rejected_ids"], "rejected_prompt_len": len(p["prompt_ids"])}
                for p in pairs]
    collate = collate_packed_pairs if packed else collate_pairs
    objective = PreferenceObjective(loss="dpo", beta=cfg.beta)
    k = cfg.pairs_per_step
    with torch.no_grad():  # the frozen reference, precomputed and untimed (as TRL's precompute_ref_log_probs)
        model.eval()
        for i in range(0, len(examples), k):
            c, r = reference_logps(model, collate(examples[i : i + k], EOS), EOS)
            for e, rc, rr in zip(examples[i : i + k], c.tolist(), r.tolist()):
                e["ref_chosen_logps"], e["ref_rejected_logps"] = rc, rr
        model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    seconds, tokens = [], []
    for s in range(cfg.warmup_steps + cfg.steps):
        start = time.perf_counter()
        batch = collate(examples[s * k : (s + 1) * k], EOS)
        loss, _ = objective.compute_loss(model, None, batch, EOS)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if s >= cfg.warmup_steps:
            seconds.append(time.perf_counter() - start)
            tokens.append(int(batch["num_tokens"]))
    return {"seconds": seconds, "tokens": tokens}


def trl_run(cfg: BenchTrainConfig, model_dir: Path, pairs: list[dict], work: Path) -> dict:
    spec = {"model_dir": str(model_dir), "steps": cfg.steps, "warmup_steps": cfg.warmup_steps, "pairs_per_step": cfg.pairs_per_step,
            "num_threads": cfg.num_threads, "lr": cfg.lr, "beta": cfg.beta, "seed": cfg.seed, "output_dir": str(work / "trl"),
            "rows": [{"prompt": text(p["prompt_ids"]), "chosen": " " + text(p["chosen_ids"]), "rejected": " " + text(p["rejected_ids"])}
                     for p in pairs]}
    (work / "spec.json").write_text(json.dumps(spec))
    script = Path(__file__).with_name("train_trl.py")
    done = subprocess.run([cfg.trl_python, str(script), str(work / "spec.json"), str(work / "trl.json")],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"TRL run failed ({cfg.trl_python}):\n{done.stderr[-3000:]}")
    return json.loads((work / "trl.json").read_text())


def run(cfg: BenchTrainConfig) -> dict:
    import dataclasses

    from jobs.bench.common import machine, machine_line, publish

    if cfg.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    pairs = make_pairs(cfg)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_model(cfg, work / "model")
        for m in cfg.methods:
            if m == "trl":
                if not cfg.trl_python:
                    log.warning("trl skipped: set trl_python to an interpreter with TRL installed (make bench-env)")
                    continue
                result = trl_run(cfg, work / "model", pairs, work)
            else:
                with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                    result = pool.submit(project_run, asdict(cfg), str(work / "model"), pairs, m == "prefix_sharing").result()
            total_s, total_t = sum(result["seconds"]), sum(result["tokens"])
            rows.append({"method": m, "steps": len(result["seconds"]), "median_step_s": statistics.median(result["seconds"]),
                         "tokens_per_step": total_t / len(result["tokens"]), "tokens_per_s": total_t / total_s})
            log.info("%-15s %.0f tokens/s (median step %.3f s)", m, rows[-1]["tokens_per_s"], rows[-1]["median_step_s"])
    base = next((r for r in rows if r["method"] == "trl"), rows[0])
    for r in rows:
        r["vs_baseline"] = r["tokens_per_s"] / base["tokens_per_s"]
    env = machine(torch.device("cpu"))
    env["torch_threads"] = cfg.num_threads
    columns = [("method", "method", "{}"), ("tokens/step", "tokens_per_step", "{:.0f}"), ("median step s", "median_step_s", "{:.3f}"),
               ("tokens/s", "tokens_per_s", "{:.0f}"), (f"vs {base['method']}", "vs_baseline", "{:.2f}x")]
    header = (f"DPO training throughput, GPT-2 {cfg.n_layer}x{cfg.n_embd} (vocab {cfg.vocab_size}), {cfg.pairs_per_step} pairs of "
              f"{cfg.prompt_len} + {cfg.completion_len} + {cfg.completion_len} tokens a step, fp32, reference precomputed, "
              f"{cfg.steps} timed steps; {machine_line(env)}.")
    result = {"rows": rows, "env": env}
    publish(cfg, result, header, rows, columns)
    return result


def main(argv=None) -> dict:
    return run_job(BenchTrainConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
