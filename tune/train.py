"""Sweep a trainer's regularisation knobs with Ray Tune: every trial is a Ray Train run of the job
(DeepSpeed workers with their own resources), reports its training log to Tune as it goes, and ASHA
stops the trials whose validation metric lags. Finished trials are evaluated (gold win rate and KL
against pi_0), so the sweep ends with a reward-KL plot and its Pareto front.

    python -m tune.train --config configs/tune_train.yaml
    python -m tune.train --config configs/tune_train.yaml job=train_bonbon base=configs/train_bonbon.yaml \\
        'search={bonbon.alpha: {grid: [0.1, 0.5, 0.9]}}'

Knobs: those the job's objective section declares SWEEPABLE (jobs.catalog.sweeps(): train_dpo dpo.beta,
dpo.ref_alpha, dpo.ref_tau; train_bonbon bonbon.alpha; train_vbon vbon.n, vbon.beta, vbon.k). Each trial is the job's own run(cfg) on `base` + `overrides` + its knob values,
with its outputs in trials/<trial>/ and its checkpoints in runs/<trial>/; the models of all but the
`keep_best` best finished trials are removed at the end. Writes results.csv/md/json (sorted by the
metric) and pareto.png; an interrupted sweep resumes like tune.dera.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from align.runtime.config import ConfigError, OutputPath, require, run_job
from jobs.sections import PromptsConfig, RewardConfig

log = logging.getLogger("sweetspot.tune.train")


EXPERIMENT = "train"


@dataclass
class AshaConfig:
    enabled: bool = True  # ASHA early stopping on `metric` (reported every train.run.log_every steps)
    grace_period: int = 20  # steps every trial runs before it may be stopped
    reduction_factor: float = 2  # keep the top 1/reduction_factor of trials at each rung

    def __post_init__(self):
        require(self.grace_period >= 1, "grace_period", "an integer >= 1", self.grace_period)
        require(self.reduction_factor > 1, "reduction_factor", "a number > 1", self.reduction_factor)


@dataclass
class TrialEvalConfig:
    enabled: bool = True  # evaluate each finished trial: gold win rate and KL against pi_0
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    n: int = 4  # samples per prompt
    reward: RewardConfig = field(default_factory=RewardConfig)  # the gold judge


@dataclass
class TuneTrainConfig:
    job: str = "train_dpo"  # a training job with knobs to sweep (jobs.catalog.sweeps(): train_dpo, train_bonbon, train_vbon)
    base: str = "configs/train_dpo.yaml"  # the job's config every trial starts from
    overrides: list[str] = field(default_factory=list)  # key=value applied to `base` before the trial's knobs
    search: dict = field(default_factory=lambda: {"dpo.beta": {"grid": [0.05, 0.1, 0.3]}})
    searcher: str = "basic"  # basic | optuna
    num_samples: int = 1
    metric: str = "val/rewards/accuracies"  # a column of the trainer's log (val/... needs train.eval_every > 0 and data.eval_split)
    mode: Literal["min", "max"] = "max"
    asha: AshaConfig = field(default_factory=AshaConfig)
    evaluate: TrialEvalConfig = field(default_factory=TrialEvalConfig)
    keep_best: int = 2  # finished trials whose models and checkpoints are kept
    cpus_per_trial: float = 0.01  # the trial's own process (its training workers reserve their own CPUs); > 0
    max_concurrent_trials: int = 1
    seed: int = 0  # Optuna's seed
    tracking: str = "tensorboard"  # mlflow | tensorboard+mlflow: also an MLflow run per trial (actors/tracking.py); Tune writes TensorBoard events in any case
    resume: str = "auto"  # auto | never | must
    ray_address: str | None = None
    output_dir: OutputPath = "outputs/tune_train"

    def __post_init__(self):
        from actors.tracking import check_tracking
        from tune.space import parse_space

        check_tracking(self.tracking)
        require(self.searcher in ("basic", "optuna"), "searcher", "basic | optuna", self.searcher)
        require(self.num_samples >= 1, "num_samples", "an integer >= 1", self.num_samples)
        require(self.keep_best >= 0, "keep_best", "an integer >= 0", self.keep_best)
        require(self.cpus_per_trial > 0, "cpus_per_trial", "a number > 0 (Tune places every trial)", self.cpus_per_trial)
        require(self.max_concurrent_trials >= 1, "max_concurrent_trials", "an integer >= 1", self.max_concurrent_trials)
        from jobs.catalog import sweeps

        require(self.job in sweeps(), "job", "a training job with sweepable knobs: " + " | ".join(sweeps()), self.job)
        parse_space(self.search, sweeps()[self.job])
        base = self.trial_config(first_values(self.search), "check")  # a config error stops here, before any work
        if self.metric.startswith("val/"):
            require(base.train.eval_every > 0 and bool(getattr(base.data, "eval_split", None)), "metric",
                    "a training-log column; val/... needs train.eval_every > 0 and data.eval_split in the base config",
                    self.metric)

    def trial_config(self, knobs: dict, trial_id: str, out=None):
        """The job's config for one trial: base + overrides + the trial's knobs + its own output and run."""
        from align.runtime.config import load_config
        from jobs.catalog import config_class

        cls = config_class(self.job)
        # "trial_<id>": a bare id such as 76785_00000 would read as an integer in YAML
        where = [] if out is None else [f"output_dir={out / 'trials' / trial_id}", f"train.run.name={trial_id}",
                                        f"train.run.storage_path={out / 'runs'}", "train.run.resume=auto"]
        overrides = [*self.overrides, *(f"{k}={v}" for k, v in knobs.items()), *where]
        try:
            return load_config(cls, self.base, overrides)
        except (ConfigError, ValueError) as e:
            raise ConfigError("overrides", f"a valid {self.base} for every trial ({e})", overrides) from None


def first_values(search: dict) -> dict:
    """One value per knob (the first of a grid or choice, the low end of a range), to check the config."""
    out = {}
    for k, spec in search.items():
        out[k] = spec if not isinstance(spec, dict) else next(iter(spec.values()))[0]
    return out


def trial(config: dict, setup: dict) -> None:
    """One Tune trial: the job's run(cfg) in a thread; its training log rows reported to Tune as they
    appear (so ASHA can stop it); then the gold evaluation of the trained model."""
    import importlib
    import json
    import os
    import threading
    from pathlib import Path

    from ray import tune

    from actors.checkpoints import LOG_FILE, RunDir

    os.chdir(setup["cwd"])  # Tune starts a trial in its own directory; the job's relative paths are the driver's
    cfg = setup["sweep"]
    trial_id = f"trial_{tune.get_context().get_trial_id()}"
    job_cfg = cfg.trial_config(config, trial_id, Path(setup["out"]))
    module = importlib.import_module(f"jobs.{cfg.job}")
    box: dict = {}

    def work():
        try:
            box["result"] = module.run(job_cfg)
        except BaseException as e:  # noqa: BLE001 - re-raised in the trial's own thread below
            box["error"] = e

    worker = threading.Thread(target=work, daemon=True, name="train-job")
    worker.start()
    # Rows go to Tune as they appear, so ASHA can stop a lagging trial; the last step's row waits for
    # the evaluation and goes with it (a report at the final step may end the trial).
    run_dir, reported, last, final = RunDir(job_cfg.train.run.storage_path, trial_id), 0, {}, job_cfg.train.steps
    while True:
        alive = worker.is_alive()
        text = run_dir.read_text(LOG_FILE) or ""
        for row in (json.loads(line) for line in text.splitlines()):
            if row["step"] > reported:
                reported = row["step"]
                if cfg.metric not in row:  # e.g. a checkpoint step between validation passes
                    continue
                last = {k: v for k, v in row.items() if isinstance(v, (int, float))}
                if reported < final:
                    tune.report(last)
        if not alive:
            break
        worker.join(timeout=1.0)
    if "error" in box:
        raise box["error"]
    done = {**last, "finished": 1}
    if cfg.evaluate.enabled:
        from jobs.sections import SamplingConfig
        from jobs.evaluate import EvalConfig
        from jobs.evaluate import run as evaluate

        ev = evaluate(EvalConfig(policy=str(Path(job_cfg.output_dir) / "model"), reference=job_cfg.model,
                                 reward=cfg.evaluate.reward, prompts=cfg.evaluate.prompts,
                                 sampling=SamplingConfig(n=cfg.evaluate.n), output_dir=job_cfg.output_dir))
        done.update(gold=ev["mean_reward_policy"], win_rate_vs_pi0=ev["win_rate_vs_pi0"], kl=ev["kl_to_pi0"],
                    kl_se=ev["kl_to_pi0_stderr"])
    tune.report(done)


def check_fits(cfg: TuneTrainConfig, base) -> None:
    """A trial holds cpus_per_trial while its workers need num_workers x cpus_per_worker more: stop
    here, naming the knob, when the cluster cannot place one trial with its workers (it would wait)."""
    import ray

    w = base.train.workers
    need, have = cfg.cpus_per_trial + w.num_workers * w.cpus_per_worker, ray.cluster_resources().get("CPU", 0)
    if need > have:
        hint = (f"train.workers.cpus_per_worker={(have - cfg.cpus_per_trial) / w.num_workers:.2f}" if w.num_workers
                else f"cpus_per_trial={have:g}")
        raise ConfigError("overrides", f"train.workers.num_workers x cpus_per_worker + cpus_per_trial <= the cluster's "
                          f"{have:g} CPUs (each trial needs {need:g}); e.g. {hint}", cfg.overrides)


def sweep_key(cfg: TuneTrainConfig) -> dict:
    from align.runtime.config import to_dict
    from align.runtime.runstate import drop_keys

    return drop_keys(to_dict(cfg), ["resume", "ray_address", "output_dir", "max_concurrent_trials", "keep_best", "tracking"])


def run(cfg: TuneTrainConfig) -> dict:
    import os
    import shutil

    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    from tune import sweep
    from tune.results import write_sweep
    from jobs.catalog import sweeps
    from tune.space import grid_size, parse_space

    out = Path(cfg.output_dir)
    resume = sweep.prepare(out, sweep_key(cfg), cfg.resume, EXPERIMENT)
    base = cfg.trial_config(first_values(cfg.search), "check")
    scheduler = None
    if cfg.asha.enabled:
        scheduler = ASHAScheduler(time_attr="step", max_t=base.train.steps, grace_period=cfg.asha.grace_period,
                                  reduction_factor=cfg.asha.reduction_factor)
    trainable = tune.with_resources(tune.with_parameters(trial, setup={"sweep": cfg, "out": str(out), "cwd": os.getcwd()}),
                                    {"cpu": cfg.cpus_per_trial})
    done, failed = sweep.fit(
        trainable, out, EXPERIMENT, resume, parse_space(cfg.search, sweeps()[cfg.job]),
        tune.TuneConfig(metric=cfg.metric, mode=cfg.mode, num_samples=cfg.num_samples, scheduler=scheduler,
                        search_alg=sweep.searcher(cfg.searcher, cfg.seed), max_concurrent_trials=cfg.max_concurrent_trials),
        f"{cfg.job}: sweeping {cfg.search}, {cfg.num_samples * grid_size(cfg.search)} trial(s), {base.train.steps} "
        f"steps each, metric {cfg.metric} ({cfg.mode}){', ASHA' if scheduler else ''}", log, cfg.ray_address,
        before=lambda: check_fits(cfg, base), tracking=cfg.tracking)
    rows = []
    for r in done:
        m = r.metrics
        rows.append({**{k: r.config[k] for k in cfg.search}, "trial_id": f"trial_{m.get('trial_id')}", "steps": m.get("step"),
                     cfg.metric: m.get(cfg.metric),
                     "stopped_early": not m.get("finished"),
                     **{k: m[k] for k in ("loss", "gold", "win_rate_vs_pi0", "kl", "kl_se") if k in m}})
    if not rows:
        raise RuntimeError(f"every trial failed ({len(failed)}); see the errors above and {out / 'tune' / EXPERIMENT}")
    sign = 1 if cfg.mode == "max" else -1
    ranked = sorted((r for r in rows if not r["stopped_early"] and r[cfg.metric] is not None),
                    key=lambda r: -sign * r[cfg.metric])
    keep = ranked[: cfg.keep_best]
    for r in rows:  # models and checkpoints of the rest go (a trial ASHA stopped may still have saved one before
        if r not in keep:  # the stop reached its run); their logs and metrics stay
            shutil.rmtree(out / "trials" / r["trial_id"] / "model", ignore_errors=True)
            shutil.rmtree(out / "runs" / r["trial_id"], ignore_errors=True)
    for r in rows:
        r["objective"] = sign * r[cfg.metric] if r[cfg.metric] is not None else float("-inf")
        r["kept"] = r in keep
    columns = [*((k, k, "{:.4g}") for k in cfg.search), (cfg.metric, cfg.metric, "{:.4f}"), ("steps", "steps", "{}"),
               ("early stop", "stopped_early", "{}"), ("gold", "gold", "{:+.3f}"),
               ("win rate vs pi_0", "win_rate_vs_pi0", "{:.3f}"), ("KL (nats)", "kl", "{:.2f}"), ("kept", "kept", "{}")]
    title = f"{cfg.job} sweep over {', '.join(cfg.search)}: {cfg.metric} ({cfg.mode}), from {cfg.base}"
    label = lambda r: ", ".join(f"{k.split('.')[-1]}={r[k]:.3g}" for k in cfg.search)  # noqa: E731
    text = write_sweep(out, rows, columns, "objective", "gold", label, title)
    best = ranked[0] if ranked else None
    print(f"\n  {title}\n\n{text}\n\n  best: {label(best) if best else 'no finished trial'}; kept the models of "
          f"{min(cfg.keep_best, len(ranked))} trial(s) in {out / 'trials'}", flush=True)
    return {"trials": rows, "best": best, "failed": len(failed)}


def main(argv=None) -> dict:
    return run_job(TuneTrainConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
