"""Experiment tracking of training runs: each row rank 0 logs, as it reaches the driver, also goes to
TensorBoard event files in `<output_dir>/tensorboard/` (tensorboardX, a dependency) and/or an MLflow
run (mlflow or mlflow-skinny installed), so `tensorboard --logdir outputs` or `mlflow ui` shows every
run's curves (loss, accuracies, KL, lr, tokens/s).

train.run.tracking (one switch, also a Tune sweep's `tracking`): tensorboard | mlflow |
tensorboard+mlflow | none. MLflow writes to $MLFLOW_TRACKING_URI when set (a server, a database),
else to the local file store `<output_dir>/mlruns` (`mlflow ui --backend-store-uri <output_dir>/mlruns`).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

TB_DIR = "tensorboard"
MLFLOW_DIR = "mlruns"
MLFLOW_RUN_FILE = "mlflow_run.json"  # the MLflow run id of this output directory's run: a resumed run continues it
TRACKING = ("tensorboard", "mlflow", "tensorboard+mlflow", "none")


def sinks(mode: str) -> set[str]:
    """The sinks a tracking mode names: 'tensorboard+mlflow' -> {'tensorboard', 'mlflow'}."""
    return set() if mode == "none" else set(mode.split("+"))


def check_tracking(mode: str, field: str = "tracking") -> None:
    """A ConfigError naming `field` unless `mode` is one of TRACKING and usable here (MLflow named
    needs the mlflow package), so a run stops at config load, not after training."""
    from importlib.util import find_spec

    from align.runtime.config import ConfigError, require

    require(mode in TRACKING, field, " | ".join(TRACKING), mode)
    if "mlflow" in sinks(mode) and find_spec("mlflow") is None:
        raise ConfigError(field, "tensorboard | none: mlflow is not installed in this environment "
                          "(pip install mlflow-skinny to log MLflow runs)", mode)


def mlflow_uri(output_dir: Path) -> str:
    """$MLFLOW_TRACKING_URI, else the file store under output_dir. MLflow 3 refuses a file store unless
    MLFLOW_ALLOW_FILE_STORE is set; the file store is what a local run wants (no server, no database)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (Path(output_dir) / MLFLOW_DIR).resolve().as_uri()


def numbers(row: dict) -> dict[str, float]:
    """The finite numbers of a logged row, step excepted."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


class Tracker:
    """One training run's tracking sinks; `log(row)` writes every finite number of a train_log.jsonl row
    at its step; `close()` flushes (and ends the MLflow run). A run started over has its old event files
    and MLflow run removed (actors.train_launcher.prepare_run); a resumed one appends to them.

    name: the MLflow experiment and run name (train.run.name); params: what the run is (its run key),
    logged as the MLflow run's parameters."""

    def __init__(self, mode: str, output_dir: Path, name: str = "run", params: dict | None = None):
        self.writer = self.client = self.run_id = None
        if "tensorboard" in sinks(mode):
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(logdir=str(Path(output_dir) / TB_DIR), flush_secs=10)
        if "mlflow" in sinks(mode):
            self._start_mlflow(Path(output_dir), name, params or {})

    def _start_mlflow(self, output_dir: Path, name: str, params: dict) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        from align.runtime.runstate import flatten, write_atomic

        self.client = MlflowClient(tracking_uri=mlflow_uri(output_dir))
        run_file = output_dir / MLFLOW_RUN_FILE
        if run_file.is_file():  # this output directory's run, resumed
            self.run_id = json.loads(run_file.read_text())["run_id"]
            self.client.update_run(self.run_id, status="RUNNING")
            return
        experiment = self.client.get_experiment_by_name(name)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
        self.run_id = self.client.create_run(experiment_id, run_name=name).info.run_id
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}  # MLflow's limit on a value's length
        for keys in [list(flat)[i : i + 100] for i in range(0, len(flat), 100)]:  # and on a batch
            self.client.log_batch(self.run_id, params=[Param(k, flat[k]) for k in keys])
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(run_file, json.dumps({"run_id": self.run_id, "tracking_uri": self.client.tracking_uri}))

    def log(self, row: dict) -> None:
        values = numbers(row)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, row["step"])
        if self.client is not None and values:
            import time

            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            # MLflow keys allow letters, digits and _-./ and spaces; "rewards/accuracies" passes as it is.
            self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, row["step"]) for k, v in values.items()])

    def close(self, failed: bool = False) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.client is not None:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
