"""One config, the whole pipeline: sample -> pairs -> reward model -> train -> evaluate -> (optionally)
serve. Each stage is an existing job's run(cfg) on its own YAML plus overrides, so every knob is
documented once, in that job's file.

    python -m jobs.pipeline --config configs/pipeline.yaml
    python -m jobs.pipeline --config configs/pipeline.yaml dry_run=true     # the plan: what would run
    ray job submit --working-dir . -- python -m jobs.pipeline --config configs/pipeline.yaml

A stage refers to an earlier stage's outputs as `${name}` in its overrides (`data.source=${pairs}/bonbon`).
Outputs are keyed by the config that made them: stage `name` writes to <output_dir>/<name>-<key>,
where key is a hash of the stage's resolved job config (upstream directories, hence upstream keys,
included) and of the files it reads. A finished stage leaves stage.json there; a rerun reuses it, so
a changed knob reruns exactly that stage and the stages that read from it, and going back to an
earlier value finds its outputs again. An interrupted stage resumes inside its directory (the jobs'
own checkpoints). Writes pipeline.md/json (stage, status, wall, directory, headline metrics).
"""
from __future__ import annotations

import importlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from align.runtime.config import ConfigError, OutputPath, require, run_job

REF = re.compile(r"\$\{([^}]*)\}")
# Headline metrics shown in the summary table when a stage returns them.
HEADLINES = ("win_rate_vs_pi0", "kl_to_pi0", "win_rate_bon_vs_pi0", "heldout_agreement", "win_rate", "loss")


@dataclass
class StageSpec:
    name: str  # the stage's name: its directory <name>-<key> and how later stages refer to it, ${name}
    job: str  # a job of jobs/ (jobs.catalog.stages(): bon, make_pairs, train_dpo, ...)
    config: str | None = None  # the job's YAML (null: the job's defaults)
    overrides: list[str] = field(default_factory=list)  # key=value on top of it; ${stage} = that stage's directory

    def __post_init__(self):
        require(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", self.name) is not None, "name",
                "an identifier (letters, digits, _)", self.name)
        from jobs.catalog import stages

        require(self.job in stages(), "job", "one of " + " | ".join(stages()), self.job)


@dataclass
class ServeSpec:
    enabled: bool = False  # after the last stage, serve the result until interrupted (Ctrl-C)
    host: str = "127.0.0.1"  # this machine only; 0.0.0.0 to listen on every interface
    port: int = 8000
    args: dict = field(default_factory=lambda: {"model": "default"})  # serve.app's AppArgs; ${stage} allowed

    def __post_init__(self):
        require(1 <= self.port <= 65535, "port", "an integer in [1, 65535]", self.port)


@dataclass
class PipelineConfig:
    stages: list[StageSpec] = field(default_factory=list)
    set: dict[str, list[str]] = field(default_factory=dict)  # more overrides per stage, for the command line: set.rm=[train.steps=50]
    vars: dict[str, str] = field(default_factory=dict)  # ${name} values shared by the stages, e.g. {pi0: default}
    serve: ServeSpec = field(default_factory=ServeSpec)
    stop_after: str | None = None  # run the stages up to and including this one
    parallel: int = 1  # stages run side by side, up to this many, each once the stages it reads are done; >1: their output goes to <dir>/stage.log
    dry_run: bool = False  # print the plan (which stages run, which are reused) and stop
    ray_address: str | None = None
    output_dir: OutputPath = "outputs/pipeline"

    def __post_init__(self):
        require(self.parallel >= 1, "parallel", "an integer >= 1 (stages running at once)", self.parallel)
        require(len(self.stages) > 0, "stages", "a non-empty list of {name, job, config, overrides}", self.stages)
        names = [s.name for s in self.stages]
        for i, name in enumerate(names):
            require(name not in names[:i], f"stages[{i}].name", "a name no other stage has", name)
        require(self.stop_after is None or self.stop_after in names, "stop_after", "null or a stage name: " + ", ".join(names),
                self.stop_after)
        for name in self.vars:
            require(name not in names, f"vars.{name}", "a name no stage has", name)
        for name in self.set:
            require(name in names, f"set.{name}", "a stage name: " + ", ".join(names), name)
        for i, s in enumerate(self.stages):
            for j, o in enumerate(self.overrides_of(s)):
                for ref in REF.findall(o):
                    known = [*self.vars, *names[:i]]
                    require(ref in known, f"stages[{i}].overrides[{j}]",
                            "references ${name} to vars and earlier stages only: " + (", ".join(known) or "none here"), o)
        for ref in REF.findall(json.dumps(self.serve.args)):
            require(ref in [*self.vars, *names], "serve.args", "references ${name} to vars and stages: " + ", ".join(
                [*self.vars, *names]), self.serve.args)

    def overrides_of(self, spec: StageSpec) -> list[str]:
        """The stage's overrides, then its entry of `set`."""
        return [*spec.overrides, *self.set.get(spec.name, [])]


