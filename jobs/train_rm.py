"""Bradley-Terry reward model: an HF AutoModelForSequenceClassification with one label (a new score
head on the policy's body by default), optionally LoRA via peft, trained on preference pairs with
-log sigmoid(r(x, y_w) - r(x, y_l)). The saved model (LoRA merged) is what the scorers load with
reward.kind=classifier.

Against overoptimization it also trains an ensemble (ensemble.members = k: k runs with different
seeds, each on a bootstrap resample of the pairs; reward.kind=ensemble) and fits a Laplace posterior
over the LoRA weights (laplace.enabled; reward.kind=laplace).

    python -m jobs.make_pairs --config configs/make_pairs.yaml      # gold-labelled random pairs
    python -m jobs.train_rm --config configs/train_rm.yaml
    python -m jobs.train_rm --config configs/train_rm.yaml ensemble.members=3 laplace.enabled=true
    ray job submit --working-dir . -- python -m jobs.train_rm --config configs/train_rm.yaml

Outputs: <output_dir>/model (one model; member 0 of an ensemble), <output_dir>/ensemble/ (member_<i>/
and ensemble.json) when members > 1, <output_dir>/laplace/ (align.rewards.laplace_posterior) when enabled.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal
from pathlib import Path

from actors.train_config import TrainConfig
from align.runtime.config import InputRef, OutputPath, require, run_job
from jobs.sections import LoraParams, PairDataConfig


@dataclass
class EvalParams:
    source: InputRef | None = None  # held-out pairs (defaults to data.source's "test" split, if it has one)
    split: str = "test"


@dataclass
class EnsembleParams:
    members: int = 1  # k reward models; member i trains with seed train.seed + i
    bootstrap: bool = True  # each member after the first trains on a resample of the pairs (with replacement)

    def __post_init__(self):
        require(self.members >= 1, "members", "an integer >= 1", self.members)


@dataclass
class LaplaceParams:
    enabled: bool = False  # fit a Laplace posterior over the LoRA weights after training (needs lora.enabled)
    hessian_structure: Literal["kron", "diag"] = "kron"
    prior_optimization: Literal["marglik", "none"] = "marglik"  # marglik: prior precision by marginal likelihood
    limit: int | None = None  # fit on the first `limit` training pairs (null: all)

    def __post_init__(self):
        require(self.limit is None or self.limit >= 1, "limit", "null or an integer >= 1", self.limit)


@dataclass
class RmJobConfig:
    model: InputRef = "default"  # body to start from (a causal LM or a sequence classifier)
    data: PairDataConfig = field(default_factory=lambda: PairDataConfig(source="outputs/pairs/random"))
    lora: LoraParams = field(default_factory=LoraParams)
    eval: EvalParams = field(default_factory=EvalParams)
    train: TrainConfig = field(default_factory=TrainConfig)
    ensemble: EnsembleParams = field(default_factory=EnsembleParams)
    laplace: LaplaceParams = field(default_factory=LaplaceParams)
    output_dir: OutputPath = "outputs/rm"

    def __post_init__(self):
        require(not self.laplace.enabled or self.lora.enabled, "laplace.enabled",
                "true only with lora.enabled: true (the posterior is over the LoRA weights)", self.laplace.enabled)


def heldout_agreement(model_dir: str, cfg: RmJobConfig) -> dict:
    """Share of held-out pairs on which the trained reward orders chosen above rejected (ties 1/2)."""
    from align.math.bon import win_rate
    from align.rewards.classifier import SequenceClassifierReward
    from jobs.training import load_pair_dataset

    source = cfg.eval.source or cfg.data.source
    try:
        ds = load_pair_dataset(PairDataConfig(source=source, split=cfg.eval.split))
    except (ValueError, KeyError):
        return {}
    reward = SequenceClassifierReward(model_dir, device="cpu")
    # Sampled token ids where the pairs carry them (scored as they were trained on), else text.
    tok = ds["tokenizer"][0] if "tokenizer" in ds.column_names else None
    ids = {side: [p + c for p, c in zip(ds["prompt_ids"], ds[f"{side}_ids"])] if tok else None for side in ("chosen", "rejected")}
    rc = reward(ds["prompt"], ds["chosen"], ids["chosen"], tok)
    rr = reward(ds["prompt"], ds["rejected"], ids["rejected"], tok)
    return {"heldout_agreement": win_rate(rc, rr), "heldout_pairs": len(ds)}


def run(cfg: RmJobConfig) -> dict:
    import json
    import shutil

    from align.objectives.bradley_terry import BradleyTerryObjective
    from align.runtime.runstate import write_atomic
    from jobs.training import run_training

    lora = cfg.lora.kwargs()
    out = Path(cfg.output_dir)
    for stale, keep in (("ensemble", cfg.ensemble.members > 1), ("laplace", cfg.laplace.enabled)):
        if not keep and (out / stale).exists():  # made around an earlier model/: never left beside a new one
            print(f"  removing {out / stale} (an earlier run's; this config does not make it)")
            shutil.rmtree(out / stale)
    members = []
    for i in range(cfg.ensemble.members):
        # Member 0 is the plain run (outputs/rm/model); the others get their own seed, data resample and run.
        member = cfg if i == 0 else replace(cfg, output_dir=str(out / "ensemble" / f"member_{i}"),
                                            train=replace(cfg.train, seed=cfg.train.seed + i,
                                                          run=replace(cfg.train.run, name=f"{cfg.train.run.name}-member{i}")))
        objective = BradleyTerryObjective()
        title = objective.describe() + (f", ensemble member {i + 1}/{cfg.ensemble.members}" if cfg.ensemble.members > 1 else "")
        metrics = run_training(objective, member, lora=lora, bootstrap_seed=i if i > 0 and cfg.ensemble.bootstrap else None,
                               title=title)
        agreement = heldout_agreement(str(Path(member.output_dir) / "model"), cfg)
        if agreement:
            print(f"  held-out agreement with the labels: {agreement['heldout_agreement']:.3f} on {agreement['heldout_pairs']} pairs")
        members.append({**metrics, **agreement})
    result = dict(members[0])
    if cfg.ensemble.members > 1:
        ens = out / "ensemble"
        # A copy, not a link: the ensemble directory travels to scorer actors on other nodes on its own.
        shutil.rmtree(ens / "member_0", ignore_errors=True)
        shutil.copytree(out / "model", ens / "member_0" / "model")
        write_atomic(ens / "ensemble.json", json.dumps({"members": [f"member_{i}/model" for i in range(cfg.ensemble.members)]}))
        result["ensemble_heldout_agreement"] = [m.get("heldout_agreement") for m in members]
        print(f"  ensemble of {cfg.ensemble.members} written to {ens} (reward.kind=ensemble reward.path={ens})")
    if cfg.laplace.enabled:
        result.update(fit_laplace(cfg, out))
    write_atomic(out / "metrics.json", json.dumps(result, indent=2))
    return result


def fit_laplace(cfg: RmJobConfig, out) -> dict:
    """Fit the Laplace posterior over the trained adapter (model/lora) on the training pairs, in this
    process, and save it to <output_dir>/laplace (align.rewards.laplace_posterior)."""
    import time

    from peft import PeftModel

    from actors.train_loop import LORA_DIR
    from align.rewards.laplace_posterior import LaplaceReward
    from align.engine.models import build_model_for, load_tokenizer, resolve_model_path
    from jobs.training import load_pair_dataset, tokenize_pairs

    start = time.perf_counter()
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path)
    base = build_model_for("reward_model", model_path, tokenizer)
    model = PeftModel.from_pretrained(base, str(out / "model" / LORA_DIR), is_trainable=True)
    data = replace(cfg.data, limit=cfg.laplace.limit or cfg.data.limit)
    ds = tokenize_pairs(load_pair_dataset(data), tokenizer, cfg.train.max_length)
    la = LaplaceReward.fit(model, tokenizer, ds["chosen_input_ids"], ds["rejected_input_ids"],
                           hessian_structure=cfg.laplace.hessian_structure, prior_optimization=cfg.laplace.prior_optimization)
    la.save(out / "laplace")
    seconds = time.perf_counter() - start
    print(f"  Laplace posterior ({cfg.laplace.hessian_structure}) over the LoRA weights fitted on {len(ds)} pairs in "
          f"{seconds:.1f} s: {out / 'laplace'} (reward.kind=laplace reward.path={out / 'laplace'})")
    return {"laplace_pairs": len(ds), "laplace_seconds": seconds}


def main(argv=None) -> dict:
    return run_job(RmJobConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
