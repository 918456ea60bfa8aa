"""Any registered training objective on preference pairs, by name, on DeepSpeed workers under Ray
Train: the built-ins ("preference", "bonbon", "bradley_terry") or one registered in your own module
("my_package.my_module:name", align/objectives). The dedicated jobs (train_dpo, train_bonbon,
train_rm) add their own checks and outputs on top of the same trainer.

    python -m jobs.train_objective --config configs/train_objective.yaml
    python -m jobs.train_objective --config configs/train_objective.yaml objective.name=my_objectives:sft \\
        objective.params={}
    ray job submit --working-dir . -- python -m jobs.train_objective --config configs/train_objective.yaml

Running it again with the same train.run.name resumes from the last checkpoint.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from actors.train_config import TrainConfig
from align.runtime.config import InputRef, OutputPath, from_dict, run_job
from jobs.sections import LoraParams, PairDataConfig


@dataclass
class ObjectiveSection:
    """An objective by its registered name, with its own fields typed by its dataclass."""

    name: str = "preference"  # preference | bonbon | bradley_terry, or "module:name" registered in your module
    params: dict = field(default_factory=dict)  # the objective's fields, e.g. preference {loss: ipo, beta: 0.1}

    def __post_init__(self):
        from align.objectives import objective_class

        cls = objective_class(self.name, "name")
        self.params = dataclasses.asdict(from_dict(cls, self.params, prefix="params."))  # typed, defaults filled

    def build(self):
        """The objective instance the workers run."""
        from align.objectives import objective_class

        return objective_class(self.name)(**self.params)


@dataclass
class TrainObjectiveConfig:
    model: InputRef = "default"  # the policy (or reward-model body) to start from; also a reference's start
    objective: ObjectiveSection = field(default_factory=ObjectiveSection)
    data: PairDataConfig = field(default_factory=PairDataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lora: LoraParams = field(default_factory=LoraParams)  # train LoRA adapters, merged on save
    output_dir: OutputPath = "outputs/train_objective"


def run(cfg: TrainObjectiveConfig) -> dict:
    from jobs.training import run_training

    return run_training(cfg.objective.build(), cfg)


def main(argv=None) -> dict:
    return run_job(TrainObjectiveConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
