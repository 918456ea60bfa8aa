"""BoNBoN alignment (Gui, Garbacea, Veitch 2406.00832): fine-tune pi_0 on best-of-n data so that one
sample behaves like best-of-n, with alpha * SFT(best) + (1 - alpha) * IPO(best, worst) at beta*_n =
1 / (2 (n - 1) H_{n-1}). Reference log-probs of pi_0 are computed once, by the workers, at step 0.

    python -m jobs.make_pairs --config configs/make_pairs.yaml      # best/worst of n samples per prompt
    python -m jobs.train_bonbon --config configs/train_bonbon.yaml
    ray job submit --working-dir . -- python -m jobs.train_bonbon --config configs/train_bonbon.yaml
"""
from __future__ import annotations

from dataclasses import dataclass, field

from actors.train_config import TrainConfig
from align.objectives.bonbon import BonbonObjective
from align.runtime.config import InputRef, OutputPath, run_job
from jobs.sections import LoraParams, PairDataConfig


@dataclass
class BonbonJobConfig:
    model: InputRef = "default"  # pi_0: the policy to start from and the reference
    data: PairDataConfig = field(default_factory=PairDataConfig)
    bonbon: BonbonObjective = field(default_factory=BonbonObjective)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraParams = field(default_factory=LoraParams)  # train LoRA adapters, merged on save
    output_dir: OutputPath = "outputs/bonbon"


def check_n_matches_data(cfg: BonbonJobConfig) -> None:
    """The pairs' own n (column "n", written by jobs.make_pairs) must be the n that sets beta*_n."""
    from align.runtime.config import ConfigError
    from jobs.training import load_pair_dataset

    ds = load_pair_dataset(cfg.data)
    if "n" in ds.column_names:
        ns = set(ds.unique("n"))
        if ns != {cfg.bonbon.n}:
            raise ConfigError("bonbon.n", f"the n the pairs were drawn with ({sorted(ns)})", cfg.bonbon.n)


def run(cfg: BonbonJobConfig) -> dict:
    from jobs.training import run_training

    check_n_matches_data(cfg)
    return run_training(cfg.bonbon, cfg)


def main(argv=None) -> dict:
    return run_job(BonbonJobConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
