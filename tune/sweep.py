"""What every sweep shares: a sweep keyed by its config (resume it, or refuse another config's), the
Tuner built or restored, and the finished and failed trials split apart."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from align.runtime.config import ConfigError


def prepare(out: Path, key: dict, mode: str, experiment: str) -> bool:
    """Whether to resume the Tune experiment `out/tune/<experiment>` (align.runtime.runstate.check_resume on
    the key saved in out/sweep.json); starting over removes it. Saves this sweep's key."""
    from ray import tune

    from align.runtime.runstate import check_resume, write_atomic

    state, key_file = out / "tune", out / "sweep.json"
    saved = json.loads(key_file.read_text()) if key_file.is_file() else None
    resume = check_resume(saved, key, mode, str(state), tune.Tuner.can_restore(str(state / experiment)))
    if resume:
        check_searcher_state(state / experiment)
    if not resume:
        shutil.rmtree(state, ignore_errors=True)
    write_atomic(key_file, json.dumps(key, indent=2, default=str))
    return resume


def check_searcher_state(experiment: Path) -> None:
    """Refuse to resume from a searcher state Tune cannot read: Tune copies it to storage without a
    rename, so a driver killed during the copy leaves it truncated, and a restore from it would start
    trials without their parameters. The newest file of each pattern is the one Tune reads."""
    import ray.cloudpickle as cloudpickle

    for pattern in ("basic-variant-state-*.json", "searcher-state-*.pkl"):
        files = sorted(experiment.glob(pattern))
        if not files:
            continue
        try:
            with files[-1].open("rb") as f:
                cloudpickle.load(f)
        except Exception as e:  # EOFError, UnpicklingError, ...: any failure to read it back
            raise ConfigError("resume", "never for this sweep: its searcher state cannot be read back, so the trials "
                              "left to run are unknown (the sweep was killed while Tune saved it)",
                              f"auto, with {files[-1]} unreadable ({type(e).__name__})") from e


def searcher(name: str, seed: int):
    """None (Tune's basic variant generator: grids in full, random draws of the rest) or Optuna's TPE."""
    if name == "basic":
        return None
    if name == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(seed=seed)
    raise ConfigError("searcher", "basic | optuna", name)


def callbacks(tracking: str, out: Path, experiment: str) -> list:
    """Tune callbacks for a sweep's `tracking` (actors/tracking.py): Tune itself writes every trial's
    TensorBoard events, result.json and progress.csv; mlflow adds an MLflow run per trial, under the
    experiment's name, in $MLFLOW_TRACKING_URI or <output_dir>/mlruns."""
    from actors.tracking import mlflow_uri, sinks

    if "mlflow" not in sinks(tracking):
        return []
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    return [MLflowLoggerCallback(tracking_uri=mlflow_uri(out), experiment_name=experiment, save_artifact=False)]


def fit(trainable, out: Path, experiment: str, resume: bool, space: dict, tune_config, what: str, log,
        ray_address: str | None = None, before=None, tracking: str = "tensorboard") -> tuple[list, list]:
    """Start (or join) Ray, call before() (a check that needs the cluster), run or restore and finish
    the sweep; returns (results that reported, results that failed), the failures logged."""
    from ray import tune

    from actors.cluster import init_ray

    path = out / "tune" / experiment
    started = init_ray(ray_address)
    try:
        if before is not None:
            before()
        if resume:
            print(f"  resuming the sweep in {path}: finished trials are kept", flush=True)
            tuner = tune.Tuner.restore(str(path), trainable, resume_errored=True)
            # (the restored RunConfig keeps the callbacks it was made with)
        else:
            print(f"  {what}; the Tune experiment is in {path}", flush=True)
            tuner = tune.Tuner(trainable, param_space=space, tune_config=tune_config,
                               run_config=tune.RunConfig(storage_path=str(out / "tune"), name=experiment, verbose=1,
                                                         callbacks=callbacks(tracking, out, experiment)))
        grid = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    failed = [r for r in grid if r.error is not None]
    for r in failed:
        log.error("trial %s failed: %s", r.path, r.error)
    return [r for r in grid if r.error is None and r.metrics], failed
