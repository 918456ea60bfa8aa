"""Launch a group of DeepSpeed training workers under Ray Train (the OpenRLHF-style launcher): one
place that turns a job's TrainConfig into ScalingConfig / TorchConfig / RunConfig and runs `fit()`.

Running a job again with the same run name and storage path resumes from its newest complete
checkpoint when the config that shapes the result is unchanged (train.run.resume); a worker failure
restarts the group from the newest complete checkpoint up to run.max_failures times.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import threading
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from actors.checkpoints import LOG_FILE, MODEL_DIR, RAY_SNAPSHOT, RUN_FILE, START_FILE, RunDir
from actors.tracking import MLFLOW_DIR, MLFLOW_RUN_FILE, TB_DIR, Tracker
from actors.train_config import TrainConfig
from align.runtime.runstate import replace_dir, write_atomic

if TYPE_CHECKING:
    from align.objectives.base import Objective

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

    from align.runtime.config import ConfigError

    w, have = train.workers, ray.cluster_resources()
    for res, per_worker in (("CPU", w.cpus_per_worker), ("GPU", 1.0 if w.use_gpu else 0.0)):
        if w.num_workers * per_worker > have.get(res, 0):
            raise ConfigError("train.workers.num_workers", f"num_workers x {per_worker:g} {res} <= the cluster's "
                              f"{have.get(res, 0):g} {res}s", w.num_workers)


def prepare_run(train: TrainConfig, storage_path: str, output_dir: Path, run_key: dict) -> bool:
    """Decide between resuming and starting over (train.run.resume, align.runtime.runstate.check_resume) and
    leave the run directory and the outputs consistent with that; True when resuming.

    Resuming needs a complete checkpoint made under the same run key (the config that shapes the
    result); a different one stops here with an error naming the differing keys. Starting over
    removes the old checkpoints, train log, metrics and model of this run name and output directory.
    """
    from align.runtime.runstate import check_resume

    run_dir = RunDir(storage_path, train.run.name)
    saved = run_dir.read_text(RUN_FILE)
    resume = check_resume(json.loads(saved) if saved else None, run_key, train.run.resume, f"run {run_dir.path}",
                          run_dir.newest_complete() is not None)
    if not resume:
        run_dir.remove()
        for name in (LOG_FILE, "metrics.json", ".failed_once", MLFLOW_RUN_FILE):
            (output_dir / name).unlink(missing_ok=True)
        for name in (MODEL_DIR, TB_DIR, MLFLOW_DIR):
            shutil.rmtree(output_dir / name, ignore_errors=True)
    else:  # it may name checkpoints pruned since; the workers pick the newest complete one themselves
        run_dir.remove_file(RAY_SNAPSHOT)
        newest, bad = run_dir.newest_valid()
        for path, problem in bad:  # the workers skip it too (actors/trainer.resume_newest)
            print(f"  checkpoint {path} is corrupted ({problem}); resuming from "
                  f"{newest[1] if newest else 'the start (no valid checkpoint)'}", flush=True)
    run_dir.write_text(RUN_FILE, json.dumps(run_key, indent=1, sort_keys=True, default=str))
    return resume


def launch_training(objective: Objective | None, model, data_ref, train: TrainConfig, output_dir: Path,
                    storage_path: str, lora: dict | None = None, loop=None, extra: dict | None = None) -> dict:
    """Run the training worker group to completion (or resume it); returns the last logged metrics.

    objective: the align.objectives instance the workers minimise; it travels in their config as
    itself (pickled), with "saved_as": {"objective": its name, **its fields} for the final model's
    sweetspot.json. model: a path, hub name or actors.cluster.ShippedDir; data_ref: an ObjectRef of
    the tokenized pairs (a pyarrow Table), so workers on any node read it from the object store.
    loop: the per-worker function (default actors.trainer.train_worker, the offline loop; vBoN passes
    its on-policy one, objective None, and its own "saved_as" and parameters in extra), extra: more
    entries of its config (actor handles, say).
    """
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from actors.trainer import train_worker

    config = {"objective": objective, "model": model, "data": data_ref, "output_dir": str(output_dir),
              "storage_path": storage_path, "train": train, "lora": lora, **(extra or {})}
    if objective is not None:
        config["saved_as"] = {"objective": objective.NAME, **asdict(objective)}
    run_dir = RunDir(storage_path, train.run.name)
    if finished(run_dir, train.steps):
        # Its last checkpoint and its model are stored: starting the worker group would only load
        # the one and upload the other again.
        print(f"  [train] run {train.run.name!r} finished before (step {train.steps} of {train.steps} and its model "
              f"are in {run_dir.path}): nothing to train", flush=True)
        write_atomic(output_dir / LOG_FILE, run_dir.read_text(LOG_FILE) or "")
    else:
        w = train.workers
        trainer = TorchTrainer(
            in_driver(loop or train_worker) if w.in_driver else loop or train_worker,
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
        log.info("training %s on %s, ZeRO-%d, run %r in %s", config["saved_as"]["objective"],
                 "the driver (local mode)" if w.in_driver else f"{w.num_workers} worker(s)",
                 train.deepspeed.zero_stage, train.run.name, storage_path)
        with one_rank_here() if w.in_driver else contextlib.nullcontext():
            fit(trainer, run_dir, train, output_dir)
    tmp = output_dir / f".{MODEL_DIR}.download"
    shutil.rmtree(tmp, ignore_errors=True)
    if run_dir.download_dir(MODEL_DIR, str(tmp)):
        replace_dir(tmp, output_dir / MODEL_DIR)
    history = read_history(output_dir)
    return history[-1] if history else {}


_IN_DRIVER = threading.Lock()


@contextlib.contextmanager
def one_rank_here():
    """The torch.distributed variables of a group of one rank in this process, for Ray Train's local
    mode (workers.num_workers 0), which then starts a gloo group here that DeepSpeed joins and ends it
    after the run. One such run at a time per process (jobs.pipeline runs stages in threads)."""
    import os
    import socket

    with _IN_DRIVER:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port)}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def in_driver(loop):
    """The loop, ending the driver's one-rank group itself: through deepspeed.comm, which also drops the
    groups DeepSpeed derived from it (else the next run in this process finds them stale), and
    after a failure too (Ray Train's local mode ends it only after a success)."""
    import functools

    @functools.wraps(loop)
    def run(config):
        try:
            return loop(config)
        finally:
            import torch.distributed as dist

            if dist.is_initialized():
                from deepspeed.comm import comm as ds_comm

                if ds_comm.cdb is not None:
                    ds_comm.destroy_process_group()
                else:  # it failed before DeepSpeed joined the group
                    dist.destroy_process_group()

    return run


def finished(run_dir: RunDir, steps: int) -> bool:
    """Whether the run (its key checked by prepare_run) already ended: a complete checkpoint at its
    last step, its final model uploaded, and its log row of that step."""
    newest = run_dir.newest_complete()
    logged = [json.loads(line)["step"] for line in (run_dir.read_text(LOG_FILE) or "").splitlines()]
    if newest is None or newest[0] < steps or steps not in logged or not run_dir.has_dir(MODEL_DIR):
        return False
    valid, _ = run_dir.newest_valid()  # the files as written (a corrupted one is resumed from the one before)
    return valid is not None and valid[0] >= steps


def fit(trainer, run_dir: RunDir, train: TrainConfig, output_dir: Path) -> None:
    """trainer.fit(), with the driver's progress lines and tracking; the run's log copied to output_dir."""
    tracker = Tracker(train.run.tracking, output_dir, train.run.name, json.loads(run_dir.read_text(RUN_FILE) or "{}"))
    progress = ProgressPrinter(run_dir, train.steps, tracker=tracker)
    progress.start()
    failed = True
    try:
        trainer.fit()
        failed = False
    finally:
        progress.stop()
        tracker.close(failed)
        write_atomic(output_dir / LOG_FILE, run_dir.read_text(LOG_FILE) or "")


class ProgressPrinter:
    """Prints rank 0's per-step rows as they reach the run's storage directory (the workers' own
    output stays in their log files), every `interval` seconds, from a thread of the driver, and hands
    each to the run's tracker (actors.tracking: TensorBoard events)."""

    KEYS = ("loss", "rewards/accuracies", "accuracy", "loss/sft", "loss/ipo", "reward", "log_f", "kl", "sync_s",
            "val/loss", "val/rewards/accuracies", "val/accuracy", "lr", "tokens_per_s", "samples_per_s")

    def __init__(self, run_dir, total_steps: int, interval: float = 2.0, clock=None, tracker: Tracker | None = None):
        import threading
        import time

        from align.runtime.console import inherit

        self.run_dir, self.total, self.interval, self.tracker = run_dir, total_steps, interval, tracker
        self.clock = clock or time.monotonic
        self.mark = None  # (step, time) of the first row seen since the workers (re)started: the ETA's origin
        text = run_dir.read_text(LOG_FILE) or ""  # a resumed run's earlier rows are not printed again
        self.printed = max((json.loads(line)["step"] for line in text.splitlines()), default=0)
        self.starts_seen = len((run_dir.read_text(START_FILE) or "").splitlines())  # earlier runs' starts
        self.starts = 0  # this job's
        self._stop = threading.Event()
        # Prints where the job prints (its own log file when jobs.pipeline runs stages side by side).
        self._thread = threading.Thread(target=inherit(self._loop), daemon=True, name="train-progress")

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        try:
            text = self.run_dir.read_text(LOG_FILE) or ""
            start = self.run_dir.read_text(START_FILE)
        except OSError:  # mid-rename; next time
            return
        for line in (start or "").splitlines()[self.starts_seen :]:  # the worker group started, or restarted
            self.starts_seen, self.starts = self.starts_seen + 1, self.starts + 1
            s = json.loads(line)
            again = "restarted" if self.starts > 1 else "started"
            if s["checkpoint"]:
                print(f"  [train] workers {again}: resuming at step {s['step']} of {self.total} "
                      f"(from {s['checkpoint'].rstrip('/').rsplit('/', 1)[-1]})", flush=True)
            elif self.starts > 1:
                print(f"  [train] workers restarted: no complete checkpoint yet, from step 0 of {self.total}", flush=True)
            self.printed = min(self.printed, s["step"])  # the steps after it run again: their rows print again
            self.mark = None
        for line in text.splitlines():
            row = json.loads(line)
            if row["step"] > self.printed:
                shown = " ".join(f"{k} {row[k]:.4g}" for k in self.KEYS if k in row)
                print(f"  [train] step {row['step']}/{self.total} {shown}{self.eta(row['step'])}", flush=True)
                if self.tracker is not None:
                    self.tracker.log(row)
                self.printed = row["step"]

    def eta(self, step: int) -> str:
        """' eta 1m05s' from the pace since the first row of this start (nothing at that first row)."""
        now = self.clock()
        if self.mark is None:
            self.mark = (step, now)
        if step <= self.mark[0] or now <= self.mark[1]:  # rows read in the same poll as the origin: no pace yet
            return ""
        left = (self.total - step) * (now - self.mark[1]) / (step - self.mark[0])
        return f" eta {int(left // 60)}m{int(left % 60):02d}s"
