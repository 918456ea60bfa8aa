"""Evaluate a policy against pi_0 as the papers do (docs/algorithms.md, Evaluation): win rate of one policy
sample over one pi_0 sample under the gold reward (ties 1/2), and KL(pi || pi_0) by Monte Carlo,
E_{y ~ pi}[log pi(y|x) - log pi_0(y|x)], with its standard error.

    python -m jobs.evaluate --config configs/evaluate.yaml policy=outputs/bonbon/model
    python -m jobs.evaluate --config configs/evaluate.yaml policy=outputs/vbon/model \
        'compare=[{name: bonbon, path: outputs/bonbon/model}, {name: dpo, path: outputs/dpo/model}]'
    python -m jobs.evaluate --config configs/evaluate.yaml policy=null output_dir=outputs/decoders \
        'decoders=[{name: BoN n=4, kind: bon, n: 4}, {name: DeRa 0.5, kind: dera, lam: 0.5, aligned: outputs/bonbon/model}]'

With `compare` or `decoders`, every policy and decoder is evaluated against the same pi_0 samples and
the run also writes comparison.md/json and pareto.png: gold win rate against KL per row, beside
best-of-n's closed forms for n in `bon_n` (win rate n / (n + 1), KL log n - (n - 1) / n), the reward-KL
front policies are judged against.

A decoder (`DecoderSpec`) aligns pi_0 (the `reference`) at decoding time, with no training, and
produces sampling.n outputs per prompt like a policy, so the same win-rate estimator applies:

    bon      the best of n pi_0 candidates under `selector` (null: the gold judge itself, the oracle
             BoN the closed forms describe). KL: estimated from samples, the mean of log pi_bon/pi_0 =
             log n + (n - 1) log F_x(r) (its reward-level form where rewards tie), F_x from the
             prompt's other candidates ("KL source": sample estimate), beside the closed form
             log n - (n - 1) / n (`kl_closed_form`), an upper bound on a finite space; the closed
             form alone when sampling.n is 1.
    rbon_kl  RBoN-KL (Jinnai et al. 2404.01054): argmax r + beta log pi_0(y|x) over n candidates.
    rbon_wd  RBoN-WD: argmax r - beta * mean cosine cost to the other candidates (sentence embeddings
             from `embedder`). Neither RBoN has a KL estimate here ("-").
    dera     DeRa (Liu et al. 2402.02992): every token from softmax(lam * aligned + (1 - lam) * reference
             logits). KL(pi_lam || pi_0) by Monte Carlo, both log-probs by full forwards under the same
             process, so lam = 0 gives exactly 0.

decoders[i] draws from its own seed stream, `decoder_seed(seed, i)`, apart from the policies' (seed)
and pi_0's reference samples (seed + 10_000).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import torch
import yaml

from align.runtime.config import InputRef, OutputPath, require, run_job, to_dict
from align.runtime.runstate import write_atomic
from align.math.stats import clustered_mean_stderr
from jobs.sections import PromptsConfig, RewardConfig, SamplingConfig

EVAL_CONFIG = "eval_config.yaml"  # the config evaluate's results there were made under
log = logging.getLogger("sweetspot.evaluate")


@dataclass
class NamedPolicy:
    name: str  # the label in the table and the plot
    path: InputRef  # a model directory or HF name


@dataclass
class DecoderSpec:
    """A decoding-time method evaluated as a row of the comparison: sampling.n outputs per prompt from
    pi_0 (the reference), best-of-n and regularized BoN over `n` candidates each, or DeRa."""

    name: str  # the label in the table and the plot
    kind: Literal["bon", "rbon_kl", "rbon_wd", "dera"]
    n: int = 8  # bon / rbon_kl / rbon_wd: pi_0 candidates per output
    beta: float = 0.0  # rbon_kl / rbon_wd: weight of the proximity term (0: plain argmax)
    lam: float = 1.0  # dera: lambda (0: pi_0 itself, 1: the aligned model, > 1 extrapolates)
    aligned: InputRef | None = None  # dera: the aligned model (directory or HF name), same tokenizer as the reference
    selector: RewardConfig | None = None  # bon / rbon_*: the reward ranking the candidates; null: the gold judge
    embedder: str = "minilm"  # rbon_wd: sentence encoder for the cost 1 - cosine similarity

    def __post_init__(self):
        require(bool(self.name), "name", "a non-empty label", self.name)
        require(self.n >= 1, "n", "an integer >= 1", self.n)
        require(math.isfinite(self.beta) and self.beta >= 0, "beta", "a finite number >= 0", self.beta)
        require(math.isfinite(self.lam) and self.lam >= 0, "lam", "a finite number >= 0 (lam > 1 extrapolates)", self.lam)
        require(self.kind != "dera" or bool(self.aligned), "aligned",
                "a model directory or HF name when kind is 'dera'", self.aligned)
        # Knobs another kind would read: set here they would change nothing, silently.
        require(self.beta == 0 or self.kind in ("rbon_kl", "rbon_wd"), "beta", "0 unless kind is rbon_kl or rbon_wd",
                self.beta)
        require(self.aligned is None or self.kind == "dera", "aligned", "null unless kind is 'dera'", self.aligned)
        require(self.selector is None or self.kind != "dera", "selector", "null when kind is 'dera' (nothing is ranked)",
                "a reward")


@dataclass
class EvalConfig:
    policy: InputRef | None = "outputs/bonbon/model"  # the trained policy (directory or HF name); null: only compare / decoders
    policy_name: str | None = None  # its label in the comparison (default: its path)
    compare: list[NamedPolicy] = field(default_factory=list)  # more policies: a comparison table and pareto.png
    decoders: list[DecoderSpec] = field(default_factory=list)  # decoding-time methods as rows of the same table
    bon_n: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64])  # BoN closed forms on the plot
    reference: InputRef = "default"  # pi_0
    reward: RewardConfig = field(default_factory=RewardConfig)  # the gold judge
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(n=4))  # n samples per prompt from each
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    batch_size: int = 32
    device: str = "auto"
    seed: int = 0
    output_dir: OutputPath | None = None  # where metrics.json goes; null = next to the policy
    replace: bool = False  # replace results of another evaluate config there (otherwise refused, naming the keys)

    def __post_init__(self):
        require(self.batch_size >= 1, "batch_size", "an integer >= 1", self.batch_size)
        require(self.policy is None or bool(self.policy), "policy", "a model directory or HF name, or null", self.policy)
        require(self.policy is not None or bool(self.compare) or bool(self.decoders), "policy",
                "a model directory or HF name, or at least one entry in compare or decoders (nothing to evaluate)",
                self.policy)
        require(self.policy is not None or self.output_dir is not None, "output_dir",
                "a directory when policy is null (comparison.md/json and pareto.png go there)", self.output_dir)
        labels = [c.name for c in self.compare] + [d.name for d in self.decoders]
        clash = sorted({d.name for d in self.decoders if labels.count(d.name) > 1})
        require(not clash, "decoders", "names distinct from each other and from compare's names", clash)


def process_of(cfg: EvalConfig, tokenizer) -> dict:
    """The sampling process both models are run as (docs/algorithms.md, "What KL(pi || pi_0) measures")."""
    from align.engine.chat import generation_eos, stop_ids_of

    model_dir = getattr(tokenizer, "name_or_path", None)
    ends = stop_ids_of(tokenizer, generation_eos(model_dir) if model_dir else None) if cfg.sampling.stop_at_eos else ()
    eos = (ends[0] if len(ends) == 1 else list(ends)) if ends else None  # every end-of-turn id (align.engine.chat)
    return {"temperature": cfg.sampling.temperature, "min_new_tokens": cfg.sampling.min_new_tokens if eos is not None else 0,
            "eos_token_id": eos}


class DeraLM:
    """DeRa's process as one model (align.math.dera): logits lam * aligned + (1 - lam) * reference. Called like
    a causal LM (a full forward, for continuation_logprobs); sampling runs both models in NSampler's one
    decode loop with `dera_mix`. torch.lerp is exact at both ends: lam 0 is the reference's logits and
    lam 1 the aligned model's, bit for bit."""

    def __init__(self, reference, aligned, lam: float):
        self.reference, self.aligned, self.lam = reference, aligned, float(lam)

    def __call__(self, **inputs):
        from align.math.dera import dera_logits

        return SimpleNamespace(logits=dera_logits(self.reference(**inputs).logits, self.aligned(**inputs).logits, self.lam))

    def parameters(self):
        return self.reference.parameters()


