"""Scorers: one interface, `score(prompts, completions) -> RewardScores` (a mean and a variance per
sample, plus the members' rewards for an ensemble), batched on the model's device.

    RewardScorer     one reward: VADER (the gold reward), or an HF reward model (variance 0)
    EnsembleScorer   k reward models; mean and variance across members, members kept
    LaplaceScorer    a Laplace posterior over a reward model's LoRA weights (align.rewards.laplace_posterior)
    CombinedScorer   several scorers, each LSC-transformed against its per-prompt reference, summed

`make_scorer(spec)` builds any of them from a plain dict (what the configs hold, and what travels to
Ray actors); `ScorerPool` runs a group of scorer actors, like GeneratorPool, so scoring scales out
separately from generation. Classes are undecorated so tests build them in-process.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from align.engine.samples import PromptSamples
from align.rewards.functions import RewardScores

SCORER_KINDS = ("vader", "brevity", "classifier", "ensemble", "laplace", "combined")
ENSEMBLE_FILE = "ensemble.json"  # lists an ensemble directory's members (written by jobs.train_rm)


class Scorer:
    """Base: subclasses implement `score`; `score_samples` fills PromptSamples with it."""

    embedder = None

    def score(self, prompts: list[str], completions: list[str], ids=None, tokenizer=None, groups=None) -> RewardScores:
        """groups: per row, which prompt's samples it belongs to (default: rows with the same prompt
        text); only scorers with a per-prompt reference (CombinedScorer) read it."""
        raise NotImplementedError

    def score_samples(self, samples: list[PromptSamples]) -> list[PromptSamples]:
        """Fill `rewards` (the mean), `reward_var` and `reward_members` of each PromptSamples (all n
        completions of a prompt scored in one call), and `embeddings` when an embedder is attached
        (RBoN-WD). A model reward with the generator's tokenizer scores the sampled ids themselves."""
        prompts = [s.prompt for s in samples for _ in s.completions]
        completions = [c for s in samples for c in s.completions]
        ids = [s.prompt_ids + c for s in samples for c in s.completion_ids]
        groups = [g for g, s in enumerate(samples) for _ in s.completions]  # two requests may share a prompt
        scores = self.score(prompts, completions, ids, samples[0].tokenizer if samples else None, groups)
        embeddings = self.embedder.embed(completions) if self.embedder is not None else None
        i = 0
        for s in samples:
            rows = slice(i, i + len(s.completions))
            s.rewards, s.reward_var = scores.mean[rows].tolist(), scores.var[rows].tolist()
            s.reward_members = None if scores.members is None else scores.members[:, rows].T.tolist()
            s.embeddings = None if embeddings is None else embeddings[rows]
            i += len(s.completions)
        return samples

    def attach_embedder(self, name_or_path: str, device: str = "auto") -> "Scorer":
        """Also embed each completion (sentence embeddings for RBoN-WD's cost between samples)."""
        from align.engine.embeddings import SentenceEmbedder
        from align.engine.models import pick_device

        self.embedder = SentenceEmbedder(name_or_path, device=str(pick_device(device)))
        return self


class RewardScorer(Scorer):
    """One reward from `align.rewards.functions.make_reward(kind, path, device)`: a point estimate (variance 0)."""

    def __init__(self, kind: str = "vader", path=None, device: str = "auto", **params):
        """path: the reward model's HF name, directory, or actors.cluster.ShippedDir (kind classifier)."""
        from actors.cluster import local_dir
        from align.rewards.functions import make_reward

        self.reward = make_reward(kind, local_dir(path) if path else None, device, **params)

    def score(self, prompts, completions, ids=None, tokenizer=None, groups=None) -> RewardScores:
        return RewardScores.point(self.reward(prompts, completions, ids, tokenizer))