@dataclass
class Stage:
    """One planned stage: its job, resolved config (outputs placed), key and directory."""

    spec: StageSpec
    cfg: object
    key: str
    dir: Path

    @property
    def done(self) -> bool:
        marker = self.dir / "stage.json"
        return marker.is_file() and json.loads(marker.read_text()).get("key") == self.key


def substitute(text: str, values: dict) -> str:
    """${name} -> the value of `name` (a var or an earlier stage's directory)."""
    return REF.sub(lambda m: str(values[m.group(1)]), text)


def input_fingerprints(cfg_dict: dict, out: Path) -> dict:
    """Files and directories the stage reads that live outside the pipeline (a local model, a prompt
    file): their fingerprints join the key, so replacing one reruns the stage."""
    from align.runtime.paths import resolve_input
    from align.runtime.runstate import flatten, path_fingerprint

    found = {}
    for k, v in flatten(cfg_dict).items():
        if not isinstance(v, str) or "/" not in v or k.endswith("output_dir") or k.endswith("storage_path"):
            continue
        p = resolve_input(v)
        if p.exists() and out not in p.parents:
            found[k] = path_fingerprint(p)
    return found


def place(cfg, stage_dir: Path, name: str):
    """The stage's outputs under its own directory: output_dir, and a trainer's checkpoints."""
    from dataclasses import replace

    cfg = replace(cfg, output_dir=str(stage_dir))
    train = getattr(cfg, "train", None)
    if train is not None and hasattr(train, "run"):
        cfg = replace(cfg, train=replace(train, run=replace(train.run, name=name, storage_path=str(stage_dir / "runs"))))
    return cfg


def plan(cfg: PipelineConfig) -> list[Stage]:
    """Every stage's config, loaded and validated, its key and directory, before any work starts."""
    from align.runtime.config import load_config, to_dict
    from align.runtime.runstate import digest
    from jobs.catalog import config_class

    out = Path(cfg.output_dir)
    dirs: dict[str, Path | str] = dict(cfg.vars)
    stages = []
    for i, spec in enumerate(cfg.stages):
        cls = config_class(spec.job)
        if spec.config is not None and not Path(spec.config).is_file():
            raise ConfigError(f"stages[{i}].config", "an existing YAML file (or null for the job's defaults)", spec.config)
        try:
            job_cfg = load_config(cls, spec.config, [substitute(o, dirs) for o in cfg.overrides_of(spec)])
        except ConfigError as e:
            raise ConfigError(f"stages[{i}] ({spec.name}, jobs.{spec.job}): {e.field}", e.allowed, e.got) from None
        d = to_dict(job_cfg)
        for k in ("output_dir", "ray_address", "resume"):
            d.pop(k, None)
        if "train" in d and "run" in d["train"]:
            from actors.train_config import TrainConfig

            d["train"]["run"] = {k: v for k, v in d["train"]["run"].items() if k not in ("name", "storage_path", "resume")}
            d["train"] = {k: v for k, v in d["train"].items() if k not in TrainConfig.NOT_IN_RUN_KEY}
        key = digest({"job": spec.job, "config": d, "inputs": input_fingerprints(d, out)})[:10]
        dirs[spec.name] = out / f"{spec.name}-{key}"
        stages.append(Stage(spec, place(job_cfg, dirs[spec.name], spec.name), key, dirs[spec.name]))
    return stages


def headline(metrics: dict) -> str:
    """Up to three well-known scalars of a stage's result (nested results by their dotted names)."""
    from align.runtime.runstate import flatten

    flat = flatten(metrics) if isinstance(metrics, dict) else {}
    parts = []
    for want in HEADLINES:
        for k, v in flat.items():
            if k.split(".")[-1] == want and isinstance(v, (int, float)) and not isinstance(v, bool):
                parts.append(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}")
    return ", ".join(parts[:3])