def draw_batches(model, tokenizer, prompts, cfg: EvalConfig, seed: int, n: int, batch_size: int):
    """Yield (input_ids, attention_mask, Samples) per batch of `batch_size` prompts: n samples per prompt
    from `model` (a causal LM, or a DeraLM) run as the evaluation's process; batch b is seeded seed + b."""
    from align.engine.models import encode_prompts
    from align.engine.sampling import NSampler, sample_n

    device = next(model.parameters()).device
    process = process_of(cfg, tokenizer)
    s_cfg = cfg.sampling
    for b, i in enumerate(range(0, len(prompts), batch_size)):
        ids, mask = encode_prompts(tokenizer, prompts[i : i + batch_size], device)
        gen = torch.Generator(device=device).manual_seed(seed + b)
        if isinstance(model, DeraLM):
            from align.math.dera import dera_mix

            with torch.no_grad():
                s = NSampler([model.reference, model.aligned], ids, mask, n, s_cfg.max_new_tokens, s_cfg.temperature,
                             process["min_new_tokens"], process["eos_token_id"], tokenizer.pad_token_id, gen,
                             mix=dera_mix([model.lam] * (ids.shape[0] * n))).run().samples()
        else:
            s = sample_n(model, ids, mask, n, s_cfg.max_new_tokens, s_cfg.temperature, process["min_new_tokens"],
                         process["eos_token_id"], tokenizer.pad_token_id, gen)
        yield ids, mask, s