class EnsembleScorer(Scorer):
    """k reward models (Coste et al. 2310.02743): `members` (k, N), their mean and variance across
    members (population variance: k identical members give variance 0). How they are combined (mean,
    worst, uncertainty-weighted) is a choice made at selection time (align.math.scoring.ensemble_reward)."""

    def __init__(self, paths: list, device: str = "auto"):
        from actors.cluster import local_dir
        from align.rewards.functions import SequenceClassifierReward

        if len(paths) < 1:
            raise ValueError("an ensemble needs k >= 1 member reward models, got 0 paths")
        self.members = [SequenceClassifierReward(local_dir(p), device=device) for p in paths]

    def score(self, prompts, completions, ids=None, tokenizer=None, groups=None) -> RewardScores:
        members = torch.stack([m(prompts, completions, ids, tokenizer) for m in self.members])  # (k, N)
        return RewardScores(members.mean(0), members.var(0, unbiased=False), members)


class LaplaceScorer(Scorer):
    """Predictive mean and variance of r(x, y) under a Laplace posterior over the reward model's LoRA
    weights (Yang et al. 2402.13210), saved by jobs.train_rm (laplace.enabled)."""

    def __init__(self, path, device: str = "auto", chunk_size: int | None = None):
        """chunk_size: sequences per Jacobian batch; None: 4 on CPU (fastest there: the cost grows with
        the chunk squared), 32 on GPU."""
        from actors.cluster import local_dir
        from align.rewards.laplace_posterior import LaplaceReward
        from align.engine.models import pick_device, tokenizer_fingerprint

        self.laplace = LaplaceReward.load(local_dir(path), device=str(pick_device(device)))
        self.fingerprint = tokenizer_fingerprint(self.laplace.tokenizer)
        self.chunk_size = chunk_size or (4 if self.laplace.device.type == "cpu" else 32)

    def score(self, prompts, completions, ids=None, tokenizer=None, groups=None) -> RewardScores:
        from align.data.pairs import concat_token_ids

        if not completions:
            return RewardScores.point(torch.zeros(0))
        seqs = ids if ids is not None and tokenizer == self.fingerprint else concat_token_ids(self.laplace.tokenizer, prompts, completions)
        mean, var = self.laplace.predict(seqs, chunk_size=self.chunk_size)
        return RewardScores(mean.double().cpu(), var.double().cpu())


class CombinedScorer(Scorer):
    """Several rewards made one (Wang et al. 2402.00742): each scorer's mean r_i is LSC-transformed,
    log sigmoid(r_i - r_ref,i(x)), and the transforms summed (method sum_of_lsc: the log-probability
    that y is good on every property), or the raw rewards summed (sum_raw, the baseline).

    r_ref,i(x) is the `quantile` of r_i over the completions of x in the same call (its `groups`). In best-of-n those
    are the n samples from pi_0, which is the reference the transform asks for; callers scoring
    completions of another policy must score pi_0 samples with them."""

    def __init__(self, scorers: list[Scorer], method: str = "sum_of_lsc", quantile: float = 0.5):
        if method not in ("sum_of_lsc", "sum_raw"):
            raise ValueError(f"combine must be 'sum_of_lsc' or 'sum_raw', got {method!r}")
        self.scorers, self.method, self.quantile = scorers, method, quantile

    def score(self, prompts, completions, ids=None, tokenizer=None, groups=None) -> RewardScores:
        from align.math.scoring import combine_rewards, reference_reward

        parts = torch.stack([s.score(prompts, completions, ids, tokenizer).mean for s in self.scorers])  # (k, N)
        if self.method == "sum_raw":
            return RewardScores(parts.sum(0), torch.zeros(len(completions), dtype=torch.float64), parts)
        combined = torch.empty(len(completions), dtype=torch.float64)
        keys = groups if groups is not None else prompts
        for key in dict.fromkeys(keys):  # one reference per prompt's group of samples
            rows = torch.tensor([i for i, k in enumerate(keys) if k == key])
            group = parts[:, rows].unsqueeze(1)  # (k, 1, m)
            refs = torch.stack([reference_reward(g, self.quantile) for g in group])  # (k, 1)
            combined[rows] = combine_rewards(group, "sum_of_lsc", refs)[0]
        return RewardScores(combined, torch.zeros_like(combined), parts)


def ensemble_members(path) -> list[str]:
    """Member directories of an ensemble directory (its ensemble.json, written by jobs.train_rm)."""
    root = Path(path)
    listing = root / ENSEMBLE_FILE
    if not listing.is_file():
        raise FileNotFoundError(f"{root} is not an ensemble directory: {ENSEMBLE_FILE} is missing (train one with "
                                f"jobs.train_rm ensemble.members=k)")
    return [str(root / m) for m in json.loads(listing.read_text())["members"]]


