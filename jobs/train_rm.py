"""Bradley-Terry reward model: an HF AutoModelForSequenceClassification with one label (a new score
head on the policy's body by default), optionally LoRA via peft, trained on preference pairs with
-log sigmoid(r(x, y_w) - r(x, y_l)). The saved model (LoRA merged) is what RewardScorer loads with
reward.kind=classifier.

    python -m jobs.make_pairs --config configs/make_pairs.yaml      # gold-labelled random pairs
    python -m jobs.train_rm --config configs/train_rm.yaml
    ray job submit --working-dir . -- python -m jobs.train_rm --config configs/train_rm.yaml
"""
from __future__ import annotations

from dataclasses import dataclass, field

from actors.train_config import TrainConfig
from align.config import require, run_job
from jobs.training import PairDataConfig


@dataclass
class LoraParams:
    enabled: bool = False
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["c_attn"])  # GPT-2 attention; q_proj,v_proj for Llama

    def __post_init__(self):
        require(self.r >= 1, "r", "an integer >= 1", self.r)
        require(0 <= self.lora_dropout < 1, "lora_dropout", "a number in [0, 1)", self.lora_dropout)
        require(len(self.target_modules) > 0, "target_modules", "a non-empty list of module names", self.target_modules)


@dataclass
class EvalParams:
    source: str | None = None  # held-out pairs (defaults to data.source's "test" split, if it has one)
    split: str = "test"


@dataclass
class RmJobConfig:
    model: str = "default"  # body to start from (a causal LM or a sequence classifier)
    data: PairDataConfig = field(default_factory=lambda: PairDataConfig(source="outputs/pairs/random"))
    lora: LoraParams = field(default_factory=LoraParams)
    eval: EvalParams = field(default_factory=EvalParams)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "outputs/rm"


def heldout_agreement(model_dir: str, cfg: RmJobConfig) -> dict:
    """Share of held-out pairs on which the trained reward orders chosen above rejected (ties 1/2)."""
    from align.bon import win_rate
    from align.rewards import SequenceClassifierReward
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
    from dataclasses import asdict

    from align.paths import resolve_output
    from jobs.training import run_training

    lora = {k: v for k, v in asdict(cfg.lora).items() if k != "enabled"} if cfg.lora.enabled else None
    metrics = run_training("reward model (Bradley-Terry)", "bradley_terry", {}, cfg, lora=lora)
    agreement = heldout_agreement(str(resolve_output(cfg.output_dir) / "model"), cfg)
    if agreement:
        print(f"  held-out agreement with the labels: {agreement['heldout_agreement']:.3f} on {agreement['heldout_pairs']} pairs")
    return {**metrics, **agreement}


def main(argv=None) -> dict:
    return run_job(RmJobConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