def sample_with_logprobs(model, tokenizer, ref_model, prompts, cfg: EvalConfig, seed: int):
    """n samples per prompt from `model` (a causal LM, or a DeraLM), as texts, with log pi(y|x) and
    log pi_0(y|x) per sample, both under the same sampling process and by the same full forward (so
    pi = pi_0 gives exactly 0)."""
    from align.engine.sampling import continuation_logprobs

    n = cfg.sampling.n
    process = process_of(cfg, tokenizer)
    texts, logp, logp_ref = [], [], []
    for ids, mask, s in draw_batches(model, tokenizer, prompts, cfg, seed, n, cfg.batch_size):
        texts += tokenizer.batch_decode(s.completion_ids(), skip_special_tokens=True)
        if ref_model is not None:
            rep_ids, rep_mask = ids.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
            logp.append(continuation_logprobs(model, rep_ids, rep_mask, s.tokens, s.mask, **process).cpu())
            logp_ref.append(continuation_logprobs(ref_model, rep_ids, rep_mask, s.tokens, s.mask, **process).cpu())
    if ref_model is None:
        return texts, None, None
    return texts, torch.cat(logp), torch.cat(logp_ref)


def decoder_seed(seed: int, index: int) -> int:
    """The seed of decoders[index] (its batch b draws with decoder_seed + b): one independent stream
    per decoder, derived from cfg.seed and apart from the policies' (seed + b) and pi_0's (seed + 10_000 + b)."""
    import numpy as np

    state = np.random.SeedSequence([seed % 2**64, 0xDEC0DE, index]).generate_state(1, dtype=np.uint64)[0]
    return int(state >> 2)  # room for + b below 2**63


@dataclass
class Decoded:
    """What a decoder produced: sampling.n outputs per prompt (consecutive per prompt, as policies' samples)."""

    texts: list[str]
    logp: torch.Tensor | None = None  # dera: log pi_lam(y|x) per output (the mixed process, a full forward)
    logp_ref: torch.Tensor | None = None  # dera: log pi_0(y|x), the same process
    chosen: torch.Tensor | None = None  # bon / rbon_*: index of each output among its n candidates, (P * sampling.n,)
    candidate_logps: torch.Tensor | None = None  # bon / rbon_*: log pi_0(y|x) of every candidate, (P * sampling.n, n)
    candidate_rewards: torch.Tensor | None = None  # bon / rbon_*: the selector's reward of every candidate, (P * sampling.n, n)

    @property
    def selector_reward(self) -> torch.Tensor | None:
        """bon / rbon_*: the selector's reward of each output."""
        return None if self.chosen is None else self.candidate_rewards.gather(1, self.chosen[:, None])[:, 0]