def make_scorer(spec: dict) -> Scorer:
    """A scorer from its config dict: {"kind": vader | brevity | classifier | ensemble | laplace |
    combined, "path", "device", ...}; kind combined takes "components" (a list of such dicts),
    "combine" and "reference_quantile"; "embedder" attaches sentence embeddings (RBoN-WD)."""
    from actors.cluster import local_dir

    kind, device = spec.get("kind"), spec.get("device", "auto")
    if kind in ("vader", "classifier"):
        scorer = RewardScorer(kind, spec.get("path"), device)
    elif kind == "brevity":
        scorer = RewardScorer(kind, None, device, max_words=spec.get("max_words", 12))
    elif kind == "ensemble":
        scorer = EnsembleScorer(ensemble_members(local_dir(spec["path"])), device)
    elif kind == "laplace":
        scorer = LaplaceScorer(spec["path"], device, spec.get("chunk_size"))
    elif kind == "combined":
        scorer = CombinedScorer([make_scorer({"device": device, **c}) for c in spec["components"]],
                                spec.get("combine", "sum_of_lsc"), spec.get("reference_quantile", 0.5))
    else:
        raise ValueError(f"reward.kind must be one of {' | '.join(SCORER_KINDS)}, got {kind!r}")
    if spec.get("embedder"):
        scorer.attach_embedder(spec["embedder"], device)
    return scorer


class ScorerActor:
    """What a ScorerPool runs as a Ray actor: the scorer `make_scorer(spec)`, with its torch threads."""

    def __init__(self, spec: dict, num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.scorer = make_scorer(spec)

    def score(self, prompts, completions, ids=None, tokenizer=None, groups=None) -> RewardScores:
        return self.scorer.score(prompts, completions, ids, tokenizer, groups)

    def score_samples(self, samples: list[PromptSamples]) -> list[PromptSamples]:
        return self.scorer.score_samples(samples)


def ship_spec(spec: dict) -> dict:
    """The spec with every local model directory replaced by an actors.cluster.ShippedDir, so actors
    on any node can load it (shipped once per directory)."""
    from actors.cluster import ship_dir

    out = dict(spec)
    if isinstance(out.get("path"), str):  # shipped once: an already shipped spec passes through
        out["path"] = ship_dir(out["path"])
    if out.get("components"):
        out["components"] = [ship_spec(c) for c in out["components"]]
    return out


class ScorerPool:
    """A group of scorer Ray actors (one scorer each, built from `spec`). Calls go to the least busy
    actor; `score` returns results in input order; an actor that dies is replaced and its batch
    scored again (scoring is deterministic, so the result is the same)."""

    def __init__(self, spec: dict, num_actors: int = 1, num_cpus_per_actor: float = 0, num_gpus_per_actor: float = 0,
                 max_retries: int = 3):
        from actors.resilient import ResilientActors

        # One torch thread per reserved CPU, and one when none is reserved: scorers sharing cores with
        # generators would otherwise oversubscribe them, and busy-waiting threads slow everyone down.
        threads = max(1, int(num_cpus_per_actor))
        self.group = ResilientActors(ScorerActor, num_actors, (ship_spec(spec), threads),
                                     options={"num_cpus": num_cpus_per_actor, "num_gpus": num_gpus_per_actor},
                                     max_retries=max_retries, name="Scorer")

    @property
    def actors(self) -> list:
        return self.group.actors

    def call(self, method: str, *args, tags: dict | None = None):
        return self.group.call(method, *args, tags=tags)

    def get(self, call):
        return self.group.get(call)

    def score(self, prompts: list[str], completions: list[str], batch_size: int = 64) -> RewardScores:
        """Scores of every (prompt, completion), in order, batches spread over the actors."""
        calls = [self.group.call("score", prompts[i : i + batch_size], completions[i : i + batch_size])
                 for i in range(0, len(prompts), batch_size)]
        return RewardScores.cat([self.group.get(c) for c in calls])

    def shutdown(self) -> None:
        self.group.shutdown()
