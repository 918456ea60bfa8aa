"""Launch a group of DeepSpeed training workers under Ray Train (the OpenRLHF-style launcher): one
place that turns a job's TrainConfig into ScalingConfig / TorchConfig / RunConfig and runs `fit()`.

Running a job again with the same run name and storage path resumes from its last checkpoint; a
worker failure restarts the group from the last checkpoint up to run.max_failures times.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict
from pathlib import Path

from actors.train_config import TrainConfig

log = logging.getLogger("sweetspot.train")


def read_history(output_dir: str | Path) -> list[dict]:
    """The per-step metrics rank 0 logged (train_log.jsonl), in step order, last entry per step."""
    path = Path(output_dir) / "train_log.jsonl"
    if not path.exists():
        return []
    by_step = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        by_step[row["step"]] = row
    return [by_step[s] for s in sorted(by_step)]


def check_resources(train: TrainConfig) -> None:
    """Fail fast, naming the knob, when the worker group cannot be placed (Ray Train would wait)."""
    import ray

    from align.config import ConfigError

    w, have = train.workers, ray.cluster_resources()
    for res, per_worker in (("CPU", w.cpus_per_worker), ("GPU", 1.0 if w.use_gpu else 0.0)):
        if w.num_workers * per_worker > have.get(res, 0):
            raise ConfigError("train.workers.num_workers", f"num_workers x {per_worker:g} {res} <= the cluster's "
                              f"{have.get(res, 0):g} {res}s", w.num_workers)


def launch_training(objective: str, objective_params: dict, model_path: str, data_path: str,
                    train: TrainConfig, output_dir: str | Path, lora: dict | None = None) -> dict:
    """Run the training worker group to completion (or resume it); returns the last logged metrics."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.trainer import train_worker

    output_dir = Path(output_dir).resolve()
    config = {"objective": objective, "objective_params": objective_params, "model_path": model_path,
              "data_path": str(Path(data_path).resolve()), "output_dir": str(output_dir), "train": asdict(train), "lora": lora}
    w = train.workers
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=w.use_gpu, resources_per_worker={"CPU": w.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if w.use_gpu else "gloo", timeout_s=w.collective_timeout_s),
        run_config=RunConfig(
            name=train.run.name,
            storage_path=str(Path(train.run.storage_path).resolve()),
            checkpoint_config=CheckpointConfig(num_to_keep=train.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=train.run.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own per-step lines say what happens
        ),
    )
    log.info("training %s on %d worker(s), ZeRO-%d, run %r in %s", objective, w.num_workers,
             train.deepspeed.zero_stage, train.run.name, train.run.storage_path)
    check_resources(train)
    trainer.fit()
    history = read_history(output_dir)
    return history[-1] if history else {}
