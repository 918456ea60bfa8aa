"""What the trainer jobs share: turning a pair dataset (jobs.sections.PairDataConfig)
into the tokenized pairs the workers read (through the object store), the run key that decides
whether a checkpoint may be resumed, and the end-of-run summary. Not an entry point."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from align.runtime.config import ConfigError
from jobs.sections import PairDataConfig

if TYPE_CHECKING:
    from align.objectives.base import Objective

log = logging.getLogger("sweetspot.train")


def check_pair_file(path: Path, source: str) -> None:
    """A JSON Lines pair file, line by line, before `datasets` reads it: UTF-8, one JSON object per
    line, a prompt (text or a conversation) and chosen / rejected (text or one assistant message).
    Errors name data.source, the file, the line and the field."""
    from align.data.pairs import PAIR_COLUMNS
    from align.data.prompts import read_json_objects
    from align.engine.chat import check_prompt, completion_text

    if path.suffix != ".jsonl":
        return
    rows = read_json_objects(path, source, field="data.source")
    if not rows:
        raise ValueError(f"data.source: {source} has no pairs (it is empty)")
    for i, row in rows:
        missing = [c for c in PAIR_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"data.source: line {i} of {source} lacks {missing}; a pair needs {list(PAIR_COLUMNS)}")
        check_prompt(row["prompt"], f"data.source: line {i} of {source}: 'prompt'")  # text or a conversation
        for side in ("chosen", "rejected"):  # text, or TRL's conversational [{role: assistant, content}]
            if not isinstance(row[side], str):
                completion_text(row[side], f"data.source: line {i} of {source}: {side!r}")


def load_pair_dataset(cfg: PairDataConfig):
    """A `datasets.Dataset` of pairs from a saved dataset dir or a JSON/JSONL file; columns checked."""
    import datasets

    from align.data.pairs import check_pair_columns

    from align.runtime.paths import resolve_input

    path = resolve_input(cfg.source)
    if not path.exists():
        raise ConfigError("data.source", "an existing pair dataset (run `python -m jobs.make_pairs` first, or give "
                          "a .jsonl / datasets directory with prompt, chosen, rejected columns)", cfg.source)
    if path.is_dir():
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise ValueError(f"data.split: {cfg.split!r} is not a split of {cfg.source} (splits: {list(ds)})")
            ds = ds[cfg.split]
    else:
        check_pair_file(path, cfg.source)
        ds = datasets.load_dataset("json", data_files=str(path), split="train")
    check_pair_columns(ds.column_names, cfg.source)
    if cfg.limit is not None:
        ds = ds.select(range(min(cfg.limit, len(ds))))
    if len(ds) == 0:
        raise ValueError(f"data.source: {cfg.source} has no pairs")
    return ds


def tokenize_pairs(ds, tokenizer, max_length: int, for_reward_model: bool = False):
    """The pairs with the token ids the workers train on (the sampled ids when the tokenizer matches;
    for a reward model, a conversation as its own chat template renders it)."""
    from align.engine.models import tokenizer_fingerprint
    from align.data.pairs import tokenize_pair_batch

    fingerprint = tokenizer_fingerprint(tokenizer)
    # In memory: a map over a saved dataset would otherwise write cache files into the source directory.
    ds = ds.map(lambda b: tokenize_pair_batch(tokenizer, b, max_length, fingerprint, for_reward_model), batched=True,
                desc="tokenizing pairs", load_from_cache_file=False, keep_in_memory=True)
    reused = "tokenizer" in ds.column_names and all(t == fingerprint for t in ds["tokenizer"])
    log.info("%d pairs: %s", len(ds), "the sampled token ids, as they were drawn" if reused else "tokenized from text")
    return ds


def run_key(objective: Objective, model_path: str, data: PairDataConfig, train, lora: dict | None) -> dict:
    """What shapes a training run's result: a checkpoint resumes only under the same key. A plain
    dict: the objective (an align.objectives instance) as its registered name and its fields."""
    from dataclasses import asdict

    from align.runtime.paths import resolve_input
    from actors.train_config import TrainConfig
    from align.runtime.runstate import drop_keys, path_fingerprint

    source = resolve_input(data.source)
    model_dir = Path(model_path)
    return {"objective": objective.NAME, "params": asdict(objective), "lora": lora,
            "model": {"path": model_path, "files": path_fingerprint(model_dir) if model_dir.is_dir() else None},
            "data": {"source": str(source), "split": data.split, "limit": data.limit, "files": path_fingerprint(source),
                     "eval_split": data.eval_split, "eval_limit": data.eval_limit},
            "train": drop_keys(asdict(train), ("run.", "workers.collective_timeout_s", "workers.cpus_per_worker",
                                                *TrainConfig.NOT_IN_RUN_KEY, *(f"{k}." for k in TrainConfig.NOT_IN_RUN_KEY)))}


def finish(name: str, metrics: dict, output_dir: Path, seconds: float) -> dict:
    """Print the run summary (with trainer throughput) and write metrics.json."""
    from align.runtime.runstate import write_atomic

    rows = [(k, metrics[k]) for k in sorted(metrics) if isinstance(metrics[k], (int, float))]
    print(f"\n  {name}: final metrics")
    for k, v in rows:
        print(f"    {k:<24} {v:.4g}")
    print(f"    {'wall seconds':<24} {seconds:.1f}")
    if "tokens_per_s" in metrics:
        print(f"  trainer throughput: {metrics['tokens_per_s']:.0f} tokens/s")
    if "samples_per_s" in metrics:  # on-policy: sampled, scored and trained on
        print(f"  on-policy throughput: {metrics['samples_per_s']:.1f} samples/s")
    print(f"  model saved to {output_dir / 'model'}")
    write_atomic(output_dir / "metrics.json", json.dumps({**metrics, "wall_seconds": seconds}, indent=2))
    return metrics


def start_run(title: str, cfg, out: Path, storage: str, key: dict) -> bool:
    """Before the workers start: the output_dir is this run's (or free), the group fits the cluster,
    the run resumes or starts over (by its key), the resolved config is saved; says which. Returns
    whether it resumes."""
    import yaml

    from actors.train_launcher import check_resources, prepare_run
    from align.runtime.config import to_dict
    from align.runtime.runstate import check_output_owner, write_atomic

    run = cfg.train.run
    # Before anything is touched: a new run name (or storage) must not silently replace the model
    # and config of the run that wrote this output_dir.
    check_output_owner(out, {"train.run.name": run.name, "train.run.storage_path": storage}, run.resume == "never",
                       "Set train.run.resume=never to replace them, or use another output_dir.")
    check_resources(cfg.train)
    resumed = prepare_run(cfg.train, storage, out, key)
    write_atomic(out / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False))
    print(f"  {title}: outputs in {out}, checkpoints in {storage}/{cfg.train.run.name}{' (resuming)' if resumed else ''}")
    return resumed


def run_training(objective: Objective, cfg, lora: dict | None = None, bootstrap_seed: int | None = None,
                 title: str | None = None) -> dict:
    """Tokenize the pairs, start (or join) Ray, hand the objective, the data and the model to the
    worker group (the data through the object store), run it (resuming when the run key matches),
    print the summary.

    objective: an align.objectives instance (align.objectives.base.Objective). cfg: the job's config,
    with model, data (PairDataConfig), train (TrainConfig) and output_dir. bootstrap_seed: train on a
    resample of the pairs with replacement, drawn with this seed (the members of a reward-model
    ensemble); part of the run key. title: what the job prints (default objective.describe()).
    """
    import time

    import ray

    from actors.cluster import init_ray, ship_dir
    from actors.train_launcher import launch_training
    from align.engine.models import load_tokenizer, resolve_model_path
    from jobs.sections import check_model_field

    start = time.perf_counter()
    title = title or objective.describe()
    if lora is None and getattr(cfg, "lora", None) is not None:
        lora = cfg.lora.kwargs()  # the job's lora section (jobs.sections.LoraParams)
    if lora and objective.live_reference:  # its updates copy the policy's weights into a model without adapters
        raise ConfigError("lora.enabled", "false with a live (TR-DPO) reference; use a frozen reference (ref_update: none)", True)
    check_model_field(cfg.model)
    out = Path(cfg.output_dir)
    storage = cfg.train.run.storage_path
    ds = load_pair_dataset(cfg.data)  # data errors stop here, before a model is loaded or Ray starts
    model_path = resolve_model_path(cfg.model)
    key = run_key(objective, model_path, cfg.data, cfg.train, lora)
    reads_whole = objective.model_kind == "reward_model"  # scores a conversation whole, as the classifier reward
    if bootstrap_seed is not None:
        import torch

        ds = ds.select(torch.randint(len(ds), (len(ds),), generator=torch.Generator().manual_seed(bootstrap_seed)).tolist())
        key["data"]["bootstrap_seed"] = bootstrap_seed
    ds = tokenize_pairs(ds, load_tokenizer(model_path), cfg.train.max_length, reads_whole)
    eval_ds = None
    if cfg.data.eval_split and cfg.train.eval_every:
        from dataclasses import replace

        eval_ds = load_pair_dataset(replace(cfg.data, split=cfg.data.eval_split, limit=cfg.data.eval_limit))
        if len(eval_ds) < cfg.train.batch_size:
            raise ConfigError("data.eval_limit", f"at least train.batch_size ({cfg.train.batch_size}) validation pairs",
                              len(eval_ds))
        eval_ds = tokenize_pairs(eval_ds, load_tokenizer(model_path), cfg.train.max_length, reads_whole)
    started = init_ray()  # quiet workers: the driver prints their progress (actors.train_launcher.ProgressPrinter)
    try:
        start_run(title, cfg, out, storage, key)
        data_ref = ray.put(ds.flatten_indices().data.table)
        extra = {"eval_data": ray.put(eval_ds.flatten_indices().data.table)} if eval_ds is not None else None
        metrics = launch_training(objective, ship_dir(model_path), data_ref, cfg.train, out, storage, lora=lora,
                                  extra=extra)
    finally:
        if started:
            ray.shutdown()
    return finish(title, metrics, out, time.perf_counter() - start)