def run_decoder(spec: DecoderSpec, ref, tok, prompts, cfg: EvalConfig, seed: int, gold) -> Decoded:
    """sampling.n outputs per prompt from decoder `spec` over the reference model `ref` (and its
    tokenizer), seeded by `seed`; `gold` is the gold scorer, the selector when spec.selector is null."""
    from align.engine.models import load_causal_lm

    if spec.kind == "dera":
        aligned, aligned_tok = load_causal_lm(spec.aligned, next(ref.parameters()).device, "float32")
        if aligned_tok.get_vocab() != tok.get_vocab():
            raise ValueError(f"decoder {spec.name!r}: the aligned model must share the reference's tokenizer ({spec.aligned})")
        texts, logp, logp_ref = sample_with_logprobs(DeraLM(ref, aligned, spec.lam), tok, ref, prompts, cfg, seed)
        return Decoded(texts, logp=logp, logp_ref=logp_ref)
    return select_candidates(spec, ref, tok, prompts, cfg, seed, gold)


def select_candidates(spec: DecoderSpec, ref, tok, prompts, cfg: EvalConfig, seed: int, gold) -> Decoded:
    """bon / rbon_kl / rbon_wd: for each of the sampling.n outputs of a prompt, n fresh candidates from
    pi_0 under the evaluation's process, ranked by the selector and picked by align.math.selection.select
    (argmax, or RBoN with log pi_0 from the sampler / the cosine cost of sentence embeddings)."""
    from actors.scorer import make_scorer
    from align.math.scoring import cosine_cost
    from align.math.selection import select

    m, n = cfg.sampling.n, spec.n
    selector = gold if spec.selector is None else make_scorer(spec.selector.spec())
    embedder = None
    if spec.kind == "rbon_wd":
        from align.engine.embeddings import SentenceEmbedder
        from align.engine.models import pick_device

        embedder = SentenceEmbedder(spec.embedder, device=str(pick_device(cfg.device)))
    method = {"bon": "argmax", "rbon_kl": "rbon_kl", "rbon_wd": "rbon_wd"}[spec.kind]
    per_batch = max(1, cfg.batch_size // n)  # about batch_size * sampling.n candidate rows at a time
    texts, chosen, logps, rewards = [], [], [], []
    start = 0
    for ids, _, s in draw_batches(ref, tok, prompts, cfg, seed, m * n, per_batch):
        batch = prompts[start : start + ids.shape[0]]
        start += ids.shape[0]
        candidates = tok.batch_decode(s.completion_ids(), skip_special_tokens=True)  # (B * m * n,)
        ranking = selector.score([p for p in batch for _ in range(m * n)], candidates).mean.view(-1, n)  # (B * m, n)
        lp = s.logprobs.detach().cpu().double().view(-1, n)
        cost = cosine_cost(embedder.embed(candidates).view(-1, n, embedder.dim)) if embedder is not None else None
        idx = select(ranking, method, spec.beta, lp, cost)
        texts += [candidates[r * n + j] for r, j in enumerate(idx.tolist())]
        chosen.append(idx)
        logps.append(lp)
        rewards.append(ranking)
    return Decoded(texts, chosen=torch.cat(chosen), candidate_logps=torch.cat(logps), candidate_rewards=torch.cat(rewards))


def describe(spec: DecoderSpec) -> str:
    """The method column of the table: what the decoder does, with its knobs."""
    if spec.kind == "dera":
        return f"dera lam={spec.lam:g}"
    selector = "gold selector" if spec.selector is None else f"{spec.selector.kind} selector"
    beta = f" beta={spec.beta:g}" if spec.kind != "bon" else ""
    return f"{spec.kind} n={spec.n}{beta}, {selector}"


def win_metrics(texts, rep, r_ref, scorer, cfg: EvalConfig) -> dict:
    """Gold win rate (ties 1/2, bootstrap interval over prompts) and mean gold reward of outputs
    against the shared pi_0 samples' rewards, and their mean length in words (off-target drift)."""
    from align.math.bon import tie_rate, win_rate
    from align.math.stats import win_rate_interval

    r = scorer.score(rep, texts).mean
    low, high = win_rate_interval(r, r_ref, cfg.sampling.n, seed=cfg.seed)
    words = torch.tensor([float(len(t.split())) for t in texts])
    return {"samples": len(rep), "win_rate_vs_pi0": win_rate(r, r_ref), "win_rate_ci95": [low, high],
            "tie_rate": tie_rate(r, r_ref), "mean_reward_policy": r.mean().item(), "mean_reward_pi0": r_ref.mean().item(),
            # an off-target measure: how long the outputs are, which a reward can favour beside its target
            "mean_words": words.mean().item()}


def evaluate_policy(policy, tok, ref, prompts, rep, r_ref, scorer, cfg: EvalConfig) -> dict:
    """Win rate over the given pi_0 rewards and the Monte Carlo KL of one policy."""
    texts, logp, logp_ref = sample_with_logprobs(policy, tok, ref, prompts, cfg, cfg.seed)
    kl, kl_se = clustered_mean_stderr(logp - logp_ref, cfg.sampling.n)
    return {**win_metrics(texts, rep, r_ref, scorer, cfg), "kl_to_pi0": kl, "kl_to_pi0_stderr": kl_se,
            "process": process_of(cfg, tok)}


def bon_kl_samples(decoded: Decoded, n: int, m: int) -> torch.Tensor:
    """(P, m) estimates of log pi_bon / pi_0 of each BoN output (align.math.bon.bon_log_ratio_estimate):
    F_x from the selector's rewards of the candidates of the prompt's other m - 1 outputs, pi_0 draws
    independent of this output's own n."""
    from align.math.bon import bon_log_ratio_estimate

    cand = decoded.candidate_rewards.view(-1, m, n)
    chosen = decoded.selector_reward.view(-1, m)
    return torch.stack([bon_log_ratio_estimate(chosen[:, j : j + 1], torch.cat([cand[:, :j], cand[:, j + 1 :]], 1).flatten(1),
                                               n)[:, 0] for j in range(m)], 1)


def evaluate_decoder(spec: DecoderSpec, decoded: Decoded, tok, rep, r_ref, scorer, cfg: EvalConfig) -> dict:
    """A decoder's row: win rate and mean gold reward as for a policy; KL by Monte Carlo (dera),
    estimated from BoN's own candidates beside its closed form (bon: `bon_kl_samples`; the closed form
    alone with one output per prompt), or none (rbon_*: null)."""
    from align.math.bon import bon_kl_closed_form

    metrics = win_metrics(decoded.texts, rep, r_ref, scorer, cfg)
    if spec.kind == "dera":
        kl, kl_se = clustered_mean_stderr(decoded.logp - decoded.logp_ref, cfg.sampling.n)
        source = "Monte Carlo"
    elif spec.kind == "bon" and cfg.sampling.n > 1:
        kl, kl_se = clustered_mean_stderr(bon_kl_samples(decoded, spec.n, cfg.sampling.n).flatten(), cfg.sampling.n)
        source = "sample estimate"
        metrics["kl_closed_form"] = bon_kl_closed_form(spec.n)
    elif spec.kind == "bon":
        kl, kl_se, source = bon_kl_closed_form(spec.n), None, "closed form"
    else:
        kl, kl_se, source = None, None, "-"
    metrics.update(kl_to_pi0=kl, kl_to_pi0_stderr=kl_se, kl_source=source, process=process_of(cfg, tok))
    if spec.selector is not None and decoded.selector_reward is not None:
        metrics["mean_reward_selector"] = decoded.selector_reward.mean().item()
    return metrics


def print_metrics(title: str, metrics: dict) -> None:
    low, high = metrics["win_rate_ci95"]
    lines = [f"\n  {title}",
             f"    gold win rate      {metrics['win_rate_vs_pi0']:.3f}  (95% bootstrap interval over prompts "
             f"{low:.3f}-{high:.3f}; ties {metrics['tie_rate']:.3f})",
             f"    mean gold reward   {metrics['mean_reward_policy']:+.3f} vs {metrics['mean_reward_pi0']:+.3f}",
             f"    mean length        {metrics['mean_words']:.1f} words vs {metrics['mean_words_pi0']:.1f}"]
    if "mean_reward_selector" in metrics:
        lines.append(f"    mean selector      {metrics['mean_reward_selector']:+.3f} (the reward that ranked the candidates)")
    source = metrics.get("kl_source", "Monte Carlo")
    if source == "Monte Carlo":
        lines.append(f"    KL(pi || pi_0)     {metrics['kl_to_pi0']:.3f} +- {metrics['kl_to_pi0_stderr']:.3f} nats (Monte Carlo "
                     "over the sampling process; standard error clustered by prompt)")
    elif source == "sample estimate":
        lines.append(f"    KL(pi || pi_0)     {metrics['kl_to_pi0']:.3f} +- {metrics['kl_to_pi0_stderr']:.3f} nats (from samples: "
                     f"log pi_bon/pi_0 = log n + (n - 1) log F_x(r) without ties; closed form {metrics['kl_closed_form']:.3f})")
    elif source == "closed form":
        lines.append(f"    KL(pi || pi_0)     {metrics['kl_to_pi0']:.3f} nats (best-of-n closed form log n - (n - 1) / n; "
                     "exact for continuous rewards, an upper bound with ties)")
    else:
        lines.append("    KL(pi || pi_0)     not estimated (regularized BoN has no closed form here)")
    print("\n".join(lines), flush=True)


def run(cfg: EvalConfig) -> dict:
    """Evaluate the policy, the `compare` policies and the `decoders` against one set of pi_0 samples.
    Returns the policy's metrics (also eval_metrics.json next to it or in output_dir), or with no
    policy the comparison (comparison.json's content)."""
    from actors.scorer import make_scorer
    from align.data.prompts import load_prompts
    from align.engine.models import load_causal_lm, model_path_problem
    from align.runtime.paths import resolve_input
    from align.runtime.runstate import claim_output
    from jobs.sections import check_model_paths

    check_model_paths(cfg)  # a wrong reward model path stops here, before any work

    out = Path(cfg.output_dir) if cfg.output_dir else resolve_input(cfg.policy).parent
    # Its own file: next to a trained policy, config.yaml is the trainer's.
    claim_output(out, to_dict(cfg), cfg.replace, EVAL_CONFIG)
    for i, spec in enumerate(cfg.decoders):  # checked here, not at load: an earlier pipeline stage may write it
        problem = model_path_problem(spec.aligned) if spec.aligned else None
        require(problem is None, f"decoders[{i}].aligned", f"a model directory with config.json or an HF name ({problem})",
                spec.aligned)
    prompts = load_prompts(cfg.prompts.source, cfg.prompts.split, cfg.prompts.column, cfg.prompts.limit)
    ref, ref_tok = load_causal_lm(cfg.reference, cfg.device, "float32")
    scorer = make_scorer(cfg.reward.spec())
    rep = [p for p in prompts for _ in range(cfg.sampling.n)]
    ref_texts, _, _ = sample_with_logprobs(ref, ref_tok, None, prompts, cfg, cfg.seed + 10_000)
    r_ref = scorer.score(rep, ref_texts).mean  # one set of pi_0 samples for every policy and decoder
    pi0_words = sum(len(t.split()) for t in ref_texts) / len(ref_texts)  # the length every row's is read against

    rows, first = [], None
    policies = ([("policy", cfg.policy)] if cfg.policy is not None else []) + [(c.name, c.path) for c in cfg.compare]
    for name, path in policies:
        policy, tok = load_causal_lm(path, cfg.device, "float32")
        if tok.get_vocab() != ref_tok.get_vocab():
            raise ValueError(f"{name}: policy and reference must share a tokenizer for the KL estimate ({path})")
        metrics = {**evaluate_policy(policy, tok, ref, prompts, rep, r_ref, scorer, cfg), "mean_words_pi0": pi0_words}
        del policy
        print_metrics(f"{path} vs pi_0 ({cfg.reference}) on {len(prompts)} prompts x {cfg.sampling.n} samples", metrics)
        if name == "policy":
            write_atomic(out / "eval_metrics.json", json.dumps(metrics, indent=2))
            first = metrics
        label = name if name != "policy" else (cfg.policy_name or str(path))
        rows.append({"name": label, "method": "policy", **metrics, "kl_source": "Monte Carlo"})
    decoder_rows = []
    for i, spec in enumerate(cfg.decoders):
        decoded = run_decoder(spec, ref, ref_tok, prompts, cfg, decoder_seed(cfg.seed, i), scorer)
        metrics = {**evaluate_decoder(spec, decoded, ref_tok, rep, r_ref, scorer, cfg), "mean_words_pi0": pi0_words}
        print_metrics(f"decoder {spec.name} ({describe(spec)}) vs pi_0 ({cfg.reference}) on {len(prompts)} prompts x "
                      f"{cfg.sampling.n} outputs", metrics)
        decoder_rows.append({"name": spec.name, "method": describe(spec), "kind": spec.kind, "n": spec.n, "beta": spec.beta,
                             "lam": spec.lam, "aligned": spec.aligned,
                             "selector": None if spec.selector is None else to_dict(spec.selector), **metrics})
    table = compare_table(rows, decoder_rows, cfg, out) if cfg.compare or cfg.decoders else None
    write_atomic(out / EVAL_CONFIG, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return first if first is not None else table


def compare_table(rows: list[dict], decoder_rows: list[dict], cfg: EvalConfig, out) -> dict:
    """comparison.md/json and pareto.png: each policy's and decoder's win rate against its KL, with
    BoN's closed forms. Returns comparison.json's content."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from align.math.bon import bon_kl_closed_form, bon_win_rate_closed_form
    from jobs.tables import format_table

    for r in rows + decoder_rows:
        r["win_rate_ci"] = "{:.3f}-{:.3f}".format(*r["win_rate_ci95"])
    columns = [("policy", "name", "{}"), ("method", "method", "{}"), ("gold win rate", "win_rate_vs_pi0", "{:.3f}"),
               ("95% CI", "win_rate_ci", "{}"), ("ties", "tie_rate", "{:.3f}"),
               ("mean gold", "mean_reward_policy", "{:+.3f}"), ("words", "mean_words", "{:.1f}"), ("KL (nats)", "kl_to_pi0", "{:.3f}"),
               ("+-se", "kl_to_pi0_stderr", "{:.3f}"), ("KL source", "kl_source", "{}")]
    bon = [{"name": f"BoN n={n} (closed form)", "method": "formula", "win_rate_vs_pi0": bon_win_rate_closed_form(n),
            "kl_to_pi0": bon_kl_closed_form(n), "kl_source": "closed form"} for n in cfg.bon_n]
    text, md = format_table(rows + decoder_rows + bon, columns)
    write_atomic(out / "comparison.md", f"# Policies and decoders against pi_0 ({cfg.reference}), gold win rate and KL\n\n{md}\n")
    table = {"policies": rows, "decoders": decoder_rows, "bon_closed_form": bon}
    write_atomic(out / "comparison.json", json.dumps(table, indent=2))
    print(f"\n{text}\n\n  wrote {out / 'comparison.md'} and pareto.png", flush=True)
    fig, ax = plt.subplots(figsize=(7, 4.8))
    ax.plot([b["kl_to_pi0"] for b in bon], [b["win_rate_vs_pi0"] for b in bon], "-o", color="tab:gray",
            label="best-of-n (closed form)")
    for b, n in zip(bon, cfg.bon_n):
        ax.annotate(f"n={n}", (b["kl_to_pi0"], b["win_rate_vs_pi0"]), textcoords="offset points", xytext=(4, -10), fontsize=8)
    for r, marker in [(r, "s") for r in rows] + [(r, "D") for r in decoder_rows]:
        low, high = r["win_rate_ci95"]
        yerr = [[r["win_rate_vs_pi0"] - low], [high - r["win_rate_vs_pi0"]]]
        if r["kl_to_pi0"] is None:  # no KL estimate: the win rate as a line across the plot
            ax.axhline(r["win_rate_vs_pi0"], ls=":", lw=1.2, label=f"{r['name']} (KL not estimated)")
            continue
        ax.errorbar(r["kl_to_pi0"], r["win_rate_vs_pi0"], xerr=r["kl_to_pi0_stderr"], yerr=yerr, fmt=marker, capsize=3,
                    label=r["name"] + (" (closed-form KL)" if r["kl_source"] == "closed form" else ""))
    ax.set(xlabel="KL(pi || pi_0) (nats)", ylabel="gold win rate over pi_0",
           title="Win rate against KL (squares: policies, diamonds: decoders)" if decoder_rows else "Win rate against KL")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=120)
    plt.close(fig)
    return table


def main(argv=None) -> dict:
    return run_job(EvalConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
