"""DPO / IPO on preference pairs, with optional TR-DPO reference updates, on DeepSpeed workers under
Ray Train.

    python -m jobs.train_dpo --config configs/train_dpo.yaml
    python -m jobs.train_dpo --config configs/train_dpo.yaml dpo.ref_update=hard dpo.ref_tau=256
    ray job submit --working-dir . -- python -m jobs.train_dpo --config configs/train_dpo.yaml

Running it again with the same train.run.name resumes from the last checkpoint.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import Literal

from actors.train_config import TrainConfig
from align.runtime.config import require, run_job
from jobs.sections import PairDataConfig

log = logging.getLogger("sweetspot.dpo")


@dataclass
class DpoParams:
    loss: Literal["dpo", "ipo"] = "dpo"
    beta: float = 0.1  # KL strength (DPO) / 1 / (2 * target gap) (IPO); > 0
    ref_update: Literal["none", "soft", "hard"] = "none"  # TR-DPO (Gorbatovski et al. 2404.09656)
    ref_alpha: float = 0.6  # soft: theta_ref <- alpha * theta + (1 - alpha) * theta_ref
    ref_tau: int = 32  # update the reference every tau steps
    precompute_reference: bool = True  # ref_update none: store reference log-probs once instead of a live model

    def __post_init__(self):
        require(self.beta > 0, "beta", "a number > 0", self.beta)
        require(0 <= self.ref_alpha <= 1, "ref_alpha", "a number in [0, 1]", self.ref_alpha)
        require(self.ref_tau >= 1, "ref_tau", "an integer >= 1", self.ref_tau)


@dataclass
class DpoJobConfig:
    model: str = "default"  # the policy to start from, also the initial reference
    data: PairDataConfig = field(default_factory=PairDataConfig)
    dpo: DpoParams = field(default_factory=DpoParams)
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str = "outputs/dpo"


def run(cfg: DpoJobConfig) -> dict:
    from jobs.training import run_training

    # A frozen reference's log-probs are computed once by the workers at step 0; TR-DPO runs it live.
    return run_training(f"{cfg.dpo.loss} (reference update: {cfg.dpo.ref_update})", "preference", asdict(cfg.dpo), cfg)


def main(argv=None) -> dict:
    return run_job(DpoJobConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
