"""DPO / IPO on preference pairs, with optional TR-DPO reference updates, on DeepSpeed workers under
Ray Train.

    python -m jobs.train_dpo --config configs/train_dpo.yaml
    python -m jobs.train_dpo --config configs/train_dpo.yaml dpo.ref_update=hard dpo.ref_tau=256
    ray job submit --working-dir . -- python -m jobs.train_dpo --config configs/train_dpo.yaml

Running it again with the same train.run.name resumes from the last checkpoint.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from actors.train_config import TrainConfig
from align.objectives.preference import PreferenceObjective
from align.runtime.config import InputRef, OutputPath, run_job
from jobs.sections import LoraParams, PairDataConfig

log = logging.getLogger("sweetspot.dpo")


@dataclass
class DpoJobConfig:
    model: InputRef = "default"  # the policy to start from, also the initial reference
    data: PairDataConfig = field(default_factory=PairDataConfig)
    dpo: PreferenceObjective = field(default_factory=PreferenceObjective)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraParams = field(default_factory=LoraParams)  # train LoRA adapters, merged on save
    output_dir: OutputPath = "outputs/dpo"


def run(cfg: DpoJobConfig) -> dict:
    from jobs.training import run_training

    # A frozen reference's log-probs are computed once by the workers at step 0; TR-DPO runs it live.
    return run_training(cfg.dpo, cfg)


def main(argv=None) -> dict:
    return run_job(DpoJobConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
