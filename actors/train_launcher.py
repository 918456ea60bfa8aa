"""Launch a group of DeepSpeed training workers under Ray Train (the OpenRLHF-style launcher): one
place that turns a job's TrainConfig into ScalingConfig / TorchConfig / RunConfig and runs `fit()`.

Running a job again with the same run name and storage path resumes from its newest complete
checkpoint when the config that shapes the result is unchanged (train.run.resume); a worker failure
restarts the group from the newest complete checkpoint up to run.max_failures times.
"""
from __future__ import annotations

import json
import logging
import shutil
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


def prepare_run(train: TrainConfig, storage_path: str, output_dir: Path, run_key: dict) -> bool:
    """Decide between resuming and starting over (train.run.resume, align.runstate.check_resume) and
    leave the run directory and the outputs consistent with that; True when resuming.

    Resuming needs a complete checkpoint made under the same run key (the config that shapes the
    result); a different one stops here with an error naming the differing keys. Starting over
    removes the old checkpoints, train log, metrics and model of this run name and output directory.
    """
    from actors.checkpoints import RUN_FILE, RunDir
    from align.runstate import check_resume

    run_dir = RunDir(storage_path, train.run.name)
    saved = run_dir.read_text(RUN_FILE)
    resume = check_resume(json.loads(saved) if saved else None, run_key, train.run.resume, f"run {run_dir.path}",
                          run_dir.newest_complete() is not None)
    if not resume:
        run_dir.remove()
        for name in ("train_log.jsonl", "metrics.json", ".failed_once"):
            (output_dir / name).unlink(missing_ok=True)
        shutil.rmtree(output_dir / "model", ignore_errors=True)
    run_dir.write_text(RUN_FILE, json.dumps(run_key, indent=1, sort_keys=True, default=str))
    return resume


def launch_training(objective: str, objective_params: dict, model, data_ref, train: TrainConfig,
                    output_dir: Path, storage_path: str, lora: dict | None = None) -> dict:
    """Run the training worker group to completion (or resume it); returns the last logged metrics.

    model: a path, hub name or actors.cluster.ShippedDir; data_ref: an ObjectRef of the tokenized
    pairs (a pyarrow Table), so workers on any node read it from the object store.
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.trainer import train_worker

    config = {"objective": objective, "objective_params": objective_params, "model": model, "data": data_ref,
              "output_dir": str(output_dir), "storage_path": storage_path, "train": asdict(train), "lora": lora}
    w = train.workers
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=w.num_workers, use_gpu=w.use_gpu, resources_per_worker={"CPU": w.cpus_per_worker}),
        torch_config=TorchConfig(backend="nccl" if w.use_gpu else "gloo", timeout_s=w.collective_timeout_s),
        run_config=RunConfig(
            name=train.run.name,
            storage_path=storage_path,
            # The workers choose the checkpoint to resume from and prune old ones (actors/checkpoints.py).
            checkpoint_config=CheckpointConfig(num_to_keep=None),
            failure_config=FailureConfig(max_failures=train.run.max_failures),
            logging_config=LoggingConfig(log_level="WARNING"),  # our own per-step lines say what happens
        ),
    )
    log.info("training %s on %d worker(s), ZeRO-%d, run %r in %s", objective, w.num_workers,
             train.deepspeed.zero_stage, train.run.name, storage_path)
    trainer.fit()
    history = read_history(output_dir)
    return history[-1] if history else {}