def serve_forever(cfg: PipelineConfig, dirs: dict[str, Path]) -> None:
    """Serve the result (serve.app) on host:port until interrupted."""
    from ray import serve

    from serve.app import AppArgs, bind_app

    args = AppArgs(**json.loads(substitute(json.dumps(cfg.serve.args), dirs)))
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    serve.run(bind_app(args), name="sweetspot", route_prefix="/")
    print(f"\n  serving {args.model} at http://{cfg.serve.host}:{cfg.serve.port}/ (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


def depends_on(cfg: PipelineConfig, spec: StageSpec) -> set[str]:
    """The stages whose outputs `spec` reads (${name} in its overrides)."""
    names = {s.name for s in cfg.stages}
    return {ref for o in cfg.overrides_of(spec) for ref in REF.findall(o) if ref in names}


def run_stage(s: Stage, row: dict, log_path: Path | None) -> None:
    """Run one stage's job and leave stage.json (its key, config, wall time and metrics) behind;
    with log_path, the job's prints go there instead of the console."""
    from contextlib import nullcontext

    from align.runtime.config import to_dict
    from align.runtime.console import route
    from align.runtime.runstate import write_atomic

    t0 = time.perf_counter()
    s.dir.mkdir(parents=True, exist_ok=True)
    with (open(log_path, "a", buffering=1) if log_path else nullcontext()) as log, route(log):
        metrics = importlib.import_module(f"jobs.{s.spec.job}").run(s.cfg)
    metrics = json.loads(json.dumps(metrics if isinstance(metrics, dict) else {"result": metrics}, default=str))
    wall = time.perf_counter() - t0
    write_atomic(s.dir / "stage.json", json.dumps({"key": s.key, "job": s.spec.job, "config": to_dict(s.cfg),
                                                  "wall_s": wall, "metrics": metrics}, indent=2, default=str))
    row.update(status="ran", wall_s=wall, metrics=metrics)


def run_stages(cfg: PipelineConfig, stages: list[Stage], rows: list[dict]) -> None:
    """Reuse the finished stages and run the others, up to `parallel` at once, each as soon as the
    stages it reads have finished (in config order when parallel is 1). A failed stage lets the
    running ones finish, starts no more, and is raised (cfg.parallel)."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    parallel = cfg.parallel
    needs = {s.spec.name: depends_on(cfg, s.spec) for s in stages}
    finished: set[str] = set()
    todo = []
    for k, (s, row) in enumerate(zip(stages, rows)):
        if s.done:
            saved = json.loads((s.dir / "stage.json").read_text())
            row.update(status="reused", wall_s=saved["wall_s"], metrics=saved["metrics"])
            print(f"\n== [{k + 1}/{len(stages)}] {s.spec.name} (jobs.{s.spec.job}): finished before, reused {s.dir}", flush=True)
            finished.add(s.spec.name)
        else:
            todo.append(k)
    if parallel == 1:  # in this thread, in config order (a stage reads earlier stages only)
        for k in todo:
            s = stages[k]
            print(f"\n== [{k + 1}/{len(stages)}] {s.spec.name} (jobs.{s.spec.job}) -> {s.dir}", flush=True)
            run_stage(s, rows[k], None)
        return
    errors: list[BaseException] = []
    with ThreadPoolExecutor(max_workers=parallel, thread_name_prefix="stage") as pool:
        running = {}
        while todo or running:
            while not errors and len(running) < parallel:
                ready = [k for k in todo if needs[stages[k].spec.name] <= finished]
                if not ready:
                    break
                k = ready[0]
                todo.remove(k)
                s = stages[k]
                print(f"\n== [{k + 1}/{len(stages)}] {s.spec.name} (jobs.{s.spec.job}) -> {s.dir} (log: {s.dir / 'stage.log'})",
                      flush=True)
                running[pool.submit(run_stage, s, rows[k], s.dir / "stage.log")] = k
            if not running:
                break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                k = running.pop(future)
                name = stages[k].spec.name
                if future.exception() is not None:
                    errors.append(future.exception())
                    rows[k]["status"] = "failed"
                    print(f"\n== {name} failed ({stages[k].dir / 'stage.log'}): {future.exception()!r}", flush=True)
                else:
                    finished.add(name)
                    print(f"== {name} done in {rows[k]['wall_s']:.1f} s: {headline(rows[k]['metrics'])}", flush=True)
    if errors:
        raise errors[0]


def run(cfg: PipelineConfig) -> dict:
    import ray

    from actors.cluster import init_ray
    from align.runtime.runstate import write_atomic
    from jobs.tables import format_table

    stages = plan(cfg)  # a config error in any stage stops here
    last = len(stages) if cfg.stop_after is None else [s.spec.name for s in stages].index(cfg.stop_after) + 1
    stages = stages[:last]
    rows = [{"stage": s.spec.name, "job": s.spec.job, "status": "reuse" if s.done else "run", "dir": str(s.dir)} for s in stages]
    print("\n  pipeline plan\n\n" + format_table(rows, [("stage", "stage", "{}"), ("job", "job", "{}"),
                                                      ("status", "status", "{}"), ("directory", "dir", "{}")])[0], flush=True)
    if cfg.dry_run:
        return {"stages": rows}
    started = init_ray(cfg.ray_address)
    try:
        run_stages(cfg, stages, rows)
    finally:
        if started and not cfg.serve.enabled:
            ray.shutdown()
    for row in rows:
        row["headline"] = headline(row.get("metrics", {}))
    text, md = format_table(rows, [("stage", "stage", "{}"), ("job", "job", "{}"), ("status", "status", "{}"),
                                   ("wall (s)", "wall_s", "{:.1f}"), ("headline", "headline", "{}"), ("directory", "dir", "{}")])
    out = Path(cfg.output_dir)
    write_atomic(out / "pipeline.md", f"# Pipeline ({len(rows)} stages)\n\n{md}\n")
    write_atomic(out / "pipeline.json", json.dumps({"stages": rows}, indent=2, default=str))
    print(f"\n{text}\n\n  wrote {out / 'pipeline.md'}", flush=True)
    if cfg.serve.enabled and last == len(cfg.stages):
        serve_forever(cfg, {**cfg.vars, **{s.spec.name: s.dir for s in stages}})
    return {"stages": rows}


def main(argv=None) -> dict:
    return run_job(PipelineConfig, run, argv, description=__doc__)


if __name__ == "__main__":
    main()
